"""Verify under a live workload reports no false mismatch.

The apply consumer is simulated (it is developed in parallel): :class:`LaggingConsumer` copies
legacy snapshots into commerce about one second late, atomically, and records the position each
snapshot holds for in ``cutover.consumer_offsets``, while ``cutover workload`` writes to legacy.
Verify sees plenty of differences in its first pass (commerce is behind); every one must turn
out to be lag once the consumer passes the legacy snapshot position, and none may be reported.
A real difference planted in the same conditions is still found.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from control.verify import VerifyOptions, run_verify
from cutover.config import Settings
from devtools import workload
from tests.integration.test_verify_support import (
    LaggingConsumer,
    drop_slot,
    make_settings,
    mapping,
    seed,
    stage_pipeline,
)

pytestmark = pytest.mark.integration

OPTIONS = VerifyOptions(chunk_rows=2_000, fetch_rows=200, buckets=8, recheck_timeout_s=30)


@pytest.fixture
def live(fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str) -> Iterator[Settings]:
    settings = make_settings(fresh_legacy, fresh_commerce, kafka_bootstrap)
    seed(settings, orders=1500)
    stage_pipeline(settings)  # consumer_offsets rows for every partition (the lag source)
    try:
        yield settings
    finally:
        drop_slot(settings)  # slots are cluster-wide: never leave one behind


def test_no_false_mismatch_under_a_live_workload(live: Settings) -> None:
    stop = threading.Event()
    reports = []

    def traffic() -> None:
        # ~150 transactions/s in rounds, until the verifies are done
        seed_no = 20
        while not stop.is_set():
            workload.run_workload(live.source.dsn, rate=150, duration=1.0, seed=seed_no)
            seed_no += 1

    with LaggingConsumer(live, delay_s=1.0, every_s=0.3) as consumer:
        writer = threading.Thread(target=traffic, daemon=True)
        writer.start()
        try:
            consumer.wait_rounds(2)
            reports.append(run_verify(live, mapping(), actor="live-test", options=OPTIONS))
        finally:
            stop.set()
            writer.join(timeout=30)
        assert consumer.error is None, consumer.error
        assert consumer.rounds > 3
    for report in reports:
        assert report.passed, report.mismatch_summary()
    transient = sum(t.transient for r in reports for t in r.tables)
    differing = sum(t.chunks_differing for r in reports for t in r.tables)
    # the test is only meaningful if verify really saw commerce lagging behind
    assert differing > 0 and transient > 0, (differing, transient)
    assert all(r.applied_lsn["payment"] is not None for r in reports)


def test_a_real_difference_is_still_found_while_lagging(live: Settings) -> None:
    stop = threading.Event()

    def traffic() -> None:
        seed_no = 40
        while not stop.is_set():
            workload.run_workload(live.source.dsn, rate=100, duration=1.0, seed=seed_no)
            seed_no += 1

    # A consumer bug: line 1 of order 3 always gets the wrong listing (inside the apply
    # transaction, so no reader ever sees it right).
    bug = (
        "UPDATE commerce.order_lines SET listing_id = listing_id + 1 "
        "WHERE order_id = 3 AND line_no = 1"
    )
    with LaggingConsumer(live, delay_s=1.0, every_s=0.3, bug_sql=bug) as consumer:
        writer = threading.Thread(target=traffic, daemon=True)
        writer.start()
        try:
            consumer.wait_rounds(2)
            report = run_verify(live, mapping(), domain="payment", actor="t", options=OPTIONS)
        finally:
            stop.set()
            writer.join(timeout=30)
    assert not report.passed
    lines = next(t for t in report.tables if t.target == "order_lines")
    assert lines.different == 1 and lines.unresolved == 0
    assert lines.samples["different"] == [
        {"key": [3, 1], "kind": "different", "columns": ["listing_id"]}
    ]
    assert [t.target for t in report.tables if not t.passed] == ["order_lines"]
    assert all(i.passed for i in report.invariants)
