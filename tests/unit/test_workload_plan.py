"""The workload plan and the prefill data are pure: same seed, same statements; invariants hold
in what they plan. No database here."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from itertools import islice
from typing import Any

import pytest
import structlog

from cli import main as cli
from cutover.errors import UsageError
from devtools import workload as wl
from devtools.workload import (
    BASE_TIME,
    BULK_EVERY,
    INVOICE_URL_PREFIX,
    KINDS,
    ROLLBACK_ID_BASE,
    ROLLBACK_MARKER,
    TICK,
    Operation,
    OrderState,
    PrefillSizes,
    ProductState,
    StartState,
    plan_operations,
    prefill_tables,
)


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """cli.main() configures structlog to print to the sys.stderr of the moment (a capture
    stream under pytest): put the previous configuration back so later tests can log."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _plan(seed: int, n: int, start: StartState | None = None) -> list[Operation]:
    return list(islice(plan_operations(seed, start), n))


@pytest.fixture(scope="module")
def ops() -> list[Operation]:
    return _plan(42, 5_000)


class _Model:
    """Replays the order-domain statements of a plan into dicts, to check the invariants."""

    def __init__(self) -> None:
        self.totals: dict[int, Decimal] = {}
        self.lines: dict[int, dict[int, tuple[int, Decimal]]] = {}
        self.payments: dict[int, list[Any]] = {}  # id -> [order_id, amount, status]
        self.invoices: dict[int, tuple[int, str, str]] = {}

    def apply(self, sql: str, p: tuple[Any, ...]) -> None:
        if sql == wl.INSERT_ORDER:
            self.totals[p[0]] = p[4]
            self.lines[p[0]] = {}
        elif sql == wl.UPDATE_ORDER_TOTAL:
            self.totals[p[2]] = p[0]
        elif sql == wl.INSERT_ITEM:
            self.lines[p[0]][p[1]] = (p[3], p[4])
        elif sql == wl.UPDATE_ITEM_QTY:
            self.lines[p[1]][p[2]] = (p[0], self.lines[p[1]][p[2]][1])
        elif sql == wl.DELETE_ITEM:
            del self.lines[p[0]][p[1]]
        elif sql == wl.INSERT_PAYMENT:
            self.payments[p[0]] = [p[1], p[3], p[4]]
        elif sql == wl.UPDATE_PAYMENT_AMOUNT:
            self.payments[p[1]][1] = p[0]
        elif sql == wl.UPDATE_PAYMENT_STATUS:
            self.payments[p[1]][2] = p[0]
        elif sql == wl.SETTLE_PAYMENT:
            self.payments[p[2]][2] = "settled"
        elif sql == wl.INSERT_INVOICE:
            self.invoices[p[0]] = (p[1], p[2], p[3])


def _committed_model(ops: list[Operation]) -> _Model:
    model = _Model()
    for op in ops:
        if not op.rollback:
            for sql, params in op.statements:
                model.apply(sql, params)
    return model


def test_same_seed_same_plan_other_seed_other_plan() -> None:
    first = _plan(7, 3_000)
    assert first == _plan(7, 3_000)
    assert first != _plan(8, 3_000)
    # The statements themselves differ, not only the kinds.
    assert [op.statements for op in first[:200]] != [op.statements for op in _plan(8, 200)]


def test_planned_orders_total_is_sum_of_lines(ops: list[Operation]) -> None:
    model = _committed_model(ops)
    assert len(model.totals) > 500
    for order_id, total in model.totals.items():
        lines = model.lines[order_id]
        assert 1 <= len(lines) <= 5
        assert total == sum(qty * price for qty, price in lines.values()), order_id
        assert total.as_tuple().exponent == -2  # numeric(14,2), exact Decimal
        assert Decimal(0) < total < Decimal(10) ** 12


def test_planned_payments_and_invoices_follow_the_order(ops: list[Operation]) -> None:
    model = _committed_model(ops)
    statuses = Counter(status for _, _, status in model.payments.values())
    assert {"pending", "settled", "failed", "refunded"} <= set(statuses)
    for order_id, amount, status in model.payments.values():
        if status in ("pending", "settled", "refunded"):
            assert amount == model.totals[order_id]
    assert model.invoices
    for order_id, number, url in model.invoices.values():
        assert order_id in model.totals
        assert url == INVOICE_URL_PREFIX + number


def test_every_kind_appears_in_5000_operations(ops: list[Operation]) -> None:
    kinds = Counter(op.kind for op in ops)
    assert set(kinds) == set(KINDS)
    # The payment domain dominates, as in the reference scenario.
    assert sum(n for k, n in kinds.items() if k.startswith("order.")) > 0.5 * len(ops)


def test_rolled_back_operations_are_recognisable(ops: list[Operation]) -> None:
    rolled = [op for op in ops if op.rollback]
    assert 0.005 * len(ops) < len(rolled) < 0.05 * len(ops)
    for op in rolled:
        assert op.kind.startswith("rollback.")
        inserted = [p for sql, p in op.statements if sql.startswith("INSERT")]
        assert inserted and all(p[0] >= ROLLBACK_ID_BASE for p in inserted)
        assert any(ROLLBACK_MARKER in repr(p) for _, p in op.statements)
    for op in ops:
        if not op.rollback:
            for _, params in op.statements:
                assert ROLLBACK_MARKER not in repr(params)
                ints = [v for v in params if isinstance(v, int)]
                assert all(v < ROLLBACK_ID_BASE for v in ints)


def test_bulk_reprice_is_one_statement_every_bulk_every(ops: list[Operation]) -> None:
    bulk = [op for op in ops if op.kind == "product.bulk_reprice"]
    assert [op.seq for op in bulk] == [BULK_EVERY - 1, 2 * BULK_EVERY - 1]
    for op in bulk:
        assert len(op.statements) == 1 and op.statements[0][0] == wl.BULK_REPRICE


def test_most_product_updates_leave_the_description_alone(ops: list[Operation]) -> None:
    product_updates = [
        sql
        for op in ops
        if not op.rollback
        for sql, _ in op.statements
        if sql.startswith("UPDATE shop.products")
    ]
    touching = [sql for sql in product_updates if "description" in sql]
    assert touching and len(touching) < 0.1 * len(product_updates)
    descriptions = [
        p[3] for op in ops for sql, p in op.statements if sql == wl.INSERT_PRODUCT and p[3]
    ]
    long = [d for d in descriptions if len(d) > 2_000]
    assert long and all(len(d) <= 8_002 for d in long)


def test_timestamps_come_from_the_plan_clock(ops: list[Operation]) -> None:
    for op in ops[:300]:
        at = BASE_TIME + op.seq * TICK
        for _, params in op.statements:
            stamps = [v for v in params if hasattr(v, "tzinfo")]
            assert all(s == at for s in stamps)


def test_ids_continue_after_the_start_state() -> None:
    start = StartState(
        max_user_id=1_000,
        max_merchant_id=50,
        max_product_id=400,
        max_order_id=9_000,
        max_payment_id=9_500,
        max_invoice_id=8_000,
        user_ids=tuple(range(1, 1_001)),
        merchants=tuple((m, "active") for m in range(1, 51)),
        products=tuple(ProductState(p, p % 50 + 1, 100_000, 10, "live") for p in range(1, 401)),
        open_orders=(OrderState(9_000, 1, "created", 9_500, ((1, 1, 2, 100_000),)),),
    )
    plan = _plan(3, 2_000, start)
    assert plan == _plan(3, 2_000, start)
    inserted: dict[str, list[int]] = {}
    for op in plan:
        if op.rollback:
            continue
        for sql, params in op.statements:
            if sql.startswith("INSERT INTO shop.") and sql != wl.INSERT_ITEM:
                inserted.setdefault(sql.split()[2], []).append(params[0])
    floors = {"shop.users": 1_000, "shop.merchants": 50, "shop.products": 400,
              "shop.orders": 9_000, "shop.payments": 9_500, "shop.invoices": 8_000}  # fmt: skip
    for table, ids in inserted.items():
        assert min(ids) == floors[table] + 1, table
        assert ids == sorted(ids) and len(set(ids)) == len(ids), table
    # Existing rows are worked on too: the open order from the start state moves on.
    order_updates = (wl.UPDATE_ORDER_STATUS, wl.UPDATE_ORDER_TOTAL)
    assert any(
        sql in order_updates and params[2] == 9_000 for op in plan for sql, params in op.statements
    )


@pytest.mark.parametrize("percent", [80, 85, 90, 95, 105, 110, 115, 125])
def test_reprice_rounding_matches_numeric_half_away_from_zero(percent: int) -> None:
    rng = random.Random(percent)
    for _ in range(2_000):
        cents = rng.randint(1, 10**12)
        exact = Decimal(cents).scaleb(-2) * percent / 100
        stored = exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        assert wl._reprice(cents, percent) == int(stored * 100)


def test_prefill_data_is_deterministic_and_consistent() -> None:
    sizes = PrefillSizes(orders=3_000, users=400, merchants=20, products=600)
    tables = dict(prefill_tables(5, sizes))
    assert tables == dict(prefill_tables(5, sizes))
    assert tables != dict(prefill_tables(6, sizes))
    assert {t: len(rows) for t, rows in tables.items() if t in ("users", "orders")} == {
        "users": 400,
        "orders": 3_000,
    }
    rows = {t: [line.rstrip("\n").split("\t") for line in lines] for t, lines in tables.items()}
    sums: dict[str, Decimal] = {}
    for order_id, _, _, qty, price in rows["order_items"]:
        sums[order_id] = sums.get(order_id, Decimal(0)) + int(qty) * Decimal(price)
    totals = {r[0]: Decimal(r[4]) for r in rows["orders"]}
    assert totals == sums
    statuses = {r[0]: r[3] for r in rows["orders"]}
    for _, order_id, _, amount, status, _, _ in rows["payments"]:
        if status in ("settled", "refunded", "pending"):
            assert Decimal(amount) == totals[order_id]
        if status == "settled":
            assert statuses[order_id] in ("paid", "shipped", "completed")
    for _, order_id, number, url, _ in rows["invoices"]:
        assert order_id in totals and url == INVOICE_URL_PREFIX + number
    for line in (line for lines in tables.values() for line in lines):
        assert line.endswith("\n") and "\n" not in line[:-1] and "\\" not in line.replace("\\N", "")
    assert any(len(r[3]) > 2_000 for r in rows["products"])


def test_cli_rejects_bad_flags_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    bad = (["--rate", "0"], ["--rate", "-5"], ["--duration", "0"], ["--orders", "0"],
           ["--workers", "0"])  # fmt: skip
    for argv in bad:
        assert cli.main(["workload", *argv, "--dsn", "host=127.0.0.1 port=1"]) == 2
        err = capsys.readouterr().err
        assert argv[0] in err and "must be" in err


def test_cli_workers_write_directly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["workload", "--workers", "2", "--router", "--dsn", "host=x port=1"]) == 2
    assert "--workers is for direct writes" in capsys.readouterr().err


def test_cli_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["workload", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "--rate",
        "--prefill",
        "signups",
        "TOAST",
        "ROLLBACK-MARKER",
        INVOICE_URL_PREFIX,
    ):
        assert needle in text


# -- workers: sub-plans over disjoint rows ---------------------------------------------------


def _started_state() -> StartState:
    """A shop with 1,000 users, 50 merchants, 400 listings and an open order per merchant."""
    return StartState(
        max_user_id=1_000,
        max_merchant_id=50,
        max_product_id=400,
        max_order_id=9_050,
        max_payment_id=9_550,
        max_invoice_id=8_000,
        user_ids=tuple(range(1, 1_001)),
        merchants=tuple((m, "active") for m in range(1, 51)),
        products=tuple(ProductState(p, p % 50 + 1, 100_000, 10, "live") for p in range(1, 401)),
        open_orders=tuple(
            OrderState(9_000 + m, m, "created", 9_500 + m, ((1, m + 50, 2, 100_000),))
            for m in range(1, 51)
        ),
    )


def _inserted_ids(ops: list[Operation]) -> dict[str, set[int]]:
    """Ids of the rows the operations insert (first parameter of each INSERT), per table."""
    out: dict[str, set[int]] = {}
    for op in ops:
        for text, params in op.statements:
            if text.startswith("INSERT INTO shop.") and "order_items" not in text:
                out.setdefault(text.split()[2], set()).add(params[0])
    return out


def test_one_worker_is_the_plan_as_it_was() -> None:
    start = _started_state()
    assert wl.worker_seed(7, 0, 1) == 7 and wl.split_start(start, 0, 1) is start
    single = list(islice(plan_operations(7, start), 500))
    assert list(islice(plan_operations(7, start, worker=0, workers=1), 500)) == single


def test_workers_get_their_own_seeds_and_ids() -> None:
    seeds = {wl.worker_seed(7, k, 3) for k in range(3)}
    assert len(seeds) == 3 and wl.worker_seed(7, 1, 3) == wl.worker_seed(7, 1, 3)
    assert [wl.owned_id(101, k, 3) for k in range(3)] == [102, 103, 101]
    assert all(wl.owned_id(f, k, 4) % 4 == k and wl.owned_id(f, k, 4) >= f
               for f in range(1, 9) for k in range(4))  # fmt: skip


def test_sub_plans_write_disjoint_rows_and_interleave_the_sequence() -> None:
    start = _started_state()
    plans = [
        list(
            islice(
                plan_operations(
                    wl.worker_seed(5, k, 2), wl.split_start(start, k, 2), worker=k, workers=2,
                    bulk_every=40,
                ),
                1_500,
            )
        )
        for k in range(2)
    ]  # fmt: skip
    for k, ops in enumerate(plans):
        assert [op.seq for op in ops[:3]] == [k, k + 2, k + 4]
        for table, ids in _inserted_ids(ops).items():
            assert all(i % 2 == k for i in ids), table
    # The bulk repricing follows the global sequence: as often as in one plan, in total.
    bulk = [op.seq for ops in plans for op in ops if op.kind == "product.bulk_reprice"]
    assert sorted(bulk) == list(range(39, 3_000, 40))
    # Every row a worker updates by id is one of its own.
    users = [{p[-1] for op in ops for t, p in op.statements if t.startswith("UPDATE shop.users")}
             for ops in plans]  # fmt: skip
    merchants = [{p[-1] for op in ops for t, p in op.statements
                  if t.startswith("UPDATE shop.merchants")} for ops in plans]  # fmt: skip
    orders = [{p[-1] for op in ops for t, p in op.statements if t.startswith("UPDATE shop.orders")}
              for ops in plans]  # fmt: skip
    for touched in (users, merchants, orders):
        assert touched[0] and touched[1] and not touched[0] & touched[1]


def test_split_start_keeps_a_merchants_listings_and_orders_together() -> None:
    start = _started_state()
    parts = [wl.split_start(start, k, 3) for k in range(3)]
    assert sorted(u for p in parts for u in p.user_ids) == sorted(start.user_ids)
    assert sum(len(p.products) for p in parts) == len(start.products)
    for k, part in enumerate(parts):
        assert all(m % 3 == k for m, _ in part.merchants)
        assert all(p.merchant_id % 3 == k for p in part.products)
        assert all(o.merchant_id % 3 == k for o in part.open_orders)
        assert part.max_order_id == start.max_order_id and part.clock == start.clock
    with pytest.raises(UsageError, match=r"worker must be in 0\.\.2"):
        plan_operations(1, start, worker=3, workers=3)
