"""Kafka as a replicated cluster (issue 15, DESIGN §12): three KRaft nodes, replication factor 3,
``min.insync.replicas`` 2, ``acks=all``; the pipeline survives what a cluster is for.

The fault tests run on a PRIVATE three-node stack (``devtools.stack`` with ``brokers=3`` in a
temporary folder, one per module, stopped at the end), with the workload writing and the
independent comparison (``shop_compare``) at the end:

* kill -9 of the broker leading the payment topic's partitions: the producer and the appliers go
  on without a restart, nothing is lost and no event is in the topic twice (idempotent producer);
* a rolling restart of all three brokers (one at a time, each back in sync before the next);
* two brokers down: the producer stops advancing the slot and says why, and resumes when ONE
  comes back (a quorum of two), without a restart; nothing lost.

The replication-factor check of ``cutover init`` runs on the shared one-node stack.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from psycopg.conninfo import make_conninfo

from devtools import procs, stack
from devtools.harness import Scenario, changes
from devtools.workload import run_workload
from tests.integration.faults_support import (
    Pipeline,
    PrivateStack,
    Traffic,
    fresh_databases,
    running_pipeline,
    wait_for,
    write_canaries,
)
from tests.integration.test_faults_e2e import finish, settle

# One worker runs the private stacks one after the other: two at once overload 2 cores.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("private_stack")]

REPLICATED = {"replication_factor": 3, "min_insync_replicas": 2}


# --------------------------------------------------------------------------- the cluster


@dataclass
class ClusterStack(PrivateStack):
    """A private stack whose Kafka is three nodes; nodes can be killed, stopped, restarted."""

    def up(self) -> stack.StackState:
        return stack.up(self.root, self.cache, brokers=3, quick_jvm=True)

    @property
    def bootstrap(self) -> str:
        return self.env()["CUTOVER_KAFKA_BOOTSTRAP"]

    def pid(self, node: int) -> int:
        pid = self.state.kafka_pids()[node - 1]
        assert pid is not None
        return pid

    def _gone(self, pid: int, timeout: float) -> None:
        def dead() -> bool:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our child (started in-process): reap it
            return not procs.pid_alive(pid)

        wait_for(dead, timeout, f"Kafka pid {pid} to exit", every=0.1)

    def kill_node(self, node: int) -> None:
        """kill -9 of node ``node``'s JVM."""
        pid = self.pid(node)
        os.kill(pid, signal.SIGKILL)
        self._gone(pid, 30)

    def stop_node(self, node: int) -> None:
        """A clean stop (SIGTERM: controlled shutdown hands its leaderships over first)."""
        pid = self.pid(node)
        os.kill(pid, signal.SIGTERM)
        self._gone(pid, 90)

    def start_node(self, node: int) -> None:
        """Start one node again (on its ports and data) without waiting for the others."""
        state = self.state
        assert not procs.pid_alive(state.kafka_pids()[node - 1])
        pid = stack._start_kafka(state, self.root, stack.kafka_libs(self.cache), node)
        state.set_kafka_pid(node, pid)
        stack._save_state(self.root, state)

    def admin(self) -> Any:
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def partitions(self, topic: str) -> dict[int, Any]:
        meta = self.admin().list_topics(topic, timeout=10).topics[topic]
        assert meta.error is None, meta.error
        return dict(meta.partitions)

    def in_sync(self, topics: list[str]) -> bool:
        """Every partition of ``topics`` has all three replicas in sync."""
        try:
            return all(
                len(p.isrs) == 3 for t in topics for p in self.partitions(t).values()
            )  # fmt: skip
        except Exception:
            return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterStack]:
    base = Path(tempfile.mkdtemp(prefix="cutover-cluster-"))
    base.chmod(0o755)  # the PostgreSQL clusters run as user postgres
    cs = ClusterStack(base / "stack")
    try:
        cs.up()
        yield cs
    finally:
        try:
            cs.down()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cluster_dbs(cluster: ClusterStack) -> Iterator[tuple[str, str]]:
    cluster.restore()  # whatever the previous test did, every server runs
    wait_for(lambda: len(cluster.admin().list_topics(timeout=5).brokers) == 3, 120, "3 brokers")
    with fresh_databases(cluster) as dbs:
        yield dbs


# --------------------------------------------------------------------------- checks


def assert_replicated(cluster: ClusterStack, scenario: Scenario) -> None:
    """Our topics: 3 replicas, min.insync.replicas 2 (from the config); the internal consumer
    offsets topic: 3 replicas (from the broker settings)."""
    ours = [*scenario.topics(), f"{scenario.prefix}.dlq", f"{scenario.prefix}.control"]
    for topic in [*ours, "__consumer_offsets"]:
        parts = cluster.partitions(topic)
        assert parts and all(len(p.replicas) == 3 for p in parts.values()), topic
    resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in ours]
    admin = cluster.admin()  # kept: the futures fail if the client is collected
    for resource, future in admin.describe_configs(resources).items():
        assert future.result(timeout=30)["min.insync.replicas"].value == "2", resource


def assert_no_duplicates(pipe: Pipeline) -> int:
    """No change event is twice in the topics (the idempotent producer's retries across a leader
    change must not duplicate); returns how many were read."""
    events = changes(pipe.scenario.read())
    seen = collections.Counter(
        (e.raw.topic, e.record["source"]["table"], e.record["source"]["lsn"],
         e.record["source"]["seq"])
        for e in events
    )  # fmt: skip
    twice = [k for k, n in seen.items() if n > 1]
    assert not twice, f"{len(twice)} events in the topics twice, e.g. {twice[:3]}"
    return len(events)


def assert_running(pipe: Pipeline) -> None:
    dead = pipe.dead_appliers()
    assert not dead and pipe.producer_code() is None, (dead, pipe.log_text()[-4000:])


# --------------------------------------------------------------------------- init


def test_init_refuses_a_replication_factor_above_the_brokers(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """On the one-node shared stack, replication factor 3 is refused before anything changes."""
    scenario = Scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, kafka_settings=REPLICATED
    )
    result = scenario.cli("init")
    assert result.returncode == 2, result.stderr
    assert "[kafka] replication_factor = 3 is more than the 1 broker(s)" in result.stderr
    assert scenario.slot_state() == (None, None), "init changed the source before refusing"


# --------------------------------------------------------------------------- faults


@pytest.mark.faults
def test_kill_9_of_the_payment_leader_mid_stream(
    cluster: ClusterStack, cluster_dbs: tuple[str, str], tmp_path: Path
) -> None:
    legacy, commerce = cluster_dbs
    with running_pipeline(
        legacy, commerce, cluster.bootstrap, tmp_path, kafka_settings=REPLICATED
    ) as pipe:
        settle(pipe, legacy, commerce, 180, revive=False)  # the initial snapshot
        assert_replicated(cluster, pipe.scenario)
        payment = f"{pipe.scenario.prefix}.payment"
        leaders = collections.Counter(p.leader for p in cluster.partitions(payment).values())
        victim = leaders.most_common(1)[0][0]
        traffic = Traffic(legacy, rate=150, duration=20, seed=31)
        time.sleep(5)
        try:
            cluster.kill_node(victim)
            assert write_canaries(legacy) > 0  # written while the leader is dead
            wait_for(
                lambda: victim not in {p.leader for p in cluster.partitions(payment).values()},
                60,
                "new leaders of the payment partitions",
            )
            traffic.join()
            assert not traffic.errors, traffic.errors
            # With the broker still dead: no process stopped, nothing was lost.
            settle(pipe, legacy, commerce, 180, revive=False)
        finally:
            cluster.up()
        assert_running(pipe)
        count = assert_no_duplicates(pipe)
        finish(pipe, legacy, commerce)
    print(f"leader kill -9: broker {victim} led {leaders[victim]} of 3; {count} events, no dupes")


@pytest.mark.faults
def test_rolling_restart_of_all_three_brokers(
    cluster: ClusterStack, cluster_dbs: tuple[str, str], tmp_path: Path
) -> None:
    legacy, commerce = cluster_dbs
    with running_pipeline(
        legacy, commerce, cluster.bootstrap, tmp_path, kafka_settings=REPLICATED
    ) as pipe:
        settle(pipe, legacy, commerce, 180, revive=False)
        topics = [*pipe.scenario.topics(), "__consumer_offsets"]
        traffic = Traffic(legacy, rate=100, duration=45, seed=32)
        t0 = time.monotonic()
        for node in (1, 2, 3):
            cluster.stop_node(node)
            assert write_canaries(legacy) > 0
            assert_running(pipe)
            cluster.up()  # this node again, waiting until all three brokers answer
            # Only then the next one: with two replicas out of sync, acks=all would stop.
            wait_for(lambda: cluster.in_sync(topics), 120, f"node {node} back in sync")
        rolled = time.monotonic() - t0
        traffic.join()
        assert not traffic.errors, traffic.errors
        settle(pipe, legacy, commerce, 180, revive=False)
        assert_no_duplicates(pipe)
        finish(pipe, legacy, commerce)
    print(f"rolling restart of 3 brokers under the workload: {rolled:.0f} s, no process restarted")


def _producer_events(pipe: Pipeline, event: str) -> list[str]:
    return [line for line in pipe.producer_log().splitlines() if f'"{event}"' in line]


@pytest.mark.faults
def test_two_brokers_down_then_one_back(
    cluster: ClusterStack, cluster_dbs: tuple[str, str], tmp_path: Path
) -> None:
    legacy, commerce = cluster_dbs
    # The producer's walsender ends a stream it hears nothing from for wal_sender_timeout: 5 s
    # here (60 s by default), far less than the outage, so the producer must keep it alive
    # while it waits for the acks.
    legacy = make_conninfo(legacy, options="-c wal_sender_timeout=5s")
    with running_pipeline(
        legacy, commerce, cluster.bootstrap, tmp_path, kafka_settings=REPLICATED
    ) as pipe:
        settle(pipe, legacy, commerce, 180, revive=False)
        try:
            cluster.kill_node(2)
            cluster.kill_node(3)
            time.sleep(3.0)  # a checkpoint acknowledged just before the kills may still advance
            before, _ = pipe.scenario.slot_state()
            run_workload(legacy, rate=100, max_transactions=200, seed=33)
            assert write_canaries(legacy) > 0
            # The producer waits (no delivery timeout yet), says why, and does not advance.
            wait_for(
                lambda: bool(_producer_events(pipe, "producer.awaiting_acks")),
                60,
                "the producer to say why it waits",
            )
            after, _ = pipe.scenario.slot_state()
            assert after == before, f"slot moved from {before} to {after} without acks"
            assert_running(pipe)
            cluster.start_node(2)  # one back: a quorum of two, two in-sync replicas
            wait_for(lambda: pipe.scenario.slot_state()[0] != before, 180, "the slot to advance")
            settle(pipe, legacy, commerce, 180, revive=False)
        finally:
            cluster.up()
        why = _producer_events(pipe, "producer.awaiting_acks")[0]
        assert "min.insync.replicas" in why and "slot is not advanced" in why, why
        assert_running(pipe)
        assert_no_duplicates(pipe)
        finish(pipe, legacy, commerce)
