"""The fault matrix (README, Tests), end to end: legacy → `cutover produce` → Kafka → `cutover
apply` × 2 → commerce, while the workload writes, with one fault injected per test.

After each fault: the commerce DB equals the legacy DB mapped by hand (``shop_compare``, not
``cutover verify``); the canaries written to the excluded columns (users.handle, bio,
follower_count) are in no topic byte, no commerce table and no process log; every process that
stopped did so with exit 3 and a clear message, and was restarted by the test.

Tests that kill a server run on a PRIVATE stack (``devtools.stack`` in a temporary folder, one per
module) so the shared stack is never disturbed; servers are restored in ``finally`` and the stack
is stopped at the end. The others use fresh databases on the shared stack.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.harness import changes
from devtools.workload import ROLLBACK_MARKER, run_workload
from producers.run_options import CRASH_POINTS
from tests.integration.faults_support import (
    Pipeline,
    PrivateStack,
    Traffic,
    assert_no_canary,
    assert_no_rollback_marker,
    fresh_databases,
    private_stack,
    running_pipeline,
    wait_equal,
    wait_for,
    write_canaries,
)
from tests.integration.shop_compare import compare

# One worker runs the private stacks one after the other: two at once overload 2 cores.
pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.xdist_group("private_stack")]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pstack() -> Iterator[PrivateStack]:
    """One private stack for the server-killing tests of this module."""
    with private_stack() as ps:
        yield ps


@pytest.fixture
def private_dbs(pstack: PrivateStack) -> Iterator[tuple[str, str]]:
    pstack.restore()  # whatever the previous test did, every server runs
    with fresh_databases(pstack) as dbs:
        yield dbs


def settle(pipe: Pipeline, legacy: str, commerce: str, timeout: float, revive: bool) -> float:
    """Wait until commerce equals legacy; dead processes are restarted (``revive``) or fail the
    test at once with their log. Seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        if revive:
            pipe.revive()
        else:
            dead = pipe.dead_appliers()
            code = pipe.producer_code()
            assert not dead and code is None, (
                f"process ended: appliers {dead}, producer {code}\n{pipe.log_text()[-4000:]}"
            )
        try:
            if all(d.ok for d in compare(legacy, commerce)):
                return time.monotonic() - t0
        except psycopg.OperationalError:
            pass
        if time.monotonic() > deadline:
            wait_equal(legacy, commerce, 0)  # fails with the differences
            raise AssertionError("unreachable")
        time.sleep(1.0)


def finish(pipe: Pipeline, legacy: str, commerce: str) -> None:
    """Everything stops cleanly on SIGTERM; no canary anywhere."""
    codes = pipe.stop_all()
    assert all(c == 0 for c in codes.values()), (codes, pipe.log_text()[-4000:])
    assert_no_canary(pipe.scenario, commerce, pipe.log_paths())


def assert_clear_exits(pipe: Pipeline, *clues: str) -> list[tuple[str, int]]:
    """Every process that ended on its own (not killed by the test) exited 3 and said why, in
    its log, with one of ``clues``."""
    ended = [(n, c) for n, c in pipe.exits if c != -9]
    assert all(code == 3 for _, code in ended), (ended, pipe.log_text()[-4000:])
    if ended:
        text = pipe.log_text()
        assert "error:" in text and any(clue in text for clue in clues), (
            f"exits {ended} without a clear message naming one of {clues}:\n{text[-4000:]}"
        )
    return ended


# --------------------------------------------------------------------------- 1. broker kill -9


def test_broker_kill_9_and_restart(
    pstack: PrivateStack, private_dbs: tuple[str, str], tmp_path: Path
) -> None:
    legacy, commerce = private_dbs
    bootstrap = pstack.env()["CUTOVER_KAFKA_BOOTSTRAP"]
    with running_pipeline(legacy, commerce, bootstrap, tmp_path) as pipe:
        settle(pipe, legacy, commerce, 180, revive=False)  # the initial snapshot
        traffic = Traffic(legacy, rate=150, duration=20, seed=21)
        time.sleep(5)
        try:
            killed = pstack.kill_kafka()
            assert not pstack.kafka_alive()
            assert write_canaries(legacy) > 0  # streamed while the broker is dead
            time.sleep(6)
        finally:
            pstack.up()  # restarts the dead broker on the same ports and data
        assert pstack.state.kafka_pid != killed and pstack.kafka_alive()
        traffic.join()
        assert not traffic.errors, traffic.errors
        assert write_canaries(legacy) > 0  # again: the workload overwrote some of them
        settle(pipe, legacy, commerce, 240, revive=True)
        ended = assert_clear_exits(pipe, "kafka")
        assert '"apply.kafka_error"' in pipe.log_text(), "the outage reached no consumer"
        finish(pipe, legacy, commerce)
    print(f"broker kill -9: processes that exited and were restarted: {ended}")


# ------------------------------------------------------- 2. broker down > delivery timeout


def test_broker_down_longer_than_delivery_timeout(
    pstack: PrivateStack, private_dbs: tuple[str, str], tmp_path: Path
) -> None:
    legacy, commerce = private_dbs
    bootstrap = pstack.env()["CUTOVER_KAFKA_BOOTSTRAP"]
    timeout_ms = 6_000
    with running_pipeline(
        legacy, commerce, bootstrap, tmp_path, producer_settings={"message.timeout.ms": timeout_ms}
    ) as pipe:
        settle(pipe, legacy, commerce, 180, revive=False)
        try:
            pstack.kill_kafka()
            time.sleep(1.0)  # a checkpoint acknowledged just before the kill may still advance
            before, _ = pipe.scenario.slot_state()
            run_workload(legacy, rate=100, max_transactions=300, seed=22)
            assert write_canaries(legacy) > 0
            assert pipe.producer is not None
            code = pipe.producer.wait(timeout=timeout_ms / 1000 + 90)
            after, _ = pipe.scenario.slot_state()
        finally:
            pstack.up()
        log = pipe.producer_log()
        assert code == 3, log[-3000:]
        assert "cutover produce: error: kafka:" in log, log[-3000:]
        assert "timed out" in log.lower(), log[-3000:]
        assert "the slot is not advanced" in log, log[-3000:]
        assert after == before, f"slot moved from {before} to {after} without acknowledgements"
        pipe.reap_producer()
        pipe.start_producer()
        settle(pipe, legacy, commerce, 240, revive=True)
        assert_clear_exits(pipe, "kafka", "timed out")
        finish(pipe, legacy, commerce)


# ------------------------------------------------------- 3. legacy DB immediate shutdown


def test_legacy_db_immediate_shutdown_and_restart(
    pstack: PrivateStack, private_dbs: tuple[str, str], tmp_path: Path
) -> None:
    legacy, commerce = private_dbs
    bootstrap = pstack.env()["CUTOVER_KAFKA_BOOTSTRAP"]
    with running_pipeline(legacy, commerce, bootstrap, tmp_path) as pipe:
        settle(pipe, legacy, commerce, 180, revive=False)
        traffic = Traffic(legacy, rate=150, duration=8, seed=31)
        time.sleep(4)
        try:
            pstack.pg_immediate_stop("legacy")
            time.sleep(4)
        finally:
            pstack.pg_start("legacy")
        traffic.join()
        # The workload itself may lose its connection: only with a clear source-side error.
        for exc in traffic.errors:
            assert "database" in str(exc), repr(exc)
        wait_for(lambda: pipe.producer_code() is not None or _alive_for(pipe, 5), 60, "producer")
        code = pipe.producer_code()
        if code is not None:
            log = pipe.producer_log()
            assert code == 3, log[-3000:]
            assert "cutover produce: error: source database" in log, log[-3000:]
        # More traffic after the restart, and canaries on the streaming path.
        run_workload(legacy, rate=150, duration=4, seed=32)
        assert write_canaries(legacy) > 0
        settle(pipe, legacy, commerce, 240, revive=True)
        ended = assert_clear_exits(pipe, "source database")
        finish(pipe, legacy, commerce)
    print(f"legacy DB immediate shutdown: exits {ended}")


def _alive_for(pipe: Pipeline, seconds: float) -> bool:
    """True when the producer is still running ``seconds`` later (it rode the outage out)."""
    time.sleep(seconds)
    return pipe.producer_code() is None


# ------------------------------------------------------- 4. commerce DB immediate shutdown


def test_commerce_db_immediate_shutdown_mid_batch(
    pstack: PrivateStack, private_dbs: tuple[str, str], tmp_path: Path
) -> None:
    legacy, commerce = private_dbs
    bootstrap = pstack.env()["CUTOVER_KAFKA_BOOTSTRAP"]
    with running_pipeline(
        legacy, commerce, bootstrap, tmp_path, apply_args=("--db-retry", "60"), orders=2_000
    ) as pipe:
        traffic = Traffic(legacy, rate=150, duration=12, seed=41)

        def applying() -> bool:
            try:
                with psycopg.connect(commerce, connect_timeout=2) as conn:
                    row = conn.execute("SELECT count(*) FROM commerce.order_lines").fetchone()
                return row is not None and row[0] > 500
            except psycopg.Error:
                return False

        wait_for(applying, 120, "the consumers to be applying the snapshot", every=0.2)
        try:
            pstack.pg_immediate_stop("commerce")
            assert write_canaries(legacy) > 0
            time.sleep(5)
        finally:
            pstack.pg_start("commerce")
        traffic.join()
        assert not traffic.errors, traffic.errors
        assert write_canaries(legacy) > 0  # again: the workload overwrote some of them
        settle(pipe, legacy, commerce, 240, revive=True)
        ended = assert_clear_exits(pipe, "commerce database unavailable", "target database")
        text = pipe.log_text()
        assert '"apply.db_retry"' in text or ended, "the fault did not reach any consumer"
        finish(pipe, legacy, commerce)
    print(f"commerce DB immediate shutdown: exits {ended}")


# ------------------------------------------ 5. process kills, rollbacks, unchanged TOAST


def test_process_kills_rollbacks_and_unchanged_toast_under_workload(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    legacy, commerce = fresh_legacy, fresh_commerce
    rng = random.Random(5)
    with running_pipeline(legacy, commerce, kafka_bootstrap, tmp_path) as pipe:
        traffic = Traffic(legacy, rate=200, duration=40, seed=51)
        time.sleep(3)
        # The producer killed at each named crash point, then restarted normally.
        for point in CRASH_POINTS:
            pipe.kill_producer()
            pipe.start_producer(extra_env={"CUTOVER_CRASH_AT": point})
            assert pipe.producer is not None
            code = pipe.producer.wait(timeout=120)
            assert code == -9, (point, code, pipe.producer_log()[-3000:])
            pipe.reap_producer()
            pipe.start_producer()
            time.sleep(2)
        # A consumer killed at each named crash point: right before and right after the
        # commerce COMMIT of a batch, then restarted normally.
        for point in ("apply_before_commit", "apply_after_commit"):
            pipe.kill_apply("c0")
            pipe.start_apply("c0", extra_env={"CUTOVER_CRASH_AT": point})
            code = pipe.appliers["c0"].wait(timeout=120)
            assert code == -9, (point, code)
            pipe.start_apply("c0")
            time.sleep(1)
        # Consumers killed -9 (mid-batch or between batches), one after the other.
        for name in ("c0", "c1"):
            time.sleep(rng.uniform(0.5, 2.5))
            pipe.kill_apply(name)
            pipe.start_apply(name)
        assert write_canaries(legacy) > 0
        # The producer killed -9 at random moments.
        for _ in range(2):
            time.sleep(rng.uniform(1.0, 4.0))
            pipe.kill_producer()
            pipe.start_producer()
        traffic.join()
        assert not traffic.errors, traffic.errors
        assert write_canaries(legacy) > 0  # again: the workload overwrote some of them
        assert traffic.report is not None and traffic.report.rolled_back > 0, traffic.report
        settle(pipe, legacy, commerce, 300, revive=False)
        assert_clear_exits(pipe)
        finish(pipe, legacy, commerce)

        # Rolled-back transactions never appear; unchanged TOAST updates were exercised.
        assert_no_rollback_marker(pipe.scenario, commerce, ROLLBACK_MARKER)
        events = changes(pipe.scenario.read())
        toast = [e for e in events if e.record["op"] == "u" and e.record.get("unchanged_toast")]
        assert toast, "no update with an unchanged TOAST value was streamed: the case is void"
        with psycopg.connect(commerce) as conn:
            row = conn.execute(
                "SELECT count(*) FROM commerce.listings WHERE length(description) > 2000"
            ).fetchone()
        assert row is not None and row[0] > 0


# ------------------------------------------------------- 6. slot moved behind our back


def _advance_slot_behind_back(pipe: Pipeline, legacy: str) -> None:
    with psycopg.connect(legacy, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (pipe.scenario.slot,)
        )


def test_slot_advanced_behind_the_producers_back_then_resnapshot(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    legacy, commerce = fresh_legacy, fresh_commerce
    with running_pipeline(legacy, commerce, kafka_bootstrap, tmp_path) as pipe:
        run_workload(legacy, rate=200, duration=3, seed=61)
        settle(pipe, legacy, commerce, 180, revive=False)
        assert pipe.producer is not None
        pipe.producer.terminate()
        assert pipe.producer.wait(timeout=60) == 0
        pipe.reap_producer()
        # Changes (inserts, updates, deletes) the slot then skips: nobody will stream them.
        run_workload(legacy, rate=300, max_transactions=400, seed=62)
        assert write_canaries(legacy) > 0
        _advance_slot_behind_back(pipe, legacy)
        pipe.start_producer()
        assert pipe.producer is not None
        code = pipe.producer.wait(timeout=90)
        log = pipe.producer_log()
        assert code == 3, log[-3000:]
        assert "AHEAD" in log and "re-snapshot required" in log, log[-3000:]
        pipe.reap_producer()
        resnap = pipe.scenario.cli("init", "--resnapshot")
        assert resnap.returncode == 0, resnap.stderr
        pipe.start_producer()
        run_workload(legacy, rate=200, duration=3, seed=63)
        # The skipped range held deletes (order edits remove lines, listings are hard-deleted):
        # the re-snapshot must remove those rows from commerce too, not only upsert live rows.
        settle(pipe, legacy, commerce, 120, revive=False)
        finish(pipe, legacy, commerce)


def test_slot_dropped_behind_the_producers_back_then_resnapshot(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """As above with a dropped slot; the skipped range holds inserts and updates only, so this
    case does not depend on deletes being repaired."""
    legacy, commerce = fresh_legacy, fresh_commerce
    with running_pipeline(legacy, commerce, kafka_bootstrap, tmp_path) as pipe:
        run_workload(legacy, rate=200, duration=3, seed=71)
        settle(pipe, legacy, commerce, 180, revive=False)
        assert pipe.producer is not None
        pipe.producer.terminate()
        assert pipe.producer.wait(timeout=60) == 0
        pipe.reap_producer()
        pipe.scenario.drop_slot()
        with psycopg.connect(legacy, autocommit=True) as conn:
            conn.execute(
                "UPDATE shop.products SET stock = stock + 7, updated_at = updated_at"
                " + interval '1 s' WHERE id % 3 = 0"
            )
            conn.execute(
                "UPDATE shop.orders SET status = 'cancelled', updated_at = updated_at"
                " + interval '1 s' WHERE id IN (SELECT id FROM shop.orders ORDER BY id LIMIT 20)"
            )
            conn.execute(
                "INSERT INTO shop.users (id, handle, display_name) VALUES (%s, %s, 'Skipped')",
                (9_000_001, f"skipped_{pipe.scenario.tag}"),
            )
        assert write_canaries(legacy) > 0
        pipe.start_producer()
        assert pipe.producer is not None
        code = pipe.producer.wait(timeout=90)
        log = pipe.producer_log()
        assert code == 3, log[-3000:]
        assert "does not exist" in log and "re-snapshot required" in log, log[-3000:]
        pipe.reap_producer()
        # `cutover init` recreates the slot, but the producer still refuses until a re-snapshot.
        recreated = pipe.scenario.cli("init", "--json")
        assert recreated.returncode == 0, recreated.stderr
        pipe.start_producer()
        assert pipe.producer is not None
        code = pipe.producer.wait(timeout=90)
        assert code == 3 and "re-snapshot required" in pipe.producer_log()[len(log) :]
        pipe.reap_producer()
        resnap = pipe.scenario.cli("init", "--resnapshot")
        assert resnap.returncode == 0, resnap.stderr
        pipe.start_producer()
        run_workload(legacy, rate=200, duration=3, seed=73)
        settle(pipe, legacy, commerce, 180, revive=False)
        finish(pipe, legacy, commerce)
