"""The workload generator against a real PostgreSQL 15 holding the legacy schema."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
import structlog
from psycopg import sql
from structlog.testing import capture_logs

from cli import main as cli
from cutover.errors import DatabaseError
from devtools.scratch import scratch_database
from devtools.workload import (
    INVOICE_URL_PREFIX,
    ROLLBACK_ID_BASE,
    ROLLBACK_MARKER,
    TABLES,
    WorkloadProgress,
    prefill,
    run_workload,
)
from tests.integration.conftest import EXAMPLES

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """cli.main() configures structlog to print to the sys.stderr of the moment (a capture
    stream under pytest): put the previous configuration back so later tests can log."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


_PRIMARY_KEYS = {"order_items": "order_id, line_no"}

# Each query counts violations: all must be 0.
_INVARIANTS = {
    "order total = sum of its lines": """
        SELECT count(*) FROM shop.orders o
        WHERE o.total_idr <> (SELECT coalesce(sum(i.qty * i.unit_price_idr), 0)
                              FROM shop.order_items i WHERE i.order_id = o.id)""",
    "order without lines": """
        SELECT count(*) FROM shop.orders o
        WHERE NOT EXISTS (SELECT 1 FROM shop.order_items i WHERE i.order_id = o.id)""",
    "settled payment amount = order total": """
        SELECT count(*) FROM shop.payments p JOIN shop.orders o ON o.id = p.order_id
        WHERE p.status = 'settled' AND p.amount_idr <> o.total_idr""",
    "settled payment of an unpaid order": """
        SELECT count(*) FROM shop.payments p JOIN shop.orders o ON o.id = p.order_id
        WHERE p.status = 'settled' AND o.status NOT IN ('paid', 'shipped', 'completed')""",
    "created order without exactly one pending payment of its total": """
        SELECT count(*) FROM shop.orders o WHERE o.status = 'created' AND 1 <> (
            SELECT count(*) FROM shop.payments p
            WHERE p.order_id = o.id AND p.status = 'pending' AND p.amount_idr = o.total_idr)""",
    "invoice url not on the legacy invoice domain": f"""
        SELECT count(*) FROM shop.invoices
        WHERE url <> '{INVOICE_URL_PREFIX}' || invoice_no""",
    "live listing of a closed merchant": """
        SELECT count(*) FROM shop.products p JOIN shop.merchants m ON m.id = p.merchant_id
        WHERE m.status = 'closed' AND p.status = 'live'""",
    "rolled-back ids": f"""
        SELECT (SELECT count(*) FROM shop.users WHERE id >= {ROLLBACK_ID_BASE})
             + (SELECT count(*) FROM shop.merchants WHERE id >= {ROLLBACK_ID_BASE})
             + (SELECT count(*) FROM shop.products WHERE id >= {ROLLBACK_ID_BASE})
             + (SELECT count(*) FROM shop.orders WHERE id >= {ROLLBACK_ID_BASE})
             + (SELECT count(*) FROM shop.order_items WHERE order_id >= {ROLLBACK_ID_BASE})
             + (SELECT count(*) FROM shop.payments WHERE id >= {ROLLBACK_ID_BASE})
             + (SELECT count(*) FROM shop.invoices WHERE id >= {ROLLBACK_ID_BASE})""",
    "rolled-back markers": f"""
        SELECT (SELECT count(*) FROM shop.users u WHERE u::text LIKE '%{ROLLBACK_MARKER}%'
                   OR follower_count >= 1000000)
             + (SELECT count(*) FROM shop.products p WHERE p::text LIKE '%{ROLLBACK_MARKER}%')
             + (SELECT count(*) FROM shop.payments p WHERE p::text LIKE '%{ROLLBACK_MARKER}%')
             + (SELECT count(*) FROM shop.invoices i WHERE i::text LIKE '%{ROLLBACK_MARKER}%')""",
}


def _violations(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return {
            name: conn.execute(query).fetchone()[0]  # type: ignore[index]
            for name, query in _INVARIANTS.items()
        }


def _scalar(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])


def _checksums(dsn: str) -> dict[str, str]:
    """md5 of every row of every table, in primary-key order."""
    out: dict[str, str] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            query = sql.SQL(
                "SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, '|' ORDER BY {}), ''))"
                " FROM {} t"
            ).format(sql.SQL(_PRIMARY_KEYS.get(table, "id")), sql.Identifier("shop", table))
            row = conn.execute(query).fetchone()
            assert row is not None
            out[table] = row[0]
    return out


@pytest.fixture
def second_legacy(source_dsn: str) -> Iterator[str]:
    yield from scratch_database(source_dsn, EXAMPLES / "legacy.sql", "legacy")


def test_prefill_then_run_keeps_the_invariants(fresh_legacy: str) -> None:
    with capture_logs() as logs:
        filled = prefill(fresh_legacy, orders=2_000, seed=3)
        ticks: list[WorkloadProgress] = []
        report = run_workload(fresh_legacy, rate=300, duration=3, seed=3, progress=ticks.append)

    assert filled.rows["orders"] == 2_000
    assert filled.rows["order_items"] >= 2_000
    assert filled.rows["products"] == 500 and filled.rows["users"] == 400
    assert _scalar(fresh_legacy, "SELECT count(*) FROM shop.orders") == 2_000 + sum(
        n for kind, n in report.counts.items() if kind == "order.create"
    )

    assert report.transactions == report.committed + report.rolled_back
    assert report.rolled_back > 0
    assert 2.9 < report.elapsed_s < 4.5
    assert report.transactions >= 450  # asked 900; generous for a loaded CI machine
    assert ticks and ticks[-1].transactions == report.transactions
    events = [entry["event"] for entry in logs]
    assert {"prefill.finished", "workload.started", "workload.finished"} <= set(events)

    assert _violations(fresh_legacy) == dict.fromkeys(_INVARIANTS, 0)
    # Multi-kB descriptions exist, and they live out of line (TOASTed).
    assert (
        _scalar(fresh_legacy, "SELECT count(*) FROM shop.products WHERE length(description) > 2000")
        > 100
    )
    toast = (
        "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'shop.products'::regclass"
    )
    assert _scalar(fresh_legacy, toast) > 0


def test_same_seed_gives_identical_tables(fresh_legacy: str, second_legacy: str) -> None:
    reports = []
    for dsn in (fresh_legacy, second_legacy):
        prefill(dsn, orders=2_000, seed=11)
        reports.append(run_workload(dsn, rate=5_000, max_transactions=2_500, seed=11))
    assert reports[0].counts == reports[1].counts
    assert reports[0].counts["product.bulk_reprice"] == 1
    first = _checksums(fresh_legacy)
    assert first == _checksums(second_legacy)

    # Another seed from the same state writes something else.
    run_workload(second_legacy, rate=5_000, max_transactions=200, seed=12)
    assert _checksums(second_legacy) != first


def test_workers_write_disjoint_rows_and_the_same_tables_every_time(
    fresh_legacy: str, second_legacy: str
) -> None:
    reports = []
    for dsn in (fresh_legacy, second_legacy):
        prefill(dsn, orders=500, seed=4)
        ticks: list[WorkloadProgress] = []
        reports.append(
            run_workload(
                dsn, rate=5_000, max_transactions=1_001, seed=4, workers=2, progress=ticks.append
            )
        )
        assert ticks and ticks[-1].transactions == 1_001
        assert _violations(dsn) == dict.fromkeys(_INVARIANTS, 0)
    assert reports[0].transactions == reports[0].committed + reports[0].rolled_back == 1_001
    assert reports[0].counts == reports[1].counts
    # However the two connections interleaved, the same rows (no lock waits, no key clashes).
    assert _checksums(fresh_legacy) == _checksums(second_legacy)


def test_runs_on_an_empty_database_and_again_on_its_own_data(fresh_legacy: str) -> None:
    first = run_workload(fresh_legacy, rate=5_000, max_transactions=1_500, seed=5)
    # Same seed again: ids continue after the existing ones, so no key clashes.
    second = run_workload(fresh_legacy, rate=5_000, max_transactions=1_500, seed=5)
    assert first.transactions == second.transactions == 1_500
    assert second.start["max_ids"]["orders"] > 0
    assert _violations(fresh_legacy) == dict.fromkeys(_INVARIANTS, 0)
    assert _scalar(fresh_legacy, "SELECT count(*) FROM shop.products WHERE status = 'deleted'") > 0


def test_a_refused_statement_is_a_database_error(fresh_legacy: str) -> None:
    with psycopg.connect(fresh_legacy, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION shop.frozen() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'orders are frozen'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER frozen BEFORE INSERT ON shop.orders"
            " FOR EACH ROW EXECUTE FUNCTION shop.frozen()"
        )
    with pytest.raises(DatabaseError) as error:
        run_workload(fresh_legacy, rate=5_000, max_transactions=1_000, seed=1)
    assert error.value.sqlstate == "P0001" and error.value.side == "source"
    assert "orders are frozen" in error.value.message
    assert "workload transaction" in error.value.message
    assert _scalar(fresh_legacy, "SELECT count(*) FROM shop.orders") == 0


def test_cli_prefill_and_run_print_json(
    fresh_legacy: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["workload", "--dsn", fresh_legacy, "--json", "--no-progress"]
    assert cli.main([*argv, "--prefill", "--orders", "300", "--seed", "2"]) == 0
    filled = json.loads(capsys.readouterr().out)
    assert filled["rows"]["orders"] == 300

    assert cli.main([*argv, "--rate", "2000", "--max-transactions", "400"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transactions"] == 400
    assert report["committed"] + report["rolled_back"] == 400
    assert report["start"]["max_ids"]["orders"] == 300


def test_cli_table_output(fresh_legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["workload", "--dsn", fresh_legacy, "--no-progress", "--max-transactions", "50"]
    assert cli.main([*argv, "--rate", "1000"]) == 0
    out = capsys.readouterr().out
    assert "rate achieved" in out and "rolled back" in out and "user.signup" in out


def test_cli_unreachable_database_exits_3_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    dsn = "host=127.0.0.1 port=1 user=shop password=hunter2-secret dbname=legacy"
    assert cli.main(["workload", "--dsn", dsn, "--duration", "1", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "hunter2-secret" not in err
    assert "127.0.0.1:1" in err and "make up" in err


def test_cli_missing_schema_exits_3_with_the_fix(
    source_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for empty in scratch_database(source_dsn, None, "empty"):
        assert cli.main(["workload", "--dsn", empty, "--duration", "1", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "shop schema is missing" in err and "examples/shop/legacy.sql" in err
