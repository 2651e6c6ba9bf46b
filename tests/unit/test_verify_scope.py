"""Verify's scope selection and its report (pure parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.verify import InvariantReport, TableReport, VerifyReport, select_tables
from cutover.errors import UsageError
from cutover.mapping import MappingSpec, load_mapping

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec() -> MappingSpec:
    return load_mapping(REPO / "examples" / "shop" / "mapping.toml")


def test_scope_and_covered_domains(spec: MappingSpec) -> None:
    tables, covered = select_tables(spec, None, None)
    assert len(tables) == 7 and covered == ["payment", "data", "merchant"]
    tables, covered = select_tables(spec, "payment", None)
    assert [t.source_table for t in tables] == ["orders", "order_items", "payments", "invoices"]
    assert covered == ["payment"]
    # one table of a domain covers no domain (it does not count for the gate) ...
    tables, covered = select_tables(spec, None, "order_lines")
    assert [t.source_table for t in tables] == ["order_items"] and covered == []
    # ... unless it is the domain's only table
    assert select_tables(spec, None, "users")[1] == ["data"]


def test_scope_errors_are_usage_errors(spec: MappingSpec) -> None:
    with pytest.raises(UsageError, match="unknown domain 'pay'"):
        select_tables(spec, "pay", None)
    with pytest.raises(UsageError, match="unknown table 'users' in scope"):
        select_tables(spec, "payment", "users")


def test_report_verdicts_and_summary() -> None:
    ok = TableReport("users", "customers", "data", legacy_rows=10, commerce_rows=10, matching=10)
    bad = TableReport(
        "orders",
        "orders",
        "payment",
        legacy_rows=10,
        commerce_rows=10,
        matching=9,
        different=1,
        samples={"different": [{"key": [7], "kind": "different", "columns": ["total_minor"]}]},
    )
    inv = InvariantReport("invoice_link", "payment", "links", violations=2)
    report = VerifyReport(
        run_id=3,
        domains=["payment", "data"],
        tables=[ok, bad],
        invariants=[inv],
        source_lsn_start=0x1_0000_0010,
        source_lsn_end=0x1_0000_0020,
        applied_lsn={"payment": None},
        first_pass_s=0.5,
        elapsed_s=1.0,
    )
    assert not report.passed and report.failed_domains == ["payment"]
    assert report.rows_per_s() == 40
    js = report.to_json()
    assert js["source_lsn_start"] == "1/10" and js["failed_domains"] == ["payment"]
    summary = report.mismatch_summary()
    assert "orders (1 different; keys [7])" in summary
    assert "invariant invoice_link (2 violations)" in summary
