"""Issue 12's TRUNCATE row, end to end on the real stack: legacy → `cutover produce` → Kafka →
`cutover apply` × 2 → commerce, with the workload writing.

Before: a TRUNCATE of a published table stopped the producer for every domain, and the hint
(re-snapshot) led into a trap: commerce sat empty while the producer hit the same TRUNCATE again.
Now the TRUNCATE is carried (a truncate event on every partition of the table's domain topic, a
per-table horizon in commerce), or, with ``on_truncate = "stop"``, the producer stops naming the
command that resumes, and ``cutover init --resnapshot`` refuses while the TRUNCATE is ahead.
Each case ends with the independent comparison (commerce = mapped legacy) and `cutover verify`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from consumers.events import Change
from consumers.replay import Filters, Rate, play_to_target, record
from consumers.sink import Sink
from cutover.mapping import load_mapping
from devtools import harness
from devtools.apply_support import init_control
from tests.integration.conftest import EXAMPLES
from tests.integration.faults_support import Traffic, running_pipeline, wait_equal, wait_for
from tests.integration.shop_compare import compare

pytestmark = [pytest.mark.integration]

NEW_INVOICES = (10**9, 10**9 + 1)
INSERT_INVOICE = (
    "INSERT INTO shop.invoices (id, order_id, invoice_no, url, issued_at) SELECT %s, min(id),"
    " %s, 'https://shop.legacy.example/invoice/' || %s, now() FROM shop.orders"
)
# A user no workload transaction touches (ids far above the workload's).
MARK_USER = (
    "INSERT INTO shop.users (id, handle, display_name) VALUES (2000000000 + length(%s), %s, %s)"
)


def _truncate_and_insert(legacy: str, marker: str) -> None:
    """TRUNCATE with an insert in the same transaction and one right after; then a change of
    another domain (data) that must flow while the payment domain carries the TRUNCATE."""
    with psycopg.connect(legacy, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("TRUNCATE shop.invoices")
            no = f"INV-T-{NEW_INVOICES[0]}"
            conn.execute(INSERT_INVOICE, (NEW_INVOICES[0], no, no))
        no = f"INV-T-{NEW_INVOICES[1]}"
        conn.execute(INSERT_INVOICE, (NEW_INVOICES[1], no, no))
        conn.execute(MARK_USER, (marker, marker, marker))


def _scalar(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _invoices_equal(legacy: str, commerce: str) -> None:
    diffs = [d for d in compare(legacy, commerce) if d.table == "invoices"]
    assert diffs and all(d.ok for d in diffs), diffs


@pytest.fixture
def sandbox(target_dsn: str) -> Iterator[str]:
    from devtools.scratch import scratch_database

    for dsn in scratch_database(target_dsn, EXAMPLES / "commerce.sql", "truncate"):
        init_control(dsn)
        yield dsn


def test_truncate_mid_stream_is_carried_and_replayed(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path, sandbox: str
) -> None:
    legacy, commerce = fresh_legacy, fresh_commerce
    with running_pipeline(legacy, commerce, kafka_bootstrap, tmp_path, orders=300) as pipe:
        scenario = pipe.scenario
        traffic = Traffic(legacy, rate=150, duration=20, seed=73)
        # Mid-stream: commerce holds invoices (snapshot and streamed) when the TRUNCATE comes.
        wait_for(
            lambda: _scalar(commerce, "SELECT count(*) FROM commerce.invoices") != 0,
            120,
            "invoices in commerce",
        )
        time.sleep(2)
        _truncate_and_insert(legacy, "after truncate")
        # The other domains keep flowing while the workload runs, and the producer stays up.
        try:
            wait_for(
                lambda: _scalar(commerce, "SELECT count(*) FROM commerce.customers"
                                " WHERE display_name = 'after truncate'") == 1,
                120,
                "a change of another domain after the TRUNCATE",
            )  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{pipe.log_text()[-4000:]}") from None
        assert pipe.producer_code() is None, pipe.producer_log()[-3000:]
        traffic.join()
        assert not traffic.errors, traffic.errors
        wait_equal(legacy, commerce, 240)
        # The rows inserted in and right after the TRUNCATE's transaction survived it.
        ids = _scalar(commerce, "SELECT array_agg(invoice_id ORDER BY invoice_id)"
                      " FROM commerce.invoices WHERE invoice_id >= 1000000000")  # fmt: skip
        assert ids == list(NEW_INVOICES)
        assert pipe.producer_code() is None and not pipe.dead_appliers(), pipe.log_text()[-3000:]
        # Recorded as one TRUNCATE of shop.invoices, once its copy of every partition applied.
        query = "SELECT source_table, copies, rows_removed FROM cutover.truncates"
        wait_for(
            lambda: (
                _scalar(commerce, "SELECT max(copies) FROM cutover.truncates")
                == scenario.partitions
            ),
            60,
            "every partition's copy of the TRUNCATE",
        )
        with psycopg.connect(commerce) as conn:
            rows = conn.execute(query).fetchall()
        assert len(rows) == 1 and rows[0][0] == "shop.invoices" and rows[0][2] > 0, rows
        verify = scenario.cli("verify")
        assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
        # Audited once, and counted by the monitor.
        audit = scenario.cli("audit", "--json")
        assert audit.returncode == 0, audit.stderr[-2000:]
        entries = [e for e in json.loads(audit.stdout) if e["command"] == "truncate"]
        assert len(entries) == 1 and entries[0]["domain"] == "payment", entries
        assert entries[0]["detail"]["source_table"] == "shop.invoices"
        monitor = scenario.cli("monitor", "--once", "--json")
        assert monitor.returncode == 0, monitor.stderr[-2000:]
        assert json.loads(monitor.stdout)["truncates_applied"] == {"shop.invoices": 1}

        # A replay of the payment topic into a sandbox applies the TRUNCATE the same way.
        settings = scenario.settings()
        out = tmp_path / "payment.avro"
        record(settings.kafka, settings.kafka.topic("payment"), out, Filters())
        played = play_to_target(settings, out, sandbox, Filters(), Rate())
        assert played.dead_letters == 0
        _invoices_equal(legacy, sandbox)


def _stop_mapping(tmp_path: Path) -> Path:
    text = harness.MAPPING.read_text(encoding="utf-8")
    assert "[tables.invoices]\n" in text
    path = tmp_path / "mapping-stop.toml"
    path.write_text(
        text.replace("[tables.invoices]\n", '[tables.invoices]\non_truncate = "stop"\n')
    )
    return path


def test_truncate_policy_stop_names_the_resume_and_resnapshot_is_refused(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    legacy, commerce = fresh_legacy, fresh_commerce
    with running_pipeline(legacy, commerce, kafka_bootstrap, tmp_path, orders=150) as pipe:
        scenario = pipe.scenario
        wait_equal(legacy, commerce, 240)
        pipe.kill_producer()
        scenario.mapping = _stop_mapping(tmp_path)
        pipe.start_producer()
        loaded = _scalar(commerce, "SELECT count(*) FROM commerce.invoices")
        _truncate_and_insert(legacy, "held back")
        wait_for(lambda: pipe.producer_code() is not None, 120, "the producer to stop")
        assert pipe.producer_code() == 3, pipe.producer_log()[-3000:]
        log = pipe.producer_log()
        found = re.search(
            r"cutover produce --carry-truncate (shop\.invoices@[0-9A-F]+/[0-9A-F]+)", log
        )
        assert found and "TRUNCATE of shop.invoices" in log, log[-3000:]
        pipe.reap_producer()
        # Nothing was carried: commerce still holds the invoices, the later change is held too.
        time.sleep(3)
        assert _scalar(commerce, "SELECT count(*) FROM commerce.invoices") == loaded
        # The trap is closed: a re-snapshot now is refused and changes nothing.
        resnap = scenario.cli("init", "--resnapshot")
        assert resnap.returncode == 1, resnap.stdout[-2000:] + resnap.stderr[-2000:]
        assert "TRUNCATE of shop.invoices" in resnap.stderr and found.group(1) in resnap.stderr
        assert _scalar(commerce, "SELECT count(*) FROM commerce.invoices") == loaded
        # The command the message names resumes.
        pipe.producer = scenario.start_produce("--carry-truncate", found.group(1))
        wait_equal(legacy, commerce, 240)
        assert _scalar(commerce, "SELECT count(*) FROM commerce.customers"
                       " WHERE display_name = 'held back'") == 1  # fmt: skip
        assert pipe.producer_code() is None and not pipe.dead_appliers(), pipe.log_text()[-3000:]
        verify = scenario.cli("verify")
        assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]


def _invoice(op: str, invoice_id: int, lsn: int, seq: int = 0) -> Change:
    row = {"id": invoice_id, "order_id": 7, "invoice_no": f"INV-{invoice_id}",
           "issued_at": datetime(2026, 11, 29, tzinfo=UTC)}  # fmt: skip
    return Change("shop", "invoices", op, lsn, seq, 0, row, None, True, False)


def _truncate(lsn: int, seq: int = 0) -> Change:
    return Change("shop", "invoices", "t", lsn, seq, 0, {}, None, True, False)


def test_truncate_horizon_keeps_rows_ahead_and_never_resurrects_rows_behind(
    commerce: str,
) -> None:
    """The apply side alone, with the partitions' interleavings made explicit: the TRUNCATE is
    at position 100; partition 0 carries it first, partition 1 is ahead (a row at 150 applied
    before any copy), partition 2 is behind (a row at 60 applied after the first copy)."""
    mapping = load_mapping(harness.MAPPING)

    def ids(conn: psycopg.Connection[tuple[object, ...]]) -> list[object]:
        rows = conn.execute("SELECT invoice_id FROM commerce.invoices ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    with psycopg.connect(commerce, autocommit=True) as conn:
        sink = Sink(conn, mapping, "cutover")

        def apply(*changes: Change) -> None:
            sink.begin()
            _stats, failures = sink.apply(changes)
            assert failures == []
            sink.commit()

        apply(_invoice("c", 1, 10), _invoice("c", 2, 20), _invoice("d", 2, 30))  # 2: tombstone
        apply(_invoice("c", 3, 150))  # partition 1, ahead
        apply(_truncate(100))  # partition 0's copy
        assert ids(conn) == [3]
        apply(_invoice("c", 4, 60), _invoice("u", 1, 70))  # partition 2, behind: not brought back
        assert ids(conn) == [3]
        # In one batch: older rows skipped, newer applied, duplicate copies change nothing.
        apply(_invoice("c", 5, 90), _truncate(100), _invoice("c", 6, 120), _truncate(100))
        assert ids(conn) == [3, 6]
        row = conn.execute(
            "SELECT source_table, copies FROM cutover.truncates WHERE target_table = 'invoices'"
        ).fetchone()
        assert row == ("shop.invoices", 3)
        # The tombstones older than the TRUNCATE are gone: its horizon covers them.
        tomb = conn.execute("SELECT count(*) FROM cutover.tombstones").fetchone()
        assert tomb == (0,)
        audit = conn.execute(
            "SELECT count(*) FROM cutover.audit WHERE command = 'truncate'"
        ).fetchone()
        assert audit == (1,)
