"""The producer under faults: kill -9, crash points, SIGTERM, a second producer, a moved slot,
failed deliveries, a 1,000,000-row transaction.

"Nothing lost" is checked against a REFERENCE: a second slot and publication on the same database,
created at the same moment, drained once by a producer that nobody disturbs. Every streamed
change the reference delivers must be delivered by the faulted producer with the same position
(lsn, seq) and the same content; the faulted one may deliver duplicates, never anything else.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools import harness
from devtools.harness import Scenario, open_scenario
from devtools.workload import prefill, run_workload
from tests.integration.producer_support import drain, positions, sigterm_mid_stream

pytestmark = pytest.mark.integration


@pytest.fixture
def pair(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[Scenario, Scenario]]:
    """(under test, reference): two pipelines on one database, initialised together."""
    with (
        open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path) as under_test,
        open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path) as reference,
    ):
        harness.init(under_test)
        harness.init(reference)
        yield under_test, reference


def assert_nothing_lost(under_test: Scenario, reference: Scenario) -> None:
    drain(reference)
    want = positions(reference)
    got = positions(under_test)
    assert want, "the reference delivered nothing: the test wrote no data"
    missing = sorted(set(want) - set(got))
    assert not missing, f"{len(missing)} changes lost, first {missing[:5]}"
    assert set(got) == set(want)
    for pos, content in want.items():
        assert got[pos] == content


def test_kill_9_at_random_moments_loses_nothing(pair: tuple[Scenario, Scenario]) -> None:
    under_test, reference = pair
    prefill(under_test.source_dsn, orders=300, seed=2)
    writer = threading.Thread(
        target=run_workload,
        args=(under_test.source_dsn,),
        kwargs={"rate": 800, "duration": 8, "seed": 4, "bulk_every": 500},
    )
    writer.start()
    rng = random.Random(9)
    kills = 0
    try:
        while writer.is_alive() or kills < 3:
            proc = under_test.start_produce("--no-initial-snapshot")
            time.sleep(rng.uniform(0.6, 2.0))
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            kills += 1
    finally:
        writer.join()
    drain(under_test)
    assert_nothing_lost(under_test, reference)


@pytest.mark.parametrize("point", ["after_produce_before_ack", "after_ack_before_advance"])
def test_named_crash_points_lose_nothing(pair: tuple[Scenario, Scenario], point: str) -> None:
    under_test, reference = pair
    prefill(under_test.source_dsn, orders=200, seed=1)
    run_workload(under_test.source_dsn, rate=5000, max_transactions=300, seed=6)
    slot_before, _ = under_test.slot_state()
    crashed = under_test.cli(
        "produce", "--no-initial-snapshot", extra_env={"CUTOVER_CRASH_AT": point}
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    slot_after, _ = under_test.slot_state()
    assert slot_after == slot_before  # no advance happened before the crash
    with psycopg.connect(under_test.source_dsn) as conn:
        row = conn.execute(
            "SELECT delivered_lsn FROM cutover.producer_state WHERE slot_name = %s",
            (under_test.slot,),
        ).fetchone()
    assert row is not None
    if point == "after_ack_before_advance":
        # Recorded (write-ahead) but not advanced: the restart must not call it slot loss.
        assert slot_after is not None and row[0] > slot_after
    else:
        assert row[0] == slot_after
    report = drain(under_test)
    assert report["events"] > 0
    assert_nothing_lost(under_test, reference)


def test_sigterm_finishes_deliveries_advances_and_exits_0(
    pair: tuple[Scenario, Scenario],
) -> None:
    under_test, reference = pair
    sigterm_mid_stream(under_test, reference, rate=1000, duration=8, seed=12)


def test_sigterm_while_starting_is_a_clean_stop(pair: tuple[Scenario, Scenario]) -> None:
    """A supervisor's stop during the imports (a second or more on a busy host) used to kill the
    producer by SIGTERM's default action (exit -15); now it is remembered and ends it cleanly."""
    under_test, _ = pair
    proc = under_test.start_produce("--no-initial-snapshot")
    time.sleep(0.3)  # the interpreter is up, the CLI's imports are not done
    assert harness.stop(proc, signal.SIGTERM) == 0, under_test.log_path.read_text()[-3000:]
    stopped = [e for e in under_test.log_events() if e["event"] == "producer.stopped"]
    assert stopped and stopped[-1]["reason"] == "signal"


def test_second_producer_on_the_same_slot_is_refused(pair: tuple[Scenario, Scenario]) -> None:
    under_test, _ = pair
    first = under_test.start_produce("--no-initial-snapshot")
    try:
        deadline = time.monotonic() + 30
        while not any(e["event"] == "producer.started" for e in under_test.log_events()):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = under_test.cli("produce", "--no-initial-snapshot", "--exit-when-idle")
        assert second.returncode == 1
        assert f"another producer is already running on slot {under_test.slot}" in second.stderr
        assert "backend pid" in second.stderr
    finally:
        assert harness.stop(first) == 0


def test_slot_moved_or_dropped_behind_our_back_is_refused(pair: tuple[Scenario, Scenario]) -> None:
    scenario, _ = pair
    drain(scenario)
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (1, 'a', 'A')")
        conn.execute(
            "SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (scenario.slot,)
        )
    moved = scenario.cli("produce", "--exit-when-idle")
    assert moved.returncode == 3
    assert f"slot {scenario.slot} is at" in moved.stderr and "AHEAD" in moved.stderr
    assert "re-snapshot required" in moved.stderr
    # Recovery: accept the position and snapshot again.
    assert scenario.cli("init", "--resnapshot").returncode == 0
    report = json.loads(scenario.cli("produce", "--exit-when-idle", "--json").stdout)
    assert report["snapshot_rows"] == 1

    scenario.drop_slot()
    dropped = scenario.cli("produce", "--exit-when-idle")
    assert dropped.returncode == 3 and "does not exist" in dropped.stderr
    recreated = harness.init(scenario)
    assert any("changes in between were not captured" in w for w in recreated["warnings"])
    still = scenario.cli("produce", "--exit-when-idle")
    assert still.returncode == 3 and "re-snapshot required" in still.stderr


def test_failed_deliveries_stop_without_advancing(pair: tuple[Scenario, Scenario]) -> None:
    scenario, _ = pair
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (1, 'a', 'A')")
    before, _ = scenario.slot_state()
    # The broker refuses every message of the data topic: deliveries fail asynchronously.
    _topic_config(scenario, f"{scenario.prefix}.data", "max.message.bytes", "100")
    failed = scenario.cli("produce", "--exit-when-idle", "--no-initial-snapshot")
    assert failed.returncode == 3
    assert "kafka:" in failed.stderr and "the slot is not advanced" in failed.stderr
    assert "MSG_SIZE_TOO_LARGE" in failed.stderr
    assert scenario.slot_state()[0] == before
    _topic_config(scenario, f"{scenario.prefix}.data", "max.message.bytes", "1048588")
    assert drain(scenario)["events"] == 1


def _topic_config(scenario: Scenario, topic: str, key: str, value: str) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource

    admin = AdminClient({"bootstrap.servers": scenario.bootstrap})
    entry = ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource("topic", topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


@pytest.mark.faults
def test_million_row_transaction_streams_with_bounded_memory(
    pair: tuple[Scenario, Scenario],
) -> None:
    scenario, _ = pair
    rows = 1_000_000
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shop.order_items (order_id, line_no, product_id, qty, unit_price_idr)"
            " SELECT g / 8, g %% 8, g %% 997, 1 + g %% 5, (g %% 100000) / 100.0"
            " FROM generate_series(0, %s - 1) g",
            (rows,),
        )
    started = time.monotonic()
    proc = subprocess.run(
        [
            *scenario_cli(scenario),
            "produce", "--exit-when-idle", "--no-initial-snapshot", "--json",
        ],
        env=scenario.env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    # The producer's own VmHWM (/proc/self/status). Not ru_maxrss of the child: Linux carries
    # it across fork+exec, so it would include this (big) test process's peak.
    print(f"1M-row tx: {elapsed:.1f} s, producer peak RSS {report['peak_rss_kb'] / 1024:.0f} MB")
    assert report["events"] == rows
    assert report["peak_rss_kb"] <= 300 * 1024
    # Every event is in the topic (counted by offsets: decoding a million is the bench's job).
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": scenario.bootstrap, "group.id": "count"})
    try:
        topic = f"{scenario.prefix}.payment"
        total = sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(scenario.partitions)
        )
    finally:
        consumer.close()
    beats = total - rows
    assert 0 <= beats <= 10 * scenario.partitions


def scenario_cli(scenario: Scenario) -> list[str]:
    import sys

    scenario.write_config()
    return [sys.executable, "-m", "cli.entry", "--config", str(scenario.config)]


def test_snapshot_resumes_after_kill_9(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    with open_scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, chunk_rows=100
    ) as scenario:
        prefill(scenario.source_dsn, orders=3000, seed=4)
        harness.init(scenario)
        proc = scenario.start_produce()
        deadline = time.monotonic() + 60
        # Kill it in the middle of the initial load, after a few chunks were recorded.
        while sum(e["event"] == "snapshot.chunk_done" for e in scenario.log_events()) < 15:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with psycopg.connect(scenario.source_dsn) as conn:
            done_before = conn.execute(
                "SELECT coalesce(sum(p.chunks), 0) FROM cutover.snapshot_progress p"
                " JOIN cutover.snapshot_requests r ON r.id = p.request_id WHERE r.slot_name = %s",
                (scenario.slot,),
            ).fetchone()
        assert done_before is not None and done_before[0] >= 15
        first_run = len(scenario.log_events())
        result = scenario.cli("produce", "--exit-when-idle", "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        # The restart continued where the record says, it did not start the load again.
        restarted = [
            json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")
        ]
        chunks = [e for e in restarted if e["event"] == "snapshot.chunk_done"]
        before = [e for e in scenario.log_events()[:first_run] if e["event"] == "snapshot.done"]
        finished = {e["table"] for e in before}
        assert "users" in finished  # the first table was loaded before the kill...
        assert chunks and not finished & {e["table"] for e in chunks}  # ...and not again
        assert sum(len(e) > 0 for e in chunks) + int(done_before[0]) >= 3000 // 100
        events = scenario.read()
        with psycopg.connect(scenario.source_dsn) as conn:
            published: dict[str, list[str]] = dict(
                conn.execute(
                    "SELECT tablename, attnames FROM pg_publication_tables WHERE pubname = %s",
                    (scenario.publication,),
                ).fetchall()
            )
        for table, pk in (("users", ("id",)), ("order_items", ("order_id", "line_no"))):
            # Every published value, not only the keys: a resumed chunk must carry the data.
            columns = list(published[table])
            want = harness.source_state(scenario.source_dsn, "shop", table, columns, pk)
            got = harness.last_state(events, table, pk)
            assert set(got) == set(want)
            for key, row in want.items():
                assert {c: got[key][c] for c in columns} == row, f"{table} {key}"
