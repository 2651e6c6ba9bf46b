"""What the producer's fault tests share: events by position, a drain, a stop mid-stream.

Used by test_producer_faults.py (the default stream reader) and test_producer_stream_mode.py
(which keeps the same checks for the SQL reader), so both readers are held to one standard.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import psycopg

from devtools import harness
from devtools.harness import Scenario, changes
from devtools.workload import run_workload
from tests.integration.faults_support import wait_for

Position = tuple[int, int]


def positions(scenario: Scenario) -> dict[Position, tuple[Any, ...]]:
    """(lsn, seq) → content of every streamed change; duplicates must be identical."""
    out: dict[Position, tuple[Any, ...]] = {}
    for e in changes(scenario.read()):
        rec = e.record
        if rec["op"] == "r":
            continue
        src = rec["source"]
        content = (
            src["table"], rec["op"], e.raw.key, e.raw.partition,
            repr(rec["before"]), repr(rec["after"]), tuple(rec["unchanged_toast"]),
        )  # fmt: skip
        pos = (src["lsn"], src["seq"])
        assert out.setdefault(pos, content) == content, f"duplicate {pos} differs"
    return out


def drain(scenario: Scenario, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    result = scenario.cli(
        "produce", "--exit-when-idle", "--no-initial-snapshot", "--json", extra_env=extra_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def recorded(scenario: Scenario) -> int:
    """The producer's recorded delivered position (cutover.producer_state)."""
    with psycopg.connect(scenario.source_dsn) as conn:
        row = conn.execute(
            "SELECT delivered_lsn FROM cutover.producer_state WHERE slot_name = %s",
            (scenario.slot,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def sigterm_mid_stream(
    under_test: Scenario, reference: Scenario, *, rate: int, duration: float, seed: int
) -> None:
    """SIGTERM a producer after its first delivered batch, with the workload writing.

    It must exit 0 having confirmed exactly its recorded position, say it stopped on a signal,
    and have delivered every change the reference saw before that position.
    """
    writer = threading.Thread(
        target=run_workload,
        args=(under_test.source_dsn,),
        kwargs={"rate": rate, "duration": duration, "seed": seed},
    )
    proc = under_test.start_produce("--no-initial-snapshot")
    writer.start()
    # Mid-stream: once the producer delivered a batch (a fixed sleep lets a slow start under
    # load take the signal before any delivery, and the checks below then prove nothing).
    wait_for(
        lambda: any(
            e["event"] == "producer.batch_delivered" and e.get("events", 0) > 0
            for e in under_test.log_events()
        ),
        60,
        "the producer's first delivered batch",
        every=0.2,
    )
    assert harness.stop(proc, signal.SIGTERM) == 0
    writer.join()
    confirmed, _ = under_test.slot_state()
    assert confirmed is not None and confirmed == recorded(under_test)  # all delivered, advanced
    stopped = [e for e in under_test.log_events() if e["event"] == "producer.stopped"]
    assert stopped and stopped[-1]["reason"] == "signal"
    # Every change committed before the confirmed position is in Kafka already.
    drain(reference)
    want = {p for p in positions(reference) if p[0] < confirmed}
    assert want and want <= set(positions(under_test))
