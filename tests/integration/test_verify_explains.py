"""Verify explains (issue 12, item 5) on the real databases: a renamed column is schema drift
(exit 1, side/table/column named, not a raw SQL error); legacy values the mapping cannot map
(numeric overflow after ×100, NaN, an infinite timestamp) are named by table, key and column,
never by value; a legacy order breaking an invariant on both sides is reported as legacy's."""

from __future__ import annotations

from typing import Any

import pytest

from cli.commands import verify as verify_command
from control.verify import run_verify
from cutover.config import Settings
from cutover.errors import VerifyMismatch
from tests.integration.test_verify_mismatch import SMALL, _args, _Ctx, json_out
from tests.integration.test_verify_support import commerce, legacy, make_settings, mapping, seed

pytestmark = pytest.mark.integration


@pytest.fixture
def seeded(fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str) -> Settings:
    settings = make_settings(fresh_legacy, fresh_commerce, kafka_bootstrap)
    seed(settings, orders=600)
    return settings


def _fails(settings: Settings, capsys: pytest.CaptureFixture[str], **kw: Any) -> tuple[str, Any]:
    with pytest.raises(VerifyMismatch) as err:
        ctx: Any = _Ctx(settings)
        verify_command.run(_args(chunk_rows=200, **kw), ctx)
    assert err.value.exit_code == 1
    return err.value.message, json_out(capsys.readouterr().out)


def _table(out: Any, target: str) -> dict[str, Any]:
    return next(t for t in out["tables"] if t["target"] == target)


def test_a_renamed_column_is_reported_as_drift(
    seeded: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy(seeded, "ALTER TABLE shop.merchants RENAME COLUMN shop_name TO name")
    commerce(seeded, "ALTER TABLE commerce.customers RENAME COLUMN email TO mail")
    message, out = _fails(seeded, capsys)
    assert "schema drift: legacy shop.merchants.shop_name" in message
    assert "schema drift: commerce commerce.customers.email" in message
    assert "cutover init" in message
    assert "does not exist" in message and "SQLSTATE" not in message
    drift = _table(out, "sellers")["drift"]
    assert [(d["side"], d["table"], d["column"]) for d in drift] == [
        ("source", "shop.merchants", "shop_name")
    ]
    assert [d["column"] for d in _table(out, "customers")["drift"]] == ["email"]
    # the other tables were compared and are equal
    assert _table(out, "orders")["passed"] and _table(out, "orders")["matching"] > 0
    assert set(out["failed_domains"]) == {"merchant", "data"}


def test_source_values_that_cannot_map_are_named_by_key(
    seeded: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [r[0] for r in legacy(seeded, "SELECT id FROM shop.orders ORDER BY id LIMIT 3")]
    cust = legacy(seeded, "SELECT max(id) FROM shop.users")[0][0]
    # The type stays numeric (the transform still type-checks): only the values are out of reach.
    legacy(seeded, "ALTER TABLE shop.orders ALTER COLUMN total_idr TYPE numeric")
    legacy(seeded, "UPDATE shop.orders SET total_idr = 1e20 WHERE id = %s", [ids[0]])
    legacy(seeded, "UPDATE shop.orders SET total_idr = 'NaN' WHERE id = %s", [ids[2]])
    legacy(seeded, "UPDATE shop.users SET created_at = 'infinity' WHERE id = %s", [cust])
    message, out = _fails(seeded, capsys)
    orders = _table(out, "orders")
    assert orders["unmappable"] == 2
    assert orders["unmappable_samples"] == [
        {"key": [ids[0]], "columns": ["total_minor"]},
        {"key": [ids[2]], "columns": ["total_minor"]},
    ]
    # the rest of the table was compared as usual: the other rows are equal
    assert orders["missing"] + orders["extra"] + orders["different"] == 0
    assert orders["matching"] == orders["legacy_rows"] > 0
    customers = _table(out, "customers")
    assert customers["unmappable_samples"] == [{"key": [cust], "columns": ["created_at"]}]
    assert "source value cannot map: 2 rows of orders" in message
    assert f"[{ids[0]}] (total_minor)" in message
    assert f"[{cust}] (created_at)" in message
    assert "persistent differences" not in message
    for raw in ("out of range", "NaN", "infinity", "SQLSTATE", "100000000000000000000"):
        assert raw not in message
    assert all(t["passed"] for t in out["tables"] if t["target"] not in ("orders", "customers"))


def test_a_legacy_order_breaking_an_invariant_is_legacys(
    seeded: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # An order with no settled payment: only order_total can break.
    order = commerce(
        seeded,
        "SELECT min(order_id) FROM commerce.orders o WHERE NOT EXISTS (SELECT 1 FROM "
        "commerce.payments p WHERE p.order_id = o.order_id AND p.state = 'SETTLED')",
    )[0][0]
    legacy(seeded, "UPDATE shop.orders SET total_idr = total_idr + 1 WHERE id = %s", [order])
    commerce(
        seeded,
        "UPDATE commerce.orders SET total_minor = total_minor + 100 WHERE order_id = %s",
        [order],
    )
    report = run_verify(seeded, mapping(), actor="tester", options=SMALL)
    assert all(t.passed for t in report.tables)
    inv = next(i for i in report.invariants if i.name == "order_total")
    assert (inv.violations, inv.legacy_violations) == (0, 1)
    assert inv.legacy_samples[0]["key"] == order
    assert report.differing_domains == []
    # fail-closed: reported, exit 1, the switch-reads gate blocks, but attributed to legacy
    assert report.failed_domains == ["payment"] and not report.passed
    message, out = _fails(seeded, capsys, domain="payment")
    assert f"legacy breaks invariant order_total for keys {order}" in message
    assert "not a replication difference" in message
    assert "persistent differences" not in message
    stored = commerce(
        seeded,
        "SELECT failed_domains FROM cutover.verify_runs WHERE run_id = %s",
        [out["run_id"]],
    )
    assert stored == [(["payment"],)]
    # A commerce-only violation of the same invariant is still commerce's.
    commerce(
        seeded,
        "UPDATE commerce.orders SET total_minor = total_minor + 1 WHERE order_id = %s",
        [order + 1],
    )
    report = run_verify(seeded, mapping(), domain="payment", actor="tester", options=SMALL)
    inv = next(i for i in report.invariants if i.name == "order_total")
    assert (inv.violations, inv.legacy_violations) == (1, 1)
    assert report.differing_domains == ["payment"]
