"""An independent comparison of the commerce DB with the legacy DB for the reference shop.

The expected commerce content is written here by hand, in SQL over the legacy tables, from the
reference scenario's mapping table (docs/ARCHITECTURE.md), not through cutover.mapping, the
consumers or `cutover verify`, so that a bug in any of them cannot hide itself. Both sides are
fetched whole and compared in Python: meant for test-sized data sets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

# (commerce table, key columns, legacy query producing the expected rows, commerce query).
# Both queries return the same columns in the same order, keys first.
_TABLES: tuple[tuple[str, int, str, str], ...] = (
    (
        "customers",
        1,
        "SELECT id, display_name, email, phone, created_at, updated_at FROM shop.users",
        "SELECT customer_id, display_name, email, phone, created_at, updated_at"
        " FROM commerce.customers",
    ),
    (
        "sellers",
        1,
        "SELECT id, owner_user_id, shop_name, upper(status), rating, created_at, updated_at"
        " FROM shop.merchants",
        "SELECT seller_id, owner_customer_id, name, state, rating, created_at, updated_at"
        " FROM commerce.sellers",
    ),
    (
        "listings",
        1,
        "SELECT id, merchant_id, title, description, (price_idr * 100)::bigint, stock,"
        " status = 'live' FROM shop.products WHERE status <> 'deleted'",
        "SELECT listing_id, seller_id, title, description, price_minor, stock, visible"
        " FROM commerce.listings",
    ),
    (
        "orders",
        1,
        "SELECT id, buyer_id, merchant_id, upper(status), (total_idr * 100)::bigint,"
        " created_at, updated_at FROM shop.orders",
        "SELECT order_id, customer_id, seller_id, state, total_minor, created_at, updated_at"
        " FROM commerce.orders",
    ),
    (
        "order_lines",
        2,
        "SELECT order_id, line_no, product_id, qty, (unit_price_idr * 100)::bigint"
        " FROM shop.order_items",
        "SELECT order_id, line_no, listing_id, quantity, unit_price_minor"
        " FROM commerce.order_lines",
    ),
    (
        "payments",
        1,
        "SELECT id, order_id, upper(method), (amount_idr * 100)::bigint, upper(status),"
        " provider_ref, paid_at FROM shop.payments",
        "SELECT payment_id, order_id, method, amount_minor, state, provider_ref, paid_at"
        " FROM commerce.payments",
    ),
    (
        "invoices",
        1,
        "SELECT id, order_id, invoice_no, 'https://commerce.example/invoices/' || invoice_no,"
        " issued_at FROM shop.invoices",
        "SELECT invoice_id, order_id, invoice_no, link, issued_at FROM commerce.invoices",
    ),
)


@dataclass
class TableDiff:
    table: str
    expected: int
    actual: int
    missing: list[Any] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)
    different: list[tuple[Any, tuple[Any, ...], tuple[Any, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)


def _rows(dsn: str, query: str, nkey: int) -> dict[Any, tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        rows = conn.execute(query.encode()).fetchall()
    return {row[:nkey] if nkey > 1 else row[0]: tuple(row) for row in rows}


def _renamed(query: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        query = re.sub(rf"\b{re.escape(old)}\b", new, query)
    return query


def compare(
    legacy_dsn: str, commerce_dsn: str, legacy_renames: Mapping[str, str] | None = None
) -> list[TableDiff]:
    """Per commerce table: what the legacy DB says it must hold vs what it holds.

    ``legacy_renames`` (old -> new column name) follows a legacy column a test renamed.
    """
    diffs = []
    for table, nkey, legacy_sql, commerce_sql in _TABLES:
        expected = _rows(legacy_dsn, _renamed(legacy_sql, legacy_renames or {}), nkey)
        actual = _rows(commerce_dsn, commerce_sql, nkey)
        diff = TableDiff(table, len(expected), len(actual))
        diff.missing = sorted(k for k in expected if k not in actual)[:20]
        diff.extra = sorted(k for k in actual if k not in expected)[:20]
        diff.different = [
            (k, expected[k], actual[k])
            for k in expected
            if k in actual and expected[k] != actual[k]
        ][:20]
        diffs.append(diff)
    return diffs


def assert_commerce_matches_legacy(
    legacy_dsn: str, commerce_dsn: str, legacy_renames: Mapping[str, str] | None = None
) -> None:
    bad = [d for d in compare(legacy_dsn, commerce_dsn, legacy_renames) if not d.ok]
    assert not bad, "\n".join(
        f"{d.table}: expected {d.expected} rows, found {d.actual}; missing {d.missing}; "
        f"extra {d.extra}; different {d.different[:3]}"
        for d in bad
    )
