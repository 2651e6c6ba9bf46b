"""The write cutover of one domain with a real forward pipeline (`cutover init`, `cutover
produce`, `cutover apply` processes): replicating → reads_switched → writes_switched →
reads_switched (rollback-writes) → writes_switched → completed. Step 2 of switch-writes waits for
the real appliers to pass the fence LSN; a stray write to fenced legacy is refused and nothing
of it reaches commerce; commerce and legacy agree at the end (independent comparison).

The reverse direction is staged as its producer and appliers would leave it (reverse slot on
commerce, a heartbeat in commerce's producer_state, the reverse appliers' offsets in legacy)
until the `reverse` helper's `produce --reverse` / `apply --reverse` are on main; the lead swaps
them in then.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from control.state import complete, rollback_writes, switch_reads, switch_writes
from control.verify import run_verify
from cutover import fence
from cutover.config import GateSettings, ReverseSettings, Settings
from cutover.control_store import ControlStore
from cutover.control_store import producer as producer_state
from cutover.mapping import load_mapping
from devtools.harness import Scenario, init, open_scenario, stop
from devtools.workload import prefill
from tests.integration.shop_compare import assert_commerce_matches_legacy, compare

pytestmark = pytest.mark.integration

FAR = 1 << 60


def _start_apply(scenario: Scenario) -> subprocess.Popen[bytes]:
    log = (scenario.workdir / "apply.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cli.entry", "--config", str(scenario.config), "--log-json",
         "apply"],
        env=scenario.env(), stdout=log, stderr=log,
    )  # fmt: skip


def _wait_equal(legacy: str, commerce: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.ok for d in compare(legacy, commerce)):
            return
        time.sleep(1.0)
    assert_commerce_matches_legacy(legacy, commerce)


def _stage_reverse(settings: Settings, domains: list[str]) -> None:
    """What the reverse producer and appliers leave behind (module doc)."""
    rev = settings.reverse
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [rev.slot])
        store = ControlStore(conn, settings.target.control_schema, "target")
        store.ensure("producer")
        producer_state.record_position(store, rev.slot, rev.publication, FAR, "test-reverse")
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        ControlStore(conn, rev.control_schema, "source").ensure("consumer")
        for d in domains:
            for p in range(settings.kafka.partitions):
                conn.execute(
                    "INSERT INTO cutover.consumer_offsets (group_id, topic, kafka_partition, "
                    "next_offset, last_source_lsn) VALUES (%s, %s, %s, 0, %s) "
                    "ON CONFLICT DO NOTHING",
                    [rev.group_id, settings.kafka.reverse_topic(d), p, FAR],
                )
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap})
    n = settings.kafka.partitions
    topics = [NewTopic(settings.kafka.reverse_topic(d), num_partitions=n) for d in domains]
    for fut in admin.create_topics(topics, operation_timeout=30).values():
        fut.result(timeout=30)


def _reverse_beat(settings: Settings) -> None:
    """The staged reverse producer is alive (a fresh heartbeat, as it records every interval)."""
    rev = settings.reverse
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        store = ControlStore(conn, settings.target.control_schema, "target")
        producer_state.record_position(store, rev.slot, rev.publication, FAR, "test-reverse")


def _unstage_reverse(settings: Settings, domains: list[str]) -> None:
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            [settings.reverse.slot],
        )
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap})
    topics = [settings.kafka.reverse_topic(d) for d in domains]
    for fut in admin.delete_topics(topics, operation_timeout=30).values():
        with suppress(Exception):  # best effort: topics of a scratch prefix
            fut.result(timeout=30)


def _fenced(settings: Settings, domain: str) -> tuple[bool, bool]:
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        on_legacy = fence.fence_states(conn, "cutover", side="source")[domain].fenced
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        on_commerce = fence.fence_states(conn, "cutover", side="target")[domain].fenced
    return on_legacy, on_commerce


def test_write_cutover_lifecycle_with_a_real_forward_pipeline(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefill(fresh_legacy, orders=300, seed=11)
    with open_scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=3
    ) as scenario:
        report = init(scenario)
        assert any(a["object"] == "write fence on legacy" for a in report["actions"])
        assert any(a["object"] == "write fence on commerce" for a in report["actions"])
        settings = replace(
            scenario.settings(),
            gates=GateSettings(min_reads_soak_minutes=0, min_writes_soak_minutes=0),
            reverse=ReverseSettings(slot=f"rev_{scenario.tag}"),
        )
        domains = list(load_mapping(settings.mapping_path).domains)
        mapping = load_mapping(settings.mapping_path)
        producer = scenario.start_produce()
        applier = _start_apply(scenario)
        _stage_reverse(settings, domains)
        try:
            _wait_equal(fresh_legacy, fresh_commerce, timeout=180)
            assert run_verify(settings, mapping, domain="data", actor="t").passed
            assert switch_reads(settings, domains, "data", actor="sre").outcome == "done"

            _reverse_beat(settings)
            out = switch_writes(settings, domains, "data", actor="sre")
            assert out.outcome == "done" and out.to_state == "writes_switched"
            assert out.detail["window_ms"] >= 0 and out.detail["verify_run"]
            assert _fenced(settings, "data") == (True, False)

            # A stray writer on legacy: refused, nothing written, nothing reaches commerce.
            with psycopg.connect(fresh_legacy) as app:
                with pytest.raises(psycopg.Error) as caught:
                    app.execute("UPDATE shop.users SET display_name = 'stray' WHERE id = 1")
                app.rollback()
            assert caught.value.sqlstate == "25006" and fence.is_fence_refusal(caught.value)
            # The legacy social app keeps writing the columns commerce never takes (init
            # narrowed the fence of shop.users to the mapped columns).
            with psycopg.connect(fresh_legacy, autocommit=True) as social:
                social.execute("UPDATE shop.users SET bio = 'still mine' WHERE id = 1")
            # The other domains' writes keep flowing through the real pipeline meanwhile.
            with psycopg.connect(fresh_legacy, autocommit=True) as app:
                app.execute("UPDATE shop.merchants SET shop_name = shop_name || '!' WHERE id = 1")

            back = rollback_writes(settings, domains, "data", actor="sre")
            assert back.outcome == "done" and _fenced(settings, "data") == (False, True)
            # Legacy takes the writes again; the forward applier still passes commerce's fence.
            with psycopg.connect(fresh_legacy, autocommit=True) as app:
                app.execute("UPDATE shop.users SET display_name = 'back' WHERE id = 1")
            _wait_equal(fresh_legacy, fresh_commerce, timeout=60)

            _reverse_beat(settings)
            again = switch_writes(settings, domains, "data", actor="sre")
            assert again.outcome == "done" and _fenced(settings, "data") == (True, False)
            done = complete(settings, domains, "data", actor="sre")
            assert done.outcome == "done" and done.to_state == "completed"
            assert _fenced(settings, "data") == (True, False)
            _wait_equal(fresh_legacy, fresh_commerce, timeout=60)

            # The CLI: status counts, and refusals by state (exit 1, JSON naming why).
            status = json.loads(scenario.cli("status", "--json", "--no-gates").stdout)
            assert (status["writes_on_commerce"], status["completed"]) == (1, 1)
            full = json.loads(scenario.cli("status", "--json").stdout)
            data = next(d for d in full["domains"] if d["domain"] == "data")
            assert data["gates"] == [] and data["gates_pass"]  # capture gates no longer apply
            text = scenario.cli("status", "--no-gates", extra_env={"COLUMNS": "200"})
            assert "writes on commerce 1" in text.stdout and "completed 1" in text.stdout
            refused = scenario.cli("switch-writes", "payment", "--dry-run", "--json")
            assert refused.returncode == 1, refused.stderr
            assert "switch-reads payment" in json.loads(refused.stdout)["message"]
            again_back = scenario.cli("rollback-writes", "data", "--yes")
            assert again_back.returncode == 1 and "completed" in again_back.stderr
        finally:
            codes = [stop(applier), stop(producer)]
            _unstage_reverse(settings, domains)
        assert codes == [0, 0]
