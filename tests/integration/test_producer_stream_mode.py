"""``[source] read_mode`` on the real stack: the stream gives the same events as the SQL reader
and an exact caught-up. Stream is the default, so the rest of the suite (the producer's fault
tests included) runs the stream; here the SQL reader keeps the commit protocol's guarantees
too (kill -9 between ack and advance, SIGTERM).

One scratch database for the module, with session defaults that differ from what pgoutput.py
assumes (DateStyle, TimeZone, extra_float_digits, bytea_output), so that a decoding session
which does not fix them gives other bytes. Its slots are all created before anything is written:
``stream`` (under test), ``sql`` (the reference, same WAL) and ``crash`` (the SQL reader,
kill -9 then restart).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devtools import harness
from devtools.harness import Scenario, changes, open_scenario
from devtools.scratch import scratch_database
from devtools.workload import prefill
from tests.integration.conftest import EXAMPLES
from tests.integration.producer_support import (
    drain,
    positions,
    recorded,
    sigterm_mid_stream,
)

pytestmark = pytest.mark.integration

FLOAT = 0.1 + 0.2  # 0.30000000000000004: 15 digits would print 0.3
BLOB = bytes(range(256))
WHEN = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
# Decoded by the walsender for a while without a byte of output: a quiet-timeout rule would
# call the stream caught up in the middle of it and miss the marker committed after it.
BULK_ROWS = 300_000
MARKER_ID = 990_001


def _odd_session_defaults(dsn: str) -> None:
    """Database defaults pgoutput's text output must not follow (each reader overrides them)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        db = sql.Identifier(str(conn.execute("SELECT current_database()").fetchone()[0]))  # type: ignore[index]
        for setting, value in (
            ("DateStyle", "SQL, DMY"),
            ("TimeZone", "Pacific/Chatham"),
            ("extra_float_digits", "0"),
            ("bytea_output", "escape"),
        ):
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    db, sql.Identifier(setting), sql.Literal(value)
                )
            )


def _retype(legacy: str, commerce: str) -> None:
    """Before init: merchants.rating float8 and products.description bytea, on both sides (the
    mapping copies them; PostgreSQL refuses to retype a published or fenced column later)."""
    for dsn, statements in (
        (
            legacy,
            "ALTER TABLE shop.merchants ALTER COLUMN rating TYPE double precision;"
            " ALTER TABLE shop.products ALTER COLUMN description TYPE bytea"
            " USING convert_to(description, 'UTF8')",
        ),
        (
            commerce,
            "ALTER TABLE commerce.sellers ALTER COLUMN rating TYPE double precision;"
            " ALTER TABLE commerce.listings ALTER COLUMN description TYPE bytea"
            " USING convert_to(description, 'UTF8')",
        ),
    ):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statements)


def _write_backlog(dsn: str) -> None:
    """Shop rows, values pgoutput prints differently under other session settings, a big
    transaction of an unpublished table, and a marker committed last."""
    prefill(dsn, orders=150, seed=3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        merchant = conn.execute("SELECT id FROM shop.merchants ORDER BY id LIMIT 1").fetchone()[0]  # type: ignore[index]
        conn.execute(
            "UPDATE shop.merchants SET rating = %s, updated_at = %s WHERE id = %s",
            (FLOAT, WHEN, merchant),
        )
        conn.execute(
            "UPDATE shop.products SET description = %s, price_idr = %s WHERE merchant_id = %s",
            (BLOB, Decimal("123456789012.34"), merchant),
        )
        conn.execute("CREATE TABLE shop.bulk (id int, pad text)")
        conn.execute(
            "INSERT INTO shop.bulk SELECT g, repeat('x', 80) FROM generate_series(1, %s) g",
            (BULK_ROWS,),
        )
        conn.execute(
            "INSERT INTO shop.users (id, handle, display_name) VALUES (%s, 'marker', 'M')",
            (MARKER_ID,),
        )


@pytest.fixture(scope="module")
def trio(
    source_dsn: str, target_dsn: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Scenario]]:
    """Three pipelines on one database, initialised before the backlog is written."""
    workdir = tmp_path_factory.mktemp("stream_mode")
    for legacy in scratch_database(source_dsn, EXAMPLES / "legacy.sql", "legacy"):
        for commerce in scratch_database(target_dsn, EXAMPLES / "commerce.sql", "commerce"):
            _odd_session_defaults(legacy)
            _retype(legacy, commerce)
            with (
                open_scenario(legacy, commerce, kafka_bootstrap, workdir, read_mode="stream") as st,
                open_scenario(legacy, commerce, kafka_bootstrap, workdir, read_mode="sql") as ref,
                open_scenario(legacy, commerce, kafka_bootstrap, workdir, read_mode="sql") as cr,
            ):
                for scenario in (st, ref, cr):
                    harness.init(scenario)
                _write_backlog(legacy)
                yield {"stream": st, "sql": ref, "crash": cr}


def test_both_modes_give_the_same_events_and_exit_when_idle_reads_everything(
    trio: dict[str, Scenario],
) -> None:
    stream, reference = trio["stream"], trio["sql"]
    stream_report = drain(stream)
    drain(reference)
    want, got = positions(reference), positions(stream)
    assert want and got == want
    assert stream_report["events"] == len(want)
    # (d) the marker, committed after the big transaction, was read before the exit.
    marker = [c for c in got.values() if c[0] == "users" and f"'id': {MARKER_ID}" in c[5]]
    assert len(marker) == 1
    # The values pgoutput prints differently under other session settings, exactly.
    afters: dict[str, list[dict[str, Any]]] = {}
    for e in changes(stream.read()):
        if e.record["after"] is not None:
            afters.setdefault(e.record["source"]["table"], []).append(e.record["after"])
    rated = [a for a in afters["merchants"] if a["rating"] == FLOAT]
    assert len(rated) == 1
    updated = rated[0]["updated_at"]
    assert (updated if isinstance(updated, datetime) else _from_micros(updated)) == WHEN
    products = [a for a in afters["products"] if a["description"] == BLOB]
    assert products and all(a["price_idr"] == Decimal("123456789012.34") for a in products)
    # The slot is confirmed where the producer recorded (the final status update was applied).
    assert stream.slot_state()[0] == recorded(stream) == stream_report_position(stream_report)


def _from_micros(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1_000_000, UTC)


def stream_report_position(report: dict[str, Any]) -> int:
    high, _, low = str(report["position"]).partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def test_kill_9_between_ack_and_confirm_loses_nothing(trio: dict[str, Scenario]) -> None:
    crash, reference = trio["crash"], trio["stream"]
    before, _ = crash.slot_state()
    crashed = crash.cli(
        "produce",
        "--no-initial-snapshot",
        extra_env={"CUTOVER_CRASH_AT": "after_ack_before_advance"},
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    after, _ = crash.slot_state()
    assert after == before  # nothing confirmed before the crash
    assert after is not None and after < recorded(crash)  # recorded write-ahead
    assert drain(crash)["events"] > 0  # the restart re-delivers
    drain(reference)  # (again, when the first test ran: nothing new)
    want = positions(reference)
    got = positions(crash)
    missing = sorted(set(want) - set(got))
    assert not missing, f"{len(missing)} changes lost, first {missing[:5]}"
    assert got == want


@pytest.fixture
def pair(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[Scenario, Scenario]]:
    with (
        open_scenario(
            fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, read_mode="sql"
        ) as under_test,
        open_scenario(
            fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, read_mode="stream"
        ) as reference,
    ):
        harness.init(under_test)
        harness.init(reference)
        yield under_test, reference


def test_sigterm_confirms_the_last_checkpoint_and_exits_0(
    pair: tuple[Scenario, Scenario],
) -> None:
    under_test, reference = pair
    sigterm_mid_stream(under_test, reference, rate=800, duration=5, seed=21)
    started = [e for e in under_test.log_events() if e["event"] == "producer.started"]
    assert started and started[-1]["read_mode"] == "sql"
