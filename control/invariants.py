"""The scenario invariants of DESIGN §3, checked on the commerce tables by ``cutover verify``
(step 4 of :mod:`control.verify`): each returns the (key, detail) of every violating row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from psycopg import sql

__all__ = ["INVARIANTS", "INVOICE_LINK_PREFIX", "Invariant"]


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invariant:
    """A check on commerce returning (key, detail) of each violating row."""

    name: str
    description: str
    tables: tuple[str, ...]  # target tables it needs (the first one's domain owns it)
    build: Callable[[str], sql.Composed]


INVOICE_LINK_PREFIX = "https://commerce.example/invoices/"


def _order_total_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT o.order_id, 'total_minor ' || o.total_minor || ', lines sum ' || "
        "COALESCE(l.s, 0) FROM {orders} AS o LEFT JOIN (SELECT order_id, "
        "sum(quantity::numeric * unit_price_minor) AS s FROM {lines} GROUP BY order_id) AS l "
        "ON l.order_id = o.order_id WHERE o.total_minor <> COALESCE(l.s, 0) "
        "ORDER BY o.order_id LIMIT 1000"
    ).format(orders=sql.Identifier(schema, "orders"), lines=sql.Identifier(schema, "order_lines"))


def _settled_payment_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT p.payment_id, 'amount_minor ' || p.amount_minor || ', order ' || p.order_id "
        "|| ' total_minor ' || COALESCE(o.total_minor::text, 'none (no such order)') "
        "FROM {payments} AS p "
        "LEFT JOIN {orders} AS o ON o.order_id = p.order_id "
        "WHERE p.state = 'SETTLED' AND p.amount_minor IS DISTINCT FROM o.total_minor "
        "ORDER BY p.payment_id LIMIT 1000"
    ).format(payments=sql.Identifier(schema, "payments"), orders=sql.Identifier(schema, "orders"))


def _invoice_link_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT invoice_id, link FROM {invoices} WHERE NOT starts_with(link, {prefix}) "
        "ORDER BY invoice_id LIMIT 1000"
    ).format(invoices=sql.Identifier(schema, "invoices"), prefix=sql.Literal(INVOICE_LINK_PREFIX))


INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "order_total",
        "order total_minor = Σ quantity × unit_price_minor of its lines",
        ("orders", "order_lines"),
        _order_total_sql,
    ),
    Invariant(
        "settled_payment_amount",
        "a settled payment's amount_minor = its order's total_minor",
        ("payments", "orders"),
        _settled_payment_sql,
    ),
    Invariant(
        "invoice_link",
        f"every invoice link starts with {INVOICE_LINK_PREFIX}",
        ("invoices",),
        _invoice_link_sql,
    ),
)
