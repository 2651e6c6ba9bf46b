"""Router mode of the workload, the pure parts: every planned statement has a declared effect,
every transaction stays in one domain, and the commerce replay writes exactly the mapped row
(never a social column). A recording stand-in connection replaces PostgreSQL here; the real
thing is tests/integration/test_workload_router.py."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from psycopg import sql

from cli import main as cli
from cutover.errors import UsageError
from cutover.mapping import MappingSpec, load_mapping
from devtools import workload as w
from devtools.workload_router import (
    EFFECTS,
    AbortedPipelineNoise,
    CommerceWriter,
    operation_domain,
    unheld_writes,
)

AT = datetime(2024, 3, 1, tzinfo=UTC)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "shop"


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping(EXAMPLES / "mapping.toml")


_DOMAIN_OF_KIND = {
    "user": "data",
    "merchant": "merchant",
    "product": "merchant",
    "order": "payment",
}


def test_every_planned_statement_has_an_effect_and_one_domain(mapping: MappingSpec) -> None:
    seen: set[str] = set()
    for op in islice(w.plan_operations(3, bulk_every=50), 20_000):
        domain = operation_domain(op, mapping)
        family = op.kind.split(".")[0]
        if family != "rollback":
            assert domain == _DOMAIN_OF_KIND[family], op.kind
        for text, params in op.statements:
            effect = EFFECTS[text]
            assert effect.table in mapping.tables
            if effect.kind == "insert":
                assert len(effect.columns) == len(params)
            else:
                effect.split(params)  # the parameters fit the declared sets and WHERE
            seen.add(text)
    assert seen == set(EFFECTS), set(EFFECTS) - seen


def test_a_transaction_writing_two_domains_is_refused(mapping: MappingSpec) -> None:
    op = w.Operation(
        7,
        "mixed",
        (
            (w.UPDATE_ORDER_STATUS, ("paid", AT, 1)),
            (w.UPDATE_USER_CONTACT, ("e", "p", AT, 1)),
        ),
    )
    with pytest.raises(UsageError, match="one domain"):
        operation_domain(op, mapping)


def test_reprice_matches_what_postgresql_stores() -> None:
    setter = dict(EFFECTS[w.BULK_REPRICE].sets)["price_idr"]
    rng = random.Random(5)
    for _ in range(2_000):
        cents = rng.randint(1, 10**12)
        for percent in (80, 125, 95, 105):
            got = setter(Decimal(cents).scaleb(-2), percent)
            assert got == Decimal(w._reprice(cents, percent)).scaleb(-2)


class _Conn:
    """Records statements; answers SELECTs with the rows given for the table."""

    def __init__(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        self.rows = rows
        self.done: list[tuple[str, list[Any]]] = []

    def execute(self, query: sql.Composable, params: Any = None) -> _Conn:
        text = query.as_string(None)
        self.done.append((text, list(params or [])))
        self._last = text
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        table = self._last.split('FROM "commerce".', 1)[1].split()[0].strip('"')
        return self.rows.get(table, [])

    def writes(self) -> list[tuple[str, list[Any]]]:
        return [(t, p) for t, p in self.done if not t.startswith("SELECT")]


def test_an_insert_writes_the_mapped_row_without_social_columns(mapping: MappingSpec) -> None:
    conn = _Conn({})
    row = (9, "ayu_9", "Ayu S", "a@x", None, 12, "bio text", AT, AT)
    CommerceWriter(mapping).apply(conn, w.INSERT_USER, row)  # type: ignore[arg-type]
    ((text, params),) = conn.writes()
    assert text.startswith('INSERT INTO "commerce"."customers"')
    for social in ("handle", "bio", "follower_count"):
        assert social not in text
    assert params == [9, "Ayu S", "a@x", None, AT, AT]


def test_an_update_rebuilds_the_legacy_row_and_writes_it_mapped(mapping: MappingSpec) -> None:
    listing = (5, 2, "Old", "desc", 1_000_050, 3, True)  # price_minor: 10,000.50 IDR
    conn = _Conn({"listings": [listing]})
    writer = CommerceWriter(mapping)
    writer.apply(conn, w.UPDATE_PRODUCT_PRICE, (Decimal("12.34"), AT, 5))  # type: ignore[arg-type]
    ((text, params),) = conn.writes()
    assert text.startswith('UPDATE "commerce"."listings" SET')
    assert params == [5, 2, "Old", "desc", 1_234, 3, True, 5]

    conn = _Conn({"listings": [listing]})
    writer.apply(conn, w.UPDATE_PRODUCT_STATUS, ("deleted", AT, 5))  # type: ignore[arg-type]
    assert conn.writes() == [('DELETE FROM "commerce"."listings" WHERE "listing_id" = %s', [5])]

    conn = _Conn({})  # a row commerce does not hold: nothing to change, as on legacy
    writer.apply(conn, w.UPDATE_PRODUCT_STOCK, (1, AT, 5))  # type: ignore[arg-type]
    assert conn.writes() == []


def test_hiding_a_shop_touches_its_live_listings_only(mapping: MappingSpec) -> None:
    live, hidden = (5, 2, "A", None, 100, 1, True), (6, 2, "B", None, 100, 1, False)
    conn = _Conn({"listings": [live, hidden]})
    CommerceWriter(mapping).apply(conn, w.HIDE_MERCHANT_PRODUCTS, (AT, 2))  # type: ignore[arg-type]
    select = conn.done[0][0]
    assert '"seller_id" = %s' in select and "FOR UPDATE" in select
    ((_text, params),) = conn.writes()
    assert params[-1] == 5 and params[6] is False  # visible = false, listing 5 only


def test_writes_to_columns_commerce_does_not_hold_are_counted(mapping: MappingSpec) -> None:
    op = w.Operation(
        1,
        "user.followers",
        ((w.UPDATE_USER_FOLLOWERS, (3, AT, 1)), (w.UPDATE_USER_CONTACT, ("e", "p", AT, 1))),
    )
    assert unheld_writes(op, mapping) == 1


def test_cli_router_does_not_go_with_prefill(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["workload", "--router", "--prefill", "--dsn", "host=127.0.0.1 port=1"]) == 2
    assert "--router" in capsys.readouterr().err


def test_only_psycopgs_aborted_pipeline_warning_is_dropped() -> None:
    """After a fence refusal inside a pipeline, psycopg's "pipeline aborted" warning is the
    expected outcome, not news; other warnings still reach stderr."""
    noise = AbortedPipelineNoise()

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("psycopg", logging.WARNING, __file__, 1, msg, args, None)

    aborted = psycopg.errors.PipelineAborted("pipeline aborted")
    assert not noise.filter(record("error ignored terminating %r: %s", object(), aborted))
    other = psycopg.OperationalError("server closed the connection")
    assert noise.filter(record("error ignored terminating %r: %s", object(), other))
    assert noise.filter(record("something else: %s", aborted))
