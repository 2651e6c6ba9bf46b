"""Verify on the real databases: a changed, a deleted and an extra commerce row are each found
and named; rows the mapping deletes must be absent; invariants; the stored result; resume; the
command's exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from cli.commands import verify as verify_command
from control.verify import VerifyOptions, VerifyReport, run_verify
from cutover.config import Settings
from cutover.errors import VerifyMismatch
from cutover.mapping import parse_mapping
from tests.integration.test_verify_support import (
    MAPPING_PATH,
    commerce,
    legacy,
    make_settings,
    mapping,
    seed,
)

pytestmark = pytest.mark.integration

# Small chunks and buckets so that even this small data set goes through several chunks and
# several levels of bisection before rows are fetched.
SMALL = VerifyOptions(chunk_rows=1_000, fetch_rows=40, buckets=4, recheck_timeout_s=5)


@pytest.fixture
def seeded(fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str) -> Settings:
    settings = make_settings(fresh_legacy, fresh_commerce, kafka_bootstrap)
    seed(settings, orders=2000)
    return settings


def table(report: VerifyReport, target: str) -> dict[str, Any]:
    return next(t.to_json() for t in report.tables if t.target == target)


def test_consistent_copy_passes(seeded: Settings) -> None:
    report = run_verify(seeded, mapping(), actor="tester", options=SMALL)
    assert report.passed, report.mismatch_summary()
    listings = table(report, "listings")
    assert listings["absent_by_mapping"] > 0  # the prefill has 'deleted' products
    assert listings["matching"] == listings["legacy_rows"] == listings["commerce_rows"]
    assert all(t.chunks > 1 for t in report.tables if t.legacy_rows > 2_000)
    assert [i.name for i in report.invariants] == [
        "order_total",
        "settled_payment_amount",
        "invoice_link",
    ]
    rows = commerce(
        seeded,
        "SELECT passed, domains, failed_domains, status, source_lsn_start <= source_lsn_end "
        "FROM cutover.verify_runs WHERE run_id = %s",
        [report.run_id],
    )
    assert rows == [(True, ["payment", "data", "merchant"], [], "finished", True)]


def test_changed_deleted_and_extra_rows_are_found_and_named(seeded: Settings) -> None:
    deleted_product = legacy(
        seeded, "SELECT id FROM shop.products WHERE status = 'deleted' ORDER BY id LIMIT 1"
    )[0][0]
    commerce(seeded, "UPDATE commerce.orders SET state = 'CANCELLED' WHERE order_id = 1500")
    commerce(seeded, "DELETE FROM commerce.order_lines WHERE order_id = 321 AND line_no = 1")
    commerce(
        seeded,
        "INSERT INTO commerce.customers SELECT customer_id + 10000000, display_name, email, "
        "phone, created_at, updated_at, _src_lsn, _src_seq FROM commerce.customers "
        "WHERE customer_id = 7",
    )
    commerce(
        seeded,
        "INSERT INTO commerce.listings VALUES (%s, 1, 'zombie', NULL, 100, 1, true, 0, 0)",
        [deleted_product],
    )
    report = run_verify(seeded, mapping(), actor="tester", options=SMALL)
    assert not report.passed
    assert report.failed_domains == ["data", "merchant", "payment"]

    orders = table(report, "orders")
    assert (orders["different"], orders["missing"], orders["extra"]) == (1, 0, 0)
    assert orders["samples"]["different"] == [
        {"key": [1500], "kind": "different", "columns": ["state"]}
    ]
    lines = table(report, "order_lines")
    assert (lines["missing"], lines["different"], lines["extra"]) == (1, 0, 0)
    assert lines["samples"]["missing"] == [{"key": [321, 1], "kind": "missing"}]
    customers = table(report, "customers")
    assert customers["extra"] == 1
    assert customers["samples"]["extra"] == [{"key": [10000007], "kind": "extra"}]
    listings = table(report, "listings")
    assert listings["extra"] == 1
    assert listings["samples"]["extra"] == [{"key": [deleted_product], "kind": "deleted_in_source"}]
    for t in (orders, lines, customers, listings):
        assert t["matching"] == t["rows_compared"] - 1
    # the line removed from order 321 also breaks its total (a shop invariant of the mapping file)
    order_total = next(i for i in report.invariants if i.name == "order_total")
    assert [s["key"] for s in order_total.samples] == [321]
    summary = report.mismatch_summary()
    assert "order_lines (1 missing; keys [321, 1])" in summary
    assert "orders (1 different; keys [1500])" in summary


def test_invariants_are_checked_on_commerce(seeded: Settings) -> None:
    commerce(
        seeded,
        "UPDATE commerce.invoices SET link = 'https://shop.legacy.example/invoice/' || invoice_no "
        "WHERE invoice_id = (SELECT min(invoice_id) FROM commerce.invoices)",
    )
    settled = commerce(
        seeded, "SELECT min(payment_id) FROM commerce.payments WHERE state = 'SETTLED'"
    )[0][0]
    commerce(
        seeded,
        "UPDATE commerce.payments SET amount_minor = amount_minor + 1 WHERE payment_id = %s",
        [settled],
    )
    report = run_verify(seeded, mapping(), domain="payment", actor="tester", options=SMALL)
    failing = {i.name: i.violations for i in report.invariants if not i.passed}
    assert failing == {"invoice_link": 1, "settled_payment_amount": 1}


SOURCE_INVARIANT = """
[invariants.no_deleted_product]
side = "source"
description = "no product is deleted"
tables = ["products"]
query = "SELECT id, status FROM {products} WHERE status = 'deleted'"
"""


def test_an_invariant_the_mapping_declares_on_the_source_side(seeded: Settings) -> None:
    spec = parse_mapping(MAPPING_PATH.read_text() + SOURCE_INVARIANT, "mapping.toml")
    deleted = legacy(seeded, "SELECT count(*) FROM shop.products WHERE status = 'deleted'")[0][0]
    assert deleted > 0  # the prefill has 'deleted' products
    report = run_verify(seeded, spec, domain="merchant", actor="tester", options=SMALL)
    assert [(i.name, i.domain, i.violations) for i in report.invariants] == [
        ("no_deleted_product", "merchant", min(deleted, 1000))
    ]
    assert report.failed_domains == ["merchant"]
    assert all(t.passed for t in report.tables)


class Interrupt(Exception):
    pass


class StopAfter:
    """A progress sink that interrupts the run after ``n`` chunks."""

    def __init__(self, n: int) -> None:
        self.n = n

    def start(self, total_rows: int) -> None:
        pass

    def advance(self, table: str, rows: int) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt

    def phase(self, text: str) -> None:
        pass


def test_an_interrupted_run_resumes(seeded: Settings) -> None:
    commerce(seeded, "UPDATE commerce.orders SET total_minor = 1 WHERE order_id = 1999")
    with pytest.raises(KeyboardInterrupt):
        run_verify(seeded, mapping(), actor="t", options=SMALL, progress=StopAfter(6))
    ((status, done),) = commerce(
        seeded,
        "SELECT r.status, count(c.*) FROM cutover.verify_runs r "
        "LEFT JOIN cutover.verify_chunks c USING (run_id) GROUP BY r.status",
    )
    assert status == "interrupted" and done == 6  # the 6th was stored, then interrupted
    report = run_verify(seeded, mapping(), actor="t", options=SMALL, resume=True)
    assert report.resumed
    assert [t.target for t in report.tables if not t.passed] == ["orders"]
    assert table(report, "orders")["samples"]["different"][0]["key"] == [1999]
    counts = [
        legacy(seeded, f"SELECT count(*) FROM shop.{t}")[0][0]
        for t in ("users", "merchants", "products", "orders", "order_items", "payments", "invoices")
    ]
    assert report.legacy_rows == sum(counts)


def json_out(text: str) -> Any:
    """The JSON document the command printed (log lines may precede it on stdout in tests:
    structlog caches its first configuration, and pytest captures stdout)."""
    start = 0 if text.startswith("{") else text.index("\n{") + 1
    return json.loads(text[start:])


class _Ctx:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings


def _args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {
        "domain": None,
        "table": None,
        "json": True,
        "resume": False,
        "actor": "cli-test",
        "chunk_rows": 1000,
        "recheck_timeout": 5.0,
        "no_progress": True,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_command_exit_codes_and_json(seeded: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    ctx: Any = _Ctx(seeded)
    assert verify_command.run(_args(domain="data"), ctx) == 0
    out = json_out(capsys.readouterr().out)
    assert out["passed"] and out["domains"] == ["data"]
    commerce(seeded, "UPDATE commerce.customers SET email = 'x@y' WHERE customer_id = 3")
    with pytest.raises(VerifyMismatch) as err:
        verify_command.run(_args(table="customers"), ctx)
    assert err.value.exit_code == 1
    assert "customers (1 different; keys [3])" in err.value.message
    out = json_out(capsys.readouterr().out)
    assert out["tables"][0]["samples"]["different"][0]["columns"] == ["email"]
    # a single-table run covers the data domain (its only table)
    assert out["domains"] == ["data"]


def test_cli_registration_smoke(seeded: Settings, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    verify_command.register(sub)
    args = parser.parse_args(["verify", "--domain", "payment", "--resume", "--json"])
    assert args.resume is True and args.domain == "payment"
    args = parser.parse_args(["verify", "--resume", "12"])
    assert args.resume == 12
