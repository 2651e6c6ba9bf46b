"""Realistic shop traffic on the legacy database (``cutover workload``).

Two parts, kept apart on purpose:

* **The plan** (pure): :func:`plan_operations` turns a seed and a :class:`StartState` into an
  endless, deterministic stream of :class:`Operation` objects. One operation is one source
  transaction: a tuple of parameterised statements (constant SQL text, plain parameters) and
  whether it ends in COMMIT or ROLLBACK. Ids are allocated by the plan (counters that start after
  the largest ids already in the database, never sequences) and timestamps are a fixed base time
  plus ``seq`` ticks (never ``now()``), so the same seed and the same starting state give the same
  statements in the same order, and two fresh databases end up with identical contents.
  :func:`prefill_tables` is the pure generator of the ``--prefill`` data set (COPY text).
* **The execution** (thin I/O): :func:`run_workload` paces the plan against a monotonic clock
  over one connection in pipeline mode; :func:`prefill` loads the starting data set with COPY.

The traffic, per domain of the reference scenario (docs/ARCHITECTURE.md):

* users (data): signups, profile edits (display name, bio), follower counts, handle and contact
  changes. The social columns (handle, bio, follower_count) are written on purpose: they must
  never leave the old database.
* merchants and products (merchant): shops opening, suspended, reinstated and closed (closing
  hides the shop's live listings in the same transaction), rating changes; listings created
  (40 % with a 2-8 kB description of random words, so it is TOASTed), repriced, restocked,
  hidden, shown again, soft-deleted (``status = 'deleted'``), hard-deleted (a real ``DELETE``),
  retitled, and now and then given a new description. Most product updates leave the description
  untouched (unchanged TOAST values). Every ``bulk_every``-th transaction is one large
  ``UPDATE`` repricing every live listing of one of the biggest merchants (thousands of rows with
  a prefilled database).
* orders (payment): an order is created with 1-5 lines and a pending payment in one transaction
  (``total_idr = Σ qty × unit_price_idr``, exact), edited while unpaid (lines added, removed or
  changed, total and pending amount kept equal to Σ lines), paid (payment settled for the order
  total, status ``paid``, an invoice whose url is ``https://shop.legacy.example/invoice/<no>``),
  payment failures (a failed attempt and a new pending one), cancelled, shipped, completed and
  refunded. Every change of one order is one transaction.
* rolled-back transactions (about 2 %): they write rows whose ids are at or above
  :data:`ROLLBACK_ID_BASE` and text containing :data:`ROLLBACK_MARKER`, then ROLLBACK. Neither may
  ever appear downstream.

Determinism contract: for a given ``seed`` and starting state (the rows already in ``shop``),
the sequence of transactions is fixed. A run bounded by ``max_transactions`` executes exactly
the first N of them; a run bounded by ``duration`` executes a prefix whose length depends on how
fast the machine is. One connection executes them in plan order.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate, islice
from typing import Any, Final

import psycopg
from psycopg import conninfo, sql

from cutover.errors import DatabaseError, UsageError, redact_dsn
from cutover.logging import get_logger
from devtools.workload_send import PipelineSender

__all__ = [
    "BASE_TIME",
    "BULK_EVERY",
    "INVOICE_URL_PREFIX",
    "KINDS",
    "ROLLBACK_ID_BASE",
    "ROLLBACK_MARKER",
    "TABLES",
    "TICK",
    "Operation",
    "PrefillReport",
    "PrefillSizes",
    "ProgressCallback",
    "StartState",
    "Statement",
    "Tally",
    "WorkloadProgress",
    "WorkloadReport",
    "default_prefill_sizes",
    "owned_id",
    "pace",
    "plan_operations",
    "prefill",
    "prefill_tables",
    "read_start_state",
    "run_workload",
    "split_start",
    "worker_seed",
]

# ---------------------------------------------------------------------------------------------
# Constants of the scenario
# ---------------------------------------------------------------------------------------------

#: The plan's clock starts here on an empty database (or one second after the newest timestamp
#: already in ``shop``), and advances by :data:`TICK` per planned transaction.
BASE_TIME: Final = datetime(2024, 1, 1, tzinfo=UTC)
TICK: Final = timedelta(milliseconds=10)
#: Rolled-back transactions insert rows with ids from here up (bigint max is ~9.22e18).
ROLLBACK_ID_BASE: Final = 8_000_000_000_000_000_000
#: ... and write this text into the rows they insert or update.
ROLLBACK_MARKER: Final = "ROLLBACK-MARKER"
INVOICE_URL_PREFIX: Final = "https://shop.legacy.example/invoice/"
#: Every BULK_EVERY-th transaction (seq % BULK_EVERY == BULK_EVERY - 1) is a bulk repricing.
BULK_EVERY: Final = 2_000
TABLES: Final = ("users", "merchants", "products", "orders", "order_items", "payments", "invoices")

# ---------------------------------------------------------------------------------------------
# The statements (constant text: psycopg prepares each once per connection)
# ---------------------------------------------------------------------------------------------

INSERT_USER: Final = (
    "INSERT INTO shop.users (id, handle, display_name, email, phone, follower_count, bio,"
    " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
UPDATE_USER_PROFILE: Final = (
    "UPDATE shop.users SET display_name = %s, bio = %s, updated_at = %s WHERE id = %s"
)
UPDATE_USER_FOLLOWERS: Final = (
    "UPDATE shop.users SET follower_count = greatest(follower_count + %s, 0), updated_at = %s"
    " WHERE id = %s"
)
UPDATE_USER_HANDLE: Final = "UPDATE shop.users SET handle = %s, updated_at = %s WHERE id = %s"
UPDATE_USER_CONTACT: Final = (
    "UPDATE shop.users SET email = %s, phone = %s, updated_at = %s WHERE id = %s"
)
INSERT_MERCHANT: Final = (
    "INSERT INTO shop.merchants (id, owner_user_id, shop_name, status, rating, created_at,"
    " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
UPDATE_MERCHANT_STATUS: Final = (
    "UPDATE shop.merchants SET status = %s, updated_at = %s WHERE id = %s"
)
UPDATE_MERCHANT_RATING: Final = (
    "UPDATE shop.merchants SET rating = %s, updated_at = %s WHERE id = %s"
)
HIDE_MERCHANT_PRODUCTS: Final = (
    "UPDATE shop.products SET status = 'hidden', updated_at = %s"
    " WHERE merchant_id = %s AND status = 'live'"
)
INSERT_PRODUCT: Final = (
    "INSERT INTO shop.products (id, merchant_id, title, description, price_idr, stock, status,"
    " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
UPDATE_PRODUCT_PRICE: Final = (
    "UPDATE shop.products SET price_idr = %s, updated_at = %s WHERE id = %s"
)
UPDATE_PRODUCT_STOCK: Final = "UPDATE shop.products SET stock = %s, updated_at = %s WHERE id = %s"
UPDATE_PRODUCT_STATUS: Final = "UPDATE shop.products SET status = %s, updated_at = %s WHERE id = %s"
UPDATE_PRODUCT_TITLE: Final = "UPDATE shop.products SET title = %s, updated_at = %s WHERE id = %s"
UPDATE_PRODUCT_DESCRIPTION: Final = (
    "UPDATE shop.products SET description = %s, updated_at = %s WHERE id = %s"
)
DELETE_PRODUCT: Final = "DELETE FROM shop.products WHERE id = %s"
#: The large transaction: params (percent, updated_at, merchant_id). The new price is
#: price × percent / 100 rounded half away from zero to 2 decimals by the numeric(14,2) column.
BULK_REPRICE: Final = (
    "UPDATE shop.products SET price_idr = price_idr * %s / 100, updated_at = %s"
    " WHERE merchant_id = %s AND status = 'live'"
)
INSERT_ORDER: Final = (
    "INSERT INTO shop.orders (id, buyer_id, merchant_id, status, total_idr, created_at,"
    " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
UPDATE_ORDER_STATUS: Final = "UPDATE shop.orders SET status = %s, updated_at = %s WHERE id = %s"
UPDATE_ORDER_TOTAL: Final = "UPDATE shop.orders SET total_idr = %s, updated_at = %s WHERE id = %s"
INSERT_ITEM: Final = (
    "INSERT INTO shop.order_items (order_id, line_no, product_id, qty, unit_price_idr)"
    " VALUES (%s, %s, %s, %s, %s)"
)
UPDATE_ITEM_QTY: Final = "UPDATE shop.order_items SET qty = %s WHERE order_id = %s AND line_no = %s"
DELETE_ITEM: Final = "DELETE FROM shop.order_items WHERE order_id = %s AND line_no = %s"
INSERT_PAYMENT: Final = (
    "INSERT INTO shop.payments (id, order_id, method, amount_idr, status, provider_ref, paid_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
)
UPDATE_PAYMENT_AMOUNT: Final = "UPDATE shop.payments SET amount_idr = %s WHERE id = %s"
UPDATE_PAYMENT_STATUS: Final = "UPDATE shop.payments SET status = %s WHERE id = %s"
SETTLE_PAYMENT: Final = (
    "UPDATE shop.payments SET status = 'settled', provider_ref = %s, paid_at = %s WHERE id = %s"
)
INSERT_INVOICE: Final = (
    "INSERT INTO shop.invoices (id, order_id, invoice_no, url, issued_at)"
    " VALUES (%s, %s, %s, %s, %s)"
)

#: One statement: constant SQL text and its positional parameters.
Statement = tuple[str, tuple[Any, ...]]

# Kinds of operation and their weight (per 1,000 planned transactions).
_WEIGHTS: Final[dict[str, int]] = {
    # data domain: users (~20 %)
    "user.signup": 40,
    "user.profile_edit": 60,
    "user.followers": 70,
    "user.handle_change": 10,
    "user.contact_change": 20,
    # merchant domain: merchants and listings (~20 %)
    "merchant.open": 8,
    "merchant.suspend": 3,
    "merchant.reinstate": 3,
    "merchant.close": 2,
    "merchant.rating": 10,
    "product.create": 40,
    "product.reprice": 45,
    "product.restock": 40,
    "product.hide": 10,
    "product.unhide": 8,
    "product.soft_delete": 8,
    "product.hard_delete": 4,
    "product.retitle": 5,
    "product.edit_description": 7,
    # payment domain: orders, lines, payments, invoices (~58 %)
    "order.create": 160,
    "order.edit": 30,
    "order.pay": 110,
    "order.payment_failed": 20,
    "order.cancel": 14,
    "order.ship": 105,
    "order.complete": 95,
    "order.refund": 10,
    # rolled back on purpose (~2 %)
    "rollback.order": 10,
    "rollback.user": 5,
    "rollback.product": 5,
}
_KIND_NAMES: Final = tuple(_WEIGHTS)
_CUM_WEIGHTS: Final = tuple(accumulate(_WEIGHTS.values()))
#: Every kind the plan can produce (the weighted ones plus the scheduled bulk repricing).
KINDS: Final = (*_KIND_NAMES, "product.bulk_reprice")

# ---------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operation:
    """One planned source transaction."""

    seq: int
    kind: str
    statements: tuple[Statement, ...]
    #: True: the transaction ends in ROLLBACK (it must never be seen downstream).
    rollback: bool = False


@dataclass(frozen=True, slots=True)
class ProductState:
    """A listing as the plan knows it (prices in cents, i.e. hundredths of a rupiah)."""

    id: int
    merchant_id: int
    price_cents: int
    stock: int
    status: str


@dataclass(frozen=True, slots=True)
class OrderState:
    """An open order (created, paid or shipped) as the plan knows it.

    ``payment_id`` is the pending payment of a created order or the settled payment of a paid or
    shipped one; ``lines`` (line_no, product_id, qty, unit price in cents) are known for created
    orders only (the only ones that are edited).
    """

    id: int
    merchant_id: int
    status: str
    payment_id: int | None
    lines: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class StartState:
    """What the plan needs to know about the rows already in ``shop`` (read once at start).

    The empty default is an empty database. The id counters of the plan start after the
    ``max_*`` ids; ``clock`` is the plan's first timestamp.
    """

    max_user_id: int = 0
    max_merchant_id: int = 0
    max_product_id: int = 0
    max_order_id: int = 0
    max_payment_id: int = 0
    max_invoice_id: int = 0
    clock: datetime = BASE_TIME
    user_ids: tuple[int, ...] = ()
    merchants: tuple[tuple[int, str], ...] = ()  # (id, status)
    products: tuple[ProductState, ...] = ()
    open_orders: tuple[OrderState, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "max_ids": {
                "users": self.max_user_id,
                "merchants": self.max_merchant_id,
                "products": self.max_product_id,
                "orders": self.max_order_id,
                "payments": self.max_payment_id,
                "invoices": self.max_invoice_id,
            },
            "clock": self.clock.isoformat(),
            "known": {
                "users": len(self.user_ids),
                "merchants": len(self.merchants),
                "products": len(self.products),
                "open_orders": len(self.open_orders),
            },
        }


@dataclass(frozen=True, slots=True)
class WorkloadProgress:
    """Passed to the progress callback a few times a second."""

    transactions: int
    expected: int | None
    elapsed_s: float


ProgressCallback = Callable[[WorkloadProgress], None]


@dataclass(frozen=True, slots=True)
class WorkloadReport:
    """What a workload run did."""

    seed: int
    rate_asked: float
    duration_asked_s: float | None
    max_transactions: int | None
    transactions: int
    committed: int
    rolled_back: int
    statements: int
    elapsed_s: float
    achieved_rate: float
    #: The worst lateness behind the schedule (how far the run fell behind the asked rate).
    max_behind_s: float
    counts: Mapping[str, int] = field(default_factory=dict)
    start: Mapping[str, Any] = field(default_factory=dict)
    #: Router mode only (devtools.workload_router): retries, writes per domain and side.
    router: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "seed": self.seed,
            "rate_asked": self.rate_asked,
            "duration_asked_s": self.duration_asked_s,
            "max_transactions": self.max_transactions,
            "transactions": self.transactions,
            "committed": self.committed,
            "rolled_back": self.rolled_back,
            "statements": self.statements,
            "elapsed_s": round(self.elapsed_s, 3),
            "achieved_rate": round(self.achieved_rate, 1),
            "max_behind_s": round(self.max_behind_s, 3),
            "counts": dict(self.counts),
            "start": dict(self.start),
        }
        if self.router:
            out["router"] = dict(self.router)
        return out


@dataclass(frozen=True, slots=True)
class PrefillSizes:
    orders: int
    users: int
    merchants: int
    products: int


def default_prefill_sizes(
    orders: int,
    *,
    users: int | None = None,
    merchants: int | None = None,
    products: int | None = None,
) -> PrefillSizes:
    """Sizes scaled from the number of orders: users orders/5, merchants orders/200, products
    orders/4 (with small floors), unless given."""
    return PrefillSizes(
        orders=orders,
        users=users if users is not None else max(orders // 5, 50),
        merchants=merchants if merchants is not None else max(orders // 200, 5),
        products=products if products is not None else max(orders // 4, 50),
    )


@dataclass(frozen=True, slots=True)
class PrefillReport:
    seed: int
    rows: Mapping[str, int]
    elapsed_s: float

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rows": dict(self.rows),
            "total_rows": self.total_rows,
            "elapsed_s": round(self.elapsed_s, 3),
            "rows_per_s": round(self.total_rows / self.elapsed_s) if self.elapsed_s > 0 else None,
        }


# ---------------------------------------------------------------------------------------------
# Text and value generators (all driven by one random.Random)
# ---------------------------------------------------------------------------------------------

_FIRST = (
    "ayu", "budi", "citra", "dewi", "eko", "fajar", "gita", "hadi", "indra", "joko", "kartika",
    "lestari", "made", "nur", "putri", "rizky", "sari", "tono", "wulan", "yusuf", "agus", "bayu",
    "dian", "fitri", "hendra", "intan", "kevin", "lina", "maya", "novi", "rahmat", "siti",
)  # fmt: skip
_LAST = (
    "santoso", "wijaya", "pratama", "saputra", "hidayat", "nugroho", "kusuma", "siregar",
    "lubis", "halim", "setiawan", "gunawan", "susanto", "hartono", "purnomo", "syahputra",
)  # fmt: skip
_ADJ = (
    "Classic", "Premium", "Handmade", "Organic", "Vintage", "Compact", "Deluxe", "Eco", "Smart",
    "Mini", "Pro", "Original", "Fresh", "Local", "Royal", "Urban",
)  # fmt: skip
_ITEM = (
    "Batik Shirt", "Sambal Jar", "Coffee Beans", "Rattan Basket", "Phone Case", "Sneakers",
    "Rice Cooker", "Kebaya", "Tote Bag", "Desk Lamp", "Tea Set", "Backpack", "Headphones",
    "Water Bottle", "Keris Replica", "Wayang Puppet", "Silver Ring", "Soap Bar", "Notebook",
)  # fmt: skip
_VARIANT = ("S", "M", "L", "XL", "Red", "Blue", "Black", "250g", "500g", "1kg", "Set of 2", "v2")
_SHOP = ("Toko", "Warung", "Galeri", "Rumah", "Pusat", "Dunia", "Kios", "Butik")
_CITY = (
    "Jakarta", "Bandung", "Surabaya", "Medan", "Yogya", "Bali", "Makassar", "Semarang", "Solo",
)  # fmt: skip
_METHODS = ("card", "ewallet", "bank_transfer", "cod")
_METHOD_CUM = tuple(accumulate((30, 40, 20, 10)))
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class _Text:
    """Seeded, poorly compressible text: slices of a long run of random pseudo-words.

    A vocabulary of a few thousand random letter strings makes pglz gain too little to compress
    (it wants 25 %), so a 2-8 kB description is stored out of line in the TOAST table.
    """

    def __init__(self, rng: random.Random) -> None:
        vocab = ["".join(rng.choices(_LETTERS, k=rng.randint(2, 10))) for _ in range(4_096)]
        self.buf = " ".join(rng.choices(vocab, k=120_000))
        self.rng = rng

    def chunk(self, n: int) -> str:
        rng = self.rng
        start = rng.randrange(len(self.buf) - n - 16)
        start = self.buf.index(" ", start) + 1
        return self.buf[start : start + n].capitalize() + "."

    def description(self) -> str | None:
        """40 % long (2-8 kB, TOASTed), 50 % short, 10 % NULL."""
        r = self.rng.random()
        if r < 0.4:
            return self.chunk(self.rng.randint(2_000, 8_000))
        if r < 0.9:
            return self.chunk(self.rng.randint(40, 400))
        return None


def _money(cents: int) -> Decimal:
    """Cents (hundredths of a rupiah) to an exact numeric(14,2) value."""
    return Decimal(cents).scaleb(-2)


def _cents_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _price_cents(rng: random.Random) -> int:
    """Rupiah prices from 5,000 to 2,500,000, rounded to 500; 15 % with odd cents."""
    cents = rng.randint(10, 5_000) * 500 * 100
    if rng.random() < 0.15:
        cents += rng.randint(1, 99)
    return cents


def _qty(rng: random.Random) -> int:
    return rng.choices((1, 2, 3, 4, 5), cum_weights=(60, 80, 90, 96, 100))[0]


def _reprice(cents: int, percent: int) -> int:
    """What ``numeric(14,2) := price * percent / 100`` stores (half away from zero)."""
    return (cents * percent + 50) // 100


def _invoice_no(invoice_id: int) -> str:
    return f"INV-{invoice_id:010d}"


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_FIRST), rng.choice(_LAST)


def _phone(rng: random.Random) -> str:
    return f"+628{rng.randint(100_000_000, 999_999_999)}"


def _title(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)} {rng.choice(_ITEM)} {rng.choice(_VARIANT)}"


def _shop_name(rng: random.Random, first: str) -> str:
    return f"{rng.choice(_SHOP)} {first.capitalize()} {rng.choice(_CITY)}"


def _rating(rng: random.Random) -> Decimal:
    return Decimal(rng.randint(250, 500)).scaleb(-2)


class _Pool:
    """A set with O(1) add, remove and seeded random pick (insertion-ordered, deterministic)."""

    __slots__ = ("index", "items")

    def __init__(self) -> None:
        self.items: list[int] = []
        self.index: dict[int, int] = {}

    def add(self, item: int) -> None:
        self.index[item] = len(self.items)
        self.items.append(item)

    def remove(self, item: int) -> None:
        i = self.index.pop(item)
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.index[last] = i

    def pick(self, rng: random.Random) -> int:
        return self.items[rng.randrange(len(self.items))]

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item: object) -> bool:
        return item in self.index


class _Product:
    __slots__ = ("id", "merchant_id", "price", "status", "stock")

    def __init__(self, id: int, merchant_id: int, price: int, stock: int, status: str) -> None:
        self.id = id
        self.merchant_id = merchant_id
        self.price = price
        self.stock = stock
        self.status = status


class _Order:
    __slots__ = ("id", "lines", "merchant_id", "payment_id", "status")

    def __init__(
        self,
        id: int,
        merchant_id: int,
        status: str,
        payment_id: int | None,
        lines: list[list[int]],
    ) -> None:
        self.id = id
        self.merchant_id = merchant_id
        self.status = status
        self.payment_id = payment_id
        self.lines = lines  # [line_no, product_id, qty, unit price cents]

    def total(self) -> int:
        return sum(line[2] * line[3] for line in self.lines)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


class _Planner:
    """The model of the shop the plan evolves; one method per kind of operation.

    Each method returns the statements of one transaction, or None when the model has nothing to
    apply it to (then a fallback kind is used). Rolled-back kinds never change the model.
    """

    def __init__(
        self, seed: int, start: StartState, bulk_every: int, worker: int = 0, workers: int = 1
    ) -> None:
        self.rng = random.Random(seed)
        self.text = _Text(self.rng)
        self.bulk_every = bulk_every
        self.clock = start.clock
        # Worker k of n allocates the ids ≡ k (mod n) and plays the global sequence numbers
        # k, k+n, k+2n, ...: n workers never write the same new row (see split_start).
        self.worker, self.stride = worker, workers
        self.next_user = owned_id(start.max_user_id + 1, worker, workers)
        self.next_merchant = owned_id(start.max_merchant_id + 1, worker, workers)
        self.next_product = owned_id(start.max_product_id + 1, worker, workers)
        self.next_order = owned_id(start.max_order_id + 1, worker, workers)
        self.next_payment = owned_id(start.max_payment_id + 1, worker, workers)
        self.next_invoice = owned_id(start.max_invoice_id + 1, worker, workers)
        self.next_rollback = owned_id(ROLLBACK_ID_BASE, worker, workers)
        self.users: list[int] = list(start.user_ids)
        self.merchant_status: dict[int, str] = {}
        self.active = _Pool()
        self.suspended = _Pool()
        for mid, status in start.merchants:
            self._set_merchant(mid, status)
        self.products: dict[int, _Product] = {}
        self.live = _Pool()
        self.hidden = _Pool()
        self.deleted = _Pool()
        self.live_by_merchant: dict[int, _Pool] = {}
        for p in start.products:
            self._add_product(_Product(p.id, p.merchant_id, p.price_cents, p.stock, p.status))
        self.orders: dict[int, _Order] = {}
        self.by_status = {"created": _Pool(), "paid": _Pool(), "shipped": _Pool()}
        for o in start.open_orders:
            if o.payment_id is None or (o.status == "created" and not o.lines):
                continue  # not in a shape the plan understands: leave it alone
            lines = [list(line) for line in o.lines]
            self.orders[o.id] = _Order(o.id, o.merchant_id, o.status, o.payment_id, lines)
            self.by_status[o.status].add(o.id)
        self.methods: dict[str, Callable[[int, datetime], list[Statement] | None]] = {
            name: getattr(self, "_" + name.replace(".", "_")) for name in KINDS
        }

    # -- model helpers ----------------------------------------------------------------------

    def _set_merchant(self, mid: int, status: str) -> None:
        old = self.merchant_status.get(mid)
        if old == "active":
            self.active.remove(mid)
        elif old == "suspended":
            self.suspended.remove(mid)
        self.merchant_status[mid] = status
        if status == "active":
            self.active.add(mid)
        elif status == "suspended":
            self.suspended.add(mid)

    def _status_pool(self, status: str) -> _Pool:
        return {"live": self.live, "hidden": self.hidden}.get(status, self.deleted)

    def _add_product(self, p: _Product) -> None:
        self.products[p.id] = p
        self._status_pool(p.status).add(p.id)
        if p.status == "live":
            self.live_by_merchant.setdefault(p.merchant_id, _Pool()).add(p.id)

    def _set_product_status(self, p: _Product, status: str) -> None:
        self._status_pool(p.status).remove(p.id)
        if p.status == "live":
            self.live_by_merchant[p.merchant_id].remove(p.id)
        p.status = status
        if status == "gone":
            del self.products[p.id]
            return
        self._status_pool(status).add(p.id)
        if status == "live":
            self.live_by_merchant.setdefault(p.merchant_id, _Pool()).add(p.id)

    def _set_order_status(self, o: _Order, status: str) -> None:
        self.by_status[o.status].remove(o.id)
        o.status = status
        if status in self.by_status:
            self.by_status[status].add(o.id)
        else:
            del self.orders[o.id]  # completed or cancelled: the plan is done with it
        if status != "created":
            o.lines = []  # lines are only needed while the order can be edited

    def _pick_order(self, status: str) -> _Order | None:
        pool = self.by_status[status]
        return self.orders[pool.pick(self.rng)] if pool else None

    def _pick_user(self) -> int | None:
        return self.users[self.rng.randrange(len(self.users))] if self.users else None

    def _sellable(self) -> tuple[int, _Pool] | None:
        """An active merchant with live listings, found through a random live listing."""
        rng = self.rng
        for _ in range(4):
            if not self.live:
                return None
            p = self.products[self.live.pick(rng)]
            if self.merchant_status.get(p.merchant_id) == "active":
                return p.merchant_id, self.live_by_merchant[p.merchant_id]
        return None

    # -- the stream -------------------------------------------------------------------------

    def operations(self) -> Iterator[Operation]:
        rng = self.rng
        seq = self.worker
        methods = self.methods
        while True:
            at = self.clock + seq * TICK
            if len(self.users) < 10:
                kind = "user.signup"
            elif len(self.active) < 3:
                kind = "merchant.open"
            elif len(self.live) < 20:
                kind = "product.create"
            elif seq % self.bulk_every == self.bulk_every - 1:
                kind = "product.bulk_reprice"
            else:
                kind = rng.choices(_KIND_NAMES, cum_weights=_CUM_WEIGHTS)[0]
            statements = methods[kind](seq, at)
            if statements is None:
                kind = "order.create"
                statements = self._order_create(seq, at)
            if statements is None:  # pragma: no cover - the bootstrap above prevents it
                kind = "user.signup"
                statements = self._user_signup(seq, at)
            assert statements is not None
            yield Operation(seq, kind, tuple(statements), kind.startswith("rollback."))
            seq += self.stride

    # -- users ------------------------------------------------------------------------------

    def _new_user(self, uid: int, at: datetime, marker: str = "") -> Statement:
        rng = self.rng
        first, last = _person(rng)
        handle = f"{first}{last}_{uid}{marker}"
        bio = self.text.chunk(rng.randint(20, 200)) + marker if rng.random() < 0.7 else None
        return (
            INSERT_USER,
            (
                uid,
                handle,
                f"{first.capitalize()} {last.capitalize()}",
                f"{first}.{last}{uid}@mail.example",
                _phone(rng) if rng.random() < 0.8 else None,
                rng.randint(0, 5_000),
                bio,
                at,
                at,
            ),
        )

    def _user_signup(self, seq: int, at: datetime) -> list[Statement]:
        uid = self.next_user
        self.next_user += self.stride
        self.users.append(uid)
        return [self._new_user(uid, at)]

    def _user_profile_edit(self, seq: int, at: datetime) -> list[Statement] | None:
        uid = self._pick_user()
        if uid is None:
            return None
        rng = self.rng
        first, last = _person(rng)
        bio = self.text.chunk(rng.randint(20, 300)) if rng.random() < 0.8 else None
        name = f"{first.capitalize()} {last.capitalize()}"
        return [(UPDATE_USER_PROFILE, (name, bio, at, uid))]

    def _user_followers(self, seq: int, at: datetime) -> list[Statement] | None:
        uid = self._pick_user()
        if uid is None:
            return None
        return [(UPDATE_USER_FOLLOWERS, (self.rng.randint(-5, 40), at, uid))]

    def _user_handle_change(self, seq: int, at: datetime) -> list[Statement] | None:
        uid = self._pick_user()
        if uid is None:
            return None
        # Two underscores: never equal to a signup handle (one underscore), unique by seq.
        return [(UPDATE_USER_HANDLE, (f"{self.rng.choice(_FIRST)}_{uid}_{seq}", at, uid))]

    def _user_contact_change(self, seq: int, at: datetime) -> list[Statement] | None:
        uid = self._pick_user()
        if uid is None:
            return None
        rng = self.rng
        email = f"{rng.choice(_FIRST)}{uid}.{seq}@mail.example"
        return [(UPDATE_USER_CONTACT, (email, _phone(rng), at, uid))]

    # -- merchants --------------------------------------------------------------------------

    def _merchant_open(self, seq: int, at: datetime) -> list[Statement] | None:
        owner = self._pick_user()
        if owner is None:
            return None
        rng = self.rng
        mid = self.next_merchant
        self.next_merchant += self.stride
        self._set_merchant(mid, "active")
        name = _shop_name(rng, rng.choice(_FIRST))
        rating = _rating(rng) if rng.random() < 0.5 else None
        return [(INSERT_MERCHANT, (mid, owner, name, "active", rating, at, at))]

    def _merchant_suspend(self, seq: int, at: datetime) -> list[Statement] | None:
        if len(self.active) <= 3:
            return None
        mid = self.active.pick(self.rng)
        self._set_merchant(mid, "suspended")
        return [(UPDATE_MERCHANT_STATUS, ("suspended", at, mid))]

    def _merchant_reinstate(self, seq: int, at: datetime) -> list[Statement] | None:
        if not self.suspended:
            return None
        mid = self.suspended.pick(self.rng)
        self._set_merchant(mid, "active")
        return [(UPDATE_MERCHANT_STATUS, ("active", at, mid))]

    def _merchant_close(self, seq: int, at: datetime) -> list[Statement] | None:
        """Close a shop and hide its live listings, in one transaction."""
        pool = self.suspended if self.suspended and self.rng.random() < 0.5 else self.active
        if len(pool) <= (3 if pool is self.active else 0):
            return None
        mid = pool.pick(self.rng)
        self._set_merchant(mid, "closed")
        for pid in list(self.live_by_merchant.get(mid, _Pool()).items):
            self._set_product_status(self.products[pid], "hidden")
        return [
            (UPDATE_MERCHANT_STATUS, ("closed", at, mid)),
            (HIDE_MERCHANT_PRODUCTS, (at, mid)),
        ]

    def _merchant_rating(self, seq: int, at: datetime) -> list[Statement] | None:
        if not self.active:
            return None
        mid = self.active.pick(self.rng)
        return [(UPDATE_MERCHANT_RATING, (_rating(self.rng), at, mid))]

    # -- products ---------------------------------------------------------------------------

    def _product_create(self, seq: int, at: datetime) -> list[Statement] | None:
        if not self.active:
            return None
        rng = self.rng
        mid = self.active.pick(rng)
        pid = self.next_product
        self.next_product += self.stride
        price = _price_cents(rng)
        stock = rng.randint(0, 500)
        self._add_product(_Product(pid, mid, price, stock, "live"))
        row = (pid, mid, _title(rng), self.text.description(), _money(price), stock, "live", at)
        return [(INSERT_PRODUCT, row)]

    def _pick_product(self, pool: _Pool) -> _Product | None:
        return self.products[pool.pick(self.rng)] if pool else None

    def _product_reprice(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.live)
        if p is None:
            return None
        p.price = _reprice(p.price, self.rng.choice((80, 90, 95, 105, 110, 125)))
        return [(UPDATE_PRODUCT_PRICE, (_money(p.price), at, p.id))]

    def _product_restock(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.live if self.rng.random() < 0.8 else self.hidden)
        if p is None:
            return None
        p.stock = self.rng.randint(0, 1_000)
        return [(UPDATE_PRODUCT_STOCK, (p.stock, at, p.id))]

    def _product_hide(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.live)
        if p is None or len(self.live) <= 20:
            return None
        self._set_product_status(p, "hidden")
        return [(UPDATE_PRODUCT_STATUS, ("hidden", at, p.id))]

    def _product_unhide(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.hidden)
        if p is None or self.merchant_status.get(p.merchant_id) == "closed":
            return None
        self._set_product_status(p, "live")
        return [(UPDATE_PRODUCT_STATUS, ("live", at, p.id))]

    def _product_soft_delete(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.hidden if self.rng.random() < 0.5 else self.live)
        if p is None or len(self.live) <= 20:
            return None
        self._set_product_status(p, "deleted")
        return [(UPDATE_PRODUCT_STATUS, ("deleted", at, p.id))]

    def _product_hard_delete(self, seq: int, at: datetime) -> list[Statement] | None:
        """A real DELETE: mostly purging soft-deleted listings, sometimes hidden ones."""
        p = self._pick_product(self.deleted) or self._pick_product(self.hidden)
        if p is None:
            return None
        self._set_product_status(p, "gone")
        return [(DELETE_PRODUCT, (p.id,))]

    def _product_retitle(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.live)
        if p is None:
            return None
        return [(UPDATE_PRODUCT_TITLE, (_title(self.rng), at, p.id))]

    def _product_edit_description(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.live)
        if p is None:
            return None
        text = self.text.chunk(self.rng.randint(2_000, 8_000))
        return [(UPDATE_PRODUCT_DESCRIPTION, (text, at, p.id))]

    def _product_bulk_reprice(self, seq: int, at: datetime) -> list[Statement] | None:
        """The large transaction: one UPDATE repricing every live listing of a big merchant."""
        ranked = sorted(
            ((len(pool), mid) for mid, pool in self.live_by_merchant.items() if pool),
            reverse=True,
        )[:3]
        if not ranked:
            return None
        mid = ranked[self.rng.randrange(len(ranked))][1]
        # A 20 % sale or its end (x 0.8, x 1.25): no drift of prices over long runs.
        percent = self.rng.choice((80, 125))
        for pid in self.live_by_merchant[mid].items:
            p = self.products[pid]
            p.price = _reprice(p.price, percent)
        return [(BULK_REPRICE, (percent, at, mid))]

    # -- orders -----------------------------------------------------------------------------

    def _order_lines(self, pool: _Pool, n: int, first_line: int = 1) -> list[list[int]]:
        rng = self.rng
        return [
            [first_line + i, pid, _qty(rng), self.products[pid].price]
            for i, pid in enumerate(pool.pick(rng) for _ in range(n))
        ]

    def _method(self) -> str:
        return self.rng.choices(_METHODS, cum_weights=_METHOD_CUM)[0]

    def _order_create(self, seq: int, at: datetime) -> list[Statement] | None:
        """Checkout: the order, its 1-5 lines and a pending payment for the total."""
        buyer = self._pick_user()
        sellable = self._sellable()
        if buyer is None or sellable is None:
            return None
        mid, pool = sellable
        rng = self.rng
        oid = self.next_order
        self.next_order += self.stride
        pay_id = self.next_payment
        self.next_payment += self.stride
        lines = self._order_lines(pool, rng.randint(1, 5))
        order = _Order(oid, mid, "created", pay_id, lines)
        self.orders[oid] = order
        self.by_status["created"].add(oid)
        total = _money(order.total())
        out: list[Statement] = [(INSERT_ORDER, (oid, buyer, mid, "created", total, at, at))]
        for line_no, pid, qty, price in lines:
            out.append((INSERT_ITEM, (oid, line_no, pid, qty, _money(price))))
        out.append((INSERT_PAYMENT, (pay_id, oid, self._method(), total, "pending", None, None)))
        return out

    def _order_edit(self, seq: int, at: datetime) -> list[Statement] | None:
        """The buyer changes an unpaid order: total and pending amount follow Σ lines."""
        o = self._pick_order("created")
        if o is None:
            return None
        rng = self.rng
        out: list[Statement] = []
        choice = rng.random()
        pool = self.live_by_merchant.get(o.merchant_id)
        if choice < 0.35 and len(o.lines) < 5 and pool:
            line = self._order_lines(pool, 1, first_line=o.lines[-1][0] + 1)[0]
            o.lines.append(line)
            out.append((INSERT_ITEM, (o.id, line[0], line[1], line[2], _money(line[3]))))
        elif choice < 0.6 and len(o.lines) > 1:
            line = o.lines.pop(rng.randrange(len(o.lines)))
            out.append((DELETE_ITEM, (o.id, line[0])))
        else:
            line = o.lines[rng.randrange(len(o.lines))]
            line[2] = line[2] % 5 + 1
            out.append((UPDATE_ITEM_QTY, (line[2], o.id, line[0])))
        total = _money(o.total())
        out.append((UPDATE_ORDER_TOTAL, (total, at, o.id)))
        out.append((UPDATE_PAYMENT_AMOUNT, (total, o.payment_id)))
        return out

    def _order_pay(self, seq: int, at: datetime) -> list[Statement] | None:
        """The pending payment settles: order paid, invoice issued."""
        o = self._pick_order("created")
        if o is None:
            return None
        inv = self.next_invoice
        self.next_invoice += self.stride
        no = _invoice_no(inv)
        ref = f"psp-{self.rng.getrandbits(48):012x}"
        self._set_order_status(o, "paid")
        return [
            (SETTLE_PAYMENT, (ref, at, o.payment_id)),
            (UPDATE_ORDER_STATUS, ("paid", at, o.id)),
            (INSERT_INVOICE, (inv, o.id, no, INVOICE_URL_PREFIX + no, at)),
        ]

    def _order_payment_failed(self, seq: int, at: datetime) -> list[Statement] | None:
        """The pending attempt fails; the buyer starts another one for the same total."""
        o = self._pick_order("created")
        if o is None:
            return None
        pay_id = self.next_payment
        self.next_payment += self.stride
        failed, o.payment_id = o.payment_id, pay_id
        total = _money(o.total())
        return [
            (UPDATE_PAYMENT_STATUS, ("failed", failed)),
            (INSERT_PAYMENT, (pay_id, o.id, self._method(), total, "pending", None, None)),
        ]

    def _order_cancel(self, seq: int, at: datetime) -> list[Statement] | None:
        o = self._pick_order("created")
        if o is None:
            return None
        pay_id = o.payment_id
        self._set_order_status(o, "cancelled")
        return [
            (UPDATE_PAYMENT_STATUS, ("failed", pay_id)),
            (UPDATE_ORDER_STATUS, ("cancelled", at, o.id)),
        ]

    def _order_ship(self, seq: int, at: datetime) -> list[Statement] | None:
        o = self._pick_order("paid")
        if o is None:
            return None
        self._set_order_status(o, "shipped")
        return [(UPDATE_ORDER_STATUS, ("shipped", at, o.id))]

    def _order_complete(self, seq: int, at: datetime) -> list[Statement] | None:
        o = self._pick_order("shipped")
        if o is None:
            return None
        self._set_order_status(o, "completed")
        return [(UPDATE_ORDER_STATUS, ("completed", at, o.id))]

    def _order_refund(self, seq: int, at: datetime) -> list[Statement] | None:
        o = self._pick_order("paid" if self.rng.random() < 0.5 else "shipped")
        if o is None:
            return None
        pay_id = o.payment_id
        self._set_order_status(o, "cancelled")
        return [
            (UPDATE_PAYMENT_STATUS, ("refunded", pay_id)),
            (UPDATE_ORDER_STATUS, ("cancelled", at, o.id)),
        ]

    # -- rolled back on purpose -------------------------------------------------------------

    def _reserved(self) -> int:
        rid = self.next_rollback
        self.next_rollback += self.stride
        return rid

    def _rollback_order(self, seq: int, at: datetime) -> list[Statement] | None:
        buyer = self._pick_user()
        sellable = self._sellable()
        if buyer is None or sellable is None:
            return None
        mid, pool = sellable
        rng = self.rng
        oid, pay_id, inv = self._reserved(), self._reserved(), self._reserved()
        lines = self._order_lines(pool, rng.randint(1, 5))
        total = _money(sum(line[2] * line[3] for line in lines))
        no = f"{ROLLBACK_MARKER}-{inv}"
        out: list[Statement] = [(INSERT_ORDER, (oid, buyer, mid, "paid", total, at, at))]
        for line_no, pid, qty, price in lines:
            out.append((INSERT_ITEM, (oid, line_no, pid, qty, _money(price))))
        out.append((INSERT_PAYMENT, (pay_id, oid, "card", total, "settled", no, at)))
        out.append((INSERT_INVOICE, (inv, oid, no, INVOICE_URL_PREFIX + no, at)))
        return out

    def _rollback_user(self, seq: int, at: datetime) -> list[Statement] | None:
        uid = self._pick_user()
        if uid is None:
            return None
        return [
            self._new_user(self._reserved(), at, marker=ROLLBACK_MARKER),
            (UPDATE_USER_PROFILE, (ROLLBACK_MARKER, ROLLBACK_MARKER, at, uid)),
            (UPDATE_USER_FOLLOWERS, (1_000_000, at, uid)),
        ]

    def _rollback_product(self, seq: int, at: datetime) -> list[Statement] | None:
        p = self._pick_product(self.live)
        if p is None:
            return None
        rid = self._reserved()
        marker_title = f"{ROLLBACK_MARKER} {rid}"
        desc = self.text.chunk(3_000) + " " + ROLLBACK_MARKER
        return [
            (UPDATE_PRODUCT_TITLE, (marker_title, at, p.id)),
            (UPDATE_PRODUCT_PRICE, (_money(1), at, p.id)),
            (INSERT_PRODUCT, (rid, p.merchant_id, marker_title, desc, _money(1), 1, "live", at)),
        ]


def plan_operations(
    seed: int,
    start: StartState | None = None,
    *,
    bulk_every: int = BULK_EVERY,
    worker: int = 0,
    workers: int = 1,
) -> Iterator[Operation]:
    """The endless, deterministic stream of transactions for ``seed`` from ``start`` (pure).

    Take what you need with ``itertools.islice``. Two calls with the same arguments yield equal
    operations; the stream never touches the database. ``worker`` k of ``workers`` n > 1 gives
    that worker's sub-plan: pass it ``split_start(start, k, n)`` and ``worker_seed(seed, k, n)``;
    its operations carry the sequence numbers k, k+n, ... (timestamps and the bulk repricing
    follow them) and every id it allocates is ≡ k (mod n), so the n sub-plans write disjoint rows.
    """
    if bulk_every < 1:
        raise UsageError(f"bulk_every must be at least 1, not {bulk_every}")
    if not 0 <= worker < workers:
        raise UsageError(f"worker must be in 0..{workers - 1}, not {worker}")
    return _Planner(seed, start or StartState(), bulk_every, worker, workers).operations()


def owned_id(first: int, worker: int, workers: int) -> int:
    """The smallest id ≥ ``first`` that worker k of n allocates (ids ≡ k mod n)."""
    return first + (worker - first) % workers


def worker_seed(seed: int, worker: int, workers: int) -> int:
    """The seed of worker k of n: ``seed`` itself for one worker (the plan stays as it was),
    else derived from (seed, k, n) so that the workers' random choices are independent."""
    if workers == 1:
        return seed
    digest = hashlib.sha256(f"workload:{seed}:{worker}/{workers}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_start(start: StartState, worker: int, workers: int) -> StartState:
    """The rows worker k of n may write: users and merchants with id ≡ k (mod n), and the
    products and open orders of those merchants (an order's lines are its merchant's listings).
    The max ids and the clock stay global (ids are allocated by :func:`owned_id`)."""
    if workers == 1:
        return start

    def mine(row_id: int) -> bool:
        return row_id % workers == worker

    return replace(
        start,
        user_ids=tuple(u for u in start.user_ids if mine(u)),
        merchants=tuple(m for m in start.merchants if mine(m[0])),
        products=tuple(p for p in start.products if mine(p.merchant_id)),
        open_orders=tuple(o for o in start.open_orders if mine(o.merchant_id)),
    )


# ---------------------------------------------------------------------------------------------
# Prefill data (pure): COPY text per table
# ---------------------------------------------------------------------------------------------

_ORDER_STATUSES = ("created", "paid", "shipped", "completed", "cancelled")
_ORDER_STATUS_CUM = tuple(accumulate((6, 6, 8, 72, 8)))


def _ts(t: datetime) -> str:
    return t.isoformat()


def prefill_tables(
    seed: int, sizes: PrefillSizes, start: StartState | None = None
) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(table, copy_lines)`` for the prefill data set, in load order (pure).

    Each line is one row in COPY text format (tab-separated, ``\\N`` for NULL, newline-ended).
    Ids start after ``start``'s max ids; timestamps start at ``start.clock``. The invariants hold:
    order totals are Σ lines; a created order has one pending payment (after an occasional failed
    one), paid/shipped/completed orders a settled payment for the total and an invoice, cancelled
    orders a failed or refunded payment. Product merchants follow a 1/rank law, so the biggest
    merchants hold thousands of listings when there are tens of thousands of them.
    """
    start = start or StartState()
    rng = random.Random(f"prefill:{seed}")
    text = _Text(rng)
    t0 = start.clock
    second = timedelta(seconds=1)

    # users
    u0 = start.max_user_id
    user_ids = range(u0 + 1, u0 + sizes.users + 1)
    lines: list[str] = []
    for i, uid in enumerate(user_ids):
        first, last = _person(rng)
        at = _ts(t0 + i * 7 * second)
        bio = text.chunk(rng.randint(20, 200)) if rng.random() < 0.7 else "\\N"
        phone = _phone(rng) if rng.random() < 0.8 else "\\N"
        lines.append(
            f"{uid}\t{first}{last}_{uid}\t{first.capitalize()} {last.capitalize()}\t"
            f"{first}.{last}{uid}@mail.example\t{phone}\t{rng.randint(0, 5_000)}\t{bio}\t"
            f"{at}\t{at}\n"
        )
    yield "users", lines

    # merchants
    m0 = start.max_merchant_id
    merchant_ids = list(range(m0 + 1, m0 + sizes.merchants + 1))
    statuses = rng.choices(("active", "suspended", "closed"), (90, 6, 4), k=len(merchant_ids))
    statuses[0] = "active"  # the biggest merchant always sells
    lines = []
    for i, (mid, status) in enumerate(zip(merchant_ids, statuses, strict=True)):
        at = _ts(t0 + i * 60 * second)
        owner = rng.choice(user_ids)
        rating = _cents_text(rng.randint(250, 500)) if rng.random() < 0.8 else "\\N"
        name = _shop_name(rng, rng.choice(_FIRST))
        lines.append(f"{mid}\t{owner}\t{name}\t{status}\t{rating}\t{at}\t{at}\n")
    yield "merchants", lines
    merchant_status = dict(zip(merchant_ids, statuses, strict=True))

    # products
    p0 = start.max_product_id
    zipf = list(accumulate(1 / rank for rank in range(1, len(merchant_ids) + 1)))
    owners = rng.choices(merchant_ids, cum_weights=zipf, k=sizes.products)
    pstatus = rng.choices(("live", "hidden", "deleted"), (85, 10, 5), k=sizes.products)
    live_by_merchant: dict[int, list[tuple[int, int]]] = {}
    lines = []
    for i, mid in enumerate(owners):
        pid = p0 + 1 + i
        price = _price_cents(rng)
        status = pstatus[i]
        if merchant_status[mid] == "closed" and status == "live":
            status = "hidden"
        if status == "live":
            live_by_merchant.setdefault(mid, []).append((pid, price))
        desc = text.description() or "\\N"
        lines.append(
            f"{pid}\t{mid}\t{_title(rng)}\t{desc}\t{_cents_text(price)}\t{rng.randint(0, 500)}\t"
            f"{status}\t{_ts(t0 + i * 3 * second)}\n"
        )
    yield "products", lines

    # orders with their lines, payments and invoices
    sellers = [m for m in merchant_ids if merchant_status[m] == "active" and m in live_by_merchant]
    if not sellers and sizes.orders:
        raise UsageError("prefill needs at least one active merchant with live products")
    by_size = list(accumulate(len(live_by_merchant[m]) for m in sellers))
    seller_of = rng.choices(sellers, cum_weights=by_size, k=sizes.orders)
    order_status = rng.choices(_ORDER_STATUSES, cum_weights=_ORDER_STATUS_CUM, k=sizes.orders)
    o0, pay, inv = start.max_order_id, start.max_payment_id, start.max_invoice_id
    orders: list[str] = []
    items: list[str] = []
    payments: list[str] = []
    invoices: list[str] = []
    n_users = len(user_ids)
    for i in range(sizes.orders):
        oid = o0 + 1 + i
        mid = seller_of[i]
        status = order_status[i]
        catalogue = live_by_merchant[mid]
        created = t0 + i * 20 * second
        total = 0
        for line_no in range(1, rng.randint(1, 5) + 1):
            pid, price = catalogue[rng.randrange(len(catalogue))]
            qty = _qty(rng)
            total += qty * price
            items.append(f"{oid}\t{line_no}\t{pid}\t{qty}\t{_cents_text(price)}\n")
        amount = _cents_text(total)
        buyer = user_ids[rng.randrange(n_users)]
        paid = created + rng.randint(60, 3_600) * second
        updated = created if status == "created" else paid + rng.randint(0, 86_400) * second
        orders.append(
            f"{oid}\t{buyer}\t{mid}\t{status}\t{amount}\t{_ts(created)}\t{_ts(updated)}\n"
        )
        method = rng.choices(_METHODS, cum_weights=_METHOD_CUM)[0]
        if rng.random() < 0.05:  # an earlier attempt that failed
            pay += 1
            payments.append(f"{pay}\t{oid}\t{method}\t{amount}\tfailed\t\\N\t\\N\n")
        pay += 1
        refunded = status == "cancelled" and rng.random() < 0.4
        if status == "created":
            payments.append(f"{pay}\t{oid}\t{method}\t{amount}\tpending\t\\N\t\\N\n")
        elif status == "cancelled" and not refunded:
            payments.append(f"{pay}\t{oid}\t{method}\t{amount}\tfailed\t\\N\t\\N\n")
        else:
            pstat = "refunded" if refunded else "settled"
            ref = f"psp-{rng.getrandbits(48):012x}"
            payments.append(f"{pay}\t{oid}\t{method}\t{amount}\t{pstat}\t{ref}\t{_ts(paid)}\n")
            inv += 1
            no = _invoice_no(inv)
            invoices.append(f"{inv}\t{oid}\t{no}\t{INVOICE_URL_PREFIX}{no}\t{_ts(paid)}\n")
    yield "orders", orders
    yield "order_items", items
    yield "payments", payments
    yield "invoices", invoices


_COPY_COLUMNS: Final[dict[str, str]] = {
    "users": "COPY shop.users (id, handle, display_name, email, phone, follower_count, bio,"
    " created_at, updated_at) FROM STDIN",
    "merchants": "COPY shop.merchants (id, owner_user_id, shop_name, status, rating, created_at,"
    " updated_at) FROM STDIN",
    "products": "COPY shop.products (id, merchant_id, title, description, price_idr, stock,"
    " status, updated_at) FROM STDIN",
    "orders": "COPY shop.orders (id, buyer_id, merchant_id, status, total_idr, created_at,"
    " updated_at) FROM STDIN",
    "order_items": "COPY shop.order_items (order_id, line_no, product_id, qty, unit_price_idr)"
    " FROM STDIN",
    "payments": "COPY shop.payments (id, order_id, method, amount_idr, status, provider_ref,"
    " paid_at) FROM STDIN",
    "invoices": "COPY shop.invoices (id, order_id, invoice_no, url, issued_at) FROM STDIN",
}


# ---------------------------------------------------------------------------------------------
# Database edge: connecting, errors, the starting state
# ---------------------------------------------------------------------------------------------


def _where(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages (never the password)."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = str(params.get("port") or "5432")
    db = str(params.get("dbname") or params.get("user") or "")
    return redact_dsn(f"{host}:{port}/{db}" if db else f"{host}:{port}")


def _db_error(exc: psycopg.Error, dsn: str, doing: str) -> DatabaseError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseError(
        f"{doing} on {_where(dsn)} failed: {reason}", side="source", sqlstate=exc.sqlstate
    )


def _connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    try:
        conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise UsageError(f"invalid source DSN: {redact_dsn(str(exc))}") from None
    try:
        conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name="cutover-workload"
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer"
        reason = reason.removeprefix("connection failed: ")
        raise DatabaseError(
            f"cannot connect to {_where(dsn)} ({reason}). Is the legacy PostgreSQL running? "
            "Start the local stack with `make up` and load examples/shop/legacy.sql, or pass "
            "--dsn / set CUTOVER_SOURCE_DSN",
            side="source",
            sqlstate=exc.sqlstate,
        ) from None
    try:
        missing = [
            t
            for t in TABLES
            if conn.execute("SELECT to_regclass(%s)", (f"shop.{t}",)).fetchone() == (None,)
        ]
    except psycopg.Error as exc:
        conn.close()
        raise _db_error(exc, dsn, "checking the shop schema") from None
    if missing:
        conn.close()
        raise DatabaseError(
            f"the shop schema is missing in {_where(dsn)} (no table shop.{missing[0]}): run "
            "`cutover init` or `psql -f examples/shop/legacy.sql` against that database",
            side="source",
            sqlstate="42P01",
        )
    return conn


_START_QUERIES: Final = {
    "max_ids": (
        "SELECT (SELECT coalesce(max(id), 0) FROM shop.users WHERE id < %(b)s),"
        " (SELECT coalesce(max(id), 0) FROM shop.merchants WHERE id < %(b)s),"
        " (SELECT coalesce(max(id), 0) FROM shop.products WHERE id < %(b)s),"
        " (SELECT coalesce(max(id), 0) FROM shop.orders WHERE id < %(b)s),"
        " (SELECT coalesce(max(id), 0) FROM shop.payments WHERE id < %(b)s),"
        " (SELECT coalesce(max(id), 0) FROM shop.invoices WHERE id < %(b)s),"
        " greatest((SELECT max(greatest(created_at, updated_at)) FROM shop.users),"
        "  (SELECT max(greatest(created_at, updated_at)) FROM shop.merchants),"
        "  (SELECT max(updated_at) FROM shop.products),"
        "  (SELECT max(greatest(created_at, updated_at)) FROM shop.orders),"
        "  (SELECT max(paid_at) FROM shop.payments),"
        "  (SELECT max(issued_at) FROM shop.invoices))"
    ),
    "users": "SELECT id FROM shop.users WHERE id < %(b)s ORDER BY id DESC LIMIT 500000",
    "merchants": "SELECT id, status FROM shop.merchants WHERE id < %(b)s ORDER BY id",
    "products": (
        "SELECT id, merchant_id, (price_idr * 100)::bigint, stock, status FROM shop.products"
        " WHERE id < %(b)s ORDER BY id DESC LIMIT 300000"
    ),
    "orders": (
        "SELECT o.id, o.merchant_id, o.status,"
        " (SELECT p.id FROM shop.payments p WHERE p.order_id = o.id"
        "   AND p.status = CASE o.status WHEN 'created' THEN 'pending' ELSE 'settled' END"
        "   ORDER BY p.id DESC LIMIT 1)"
        " FROM shop.orders o WHERE o.id < %(b)s AND o.status IN ('created', 'paid', 'shipped')"
        " ORDER BY o.id DESC LIMIT 100000"
    ),
    "lines": (
        "SELECT i.order_id, i.line_no, i.product_id, i.qty, (i.unit_price_idr * 100)::bigint"
        " FROM shop.order_items i JOIN shop.orders o ON o.id = i.order_id"
        " WHERE o.id < %(b)s AND o.status = 'created' ORDER BY i.order_id, i.line_no"
    ),
}


def read_start_state(conn: psycopg.Connection[tuple[Any, ...]]) -> StartState:
    """Read, in one repeatable-read snapshot, what the plan needs about the existing rows."""
    b = {"b": ROLLBACK_ID_BASE}
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute(_START_QUERIES["max_ids"], b).fetchone()
        assert row is not None
        users = conn.execute(_START_QUERIES["users"], b).fetchall()
        merchants = conn.execute(_START_QUERIES["merchants"], b).fetchall()
        products = conn.execute(_START_QUERIES["products"], b).fetchall()
        orders = conn.execute(_START_QUERIES["orders"], b).fetchall()
        line_rows = conn.execute(_START_QUERIES["lines"], b).fetchall()
    newest: datetime | None = row[6]
    clock = BASE_TIME
    if newest is not None and newest + timedelta(seconds=1) > clock:
        clock = (newest + timedelta(seconds=1)).astimezone(UTC).replace(microsecond=0)
    lines: dict[int, list[tuple[int, int, int, int]]] = {}
    for oid, line_no, pid, qty, price in line_rows:
        lines.setdefault(oid, []).append((line_no, pid, qty, price))
    return StartState(
        max_user_id=row[0],
        max_merchant_id=row[1],
        max_product_id=row[2],
        max_order_id=row[3],
        max_payment_id=row[4],
        max_invoice_id=row[5],
        clock=clock,
        user_ids=tuple(r[0] for r in reversed(users)),
        merchants=tuple((r[0], r[1]) for r in merchants),
        products=tuple(ProductState(*r) for r in reversed(products)),
        open_orders=tuple(
            OrderState(r[0], r[1], r[2], r[3], tuple(lines.get(r[0], ()))) for r in reversed(orders)
        ),
    )


# ---------------------------------------------------------------------------------------------
# Running the workload
# ---------------------------------------------------------------------------------------------

#: At most this many transactions are sent before the pipeline is synced (bounds memory and how
#: far a duration-bound run overshoots its deadline).
_BATCH_MAX: Final = 100
_PROGRESS_EVERY_S: Final = 0.2


def _check_positive(name: str, value: float | None, flag: str) -> None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise UsageError(f"{flag} must be a positive number, not {value:g} ({name})")


@dataclass(slots=True)
class Tally:
    """What one paced connection did (:func:`pace`); the workers' tallies are summed."""

    done: int = 0
    committed: int = 0
    rolled_back: int = 0
    statements: int = 0
    #: The worst lateness behind the schedule, seconds.
    behind: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def add(self, other: Tally) -> None:
        self.done += other.done
        self.committed += other.committed
        self.rolled_back += other.rolled_back
        self.statements += other.statements
        self.behind = max(self.behind, other.behind)
        for kind, count in other.counts.items():
            self.counts[kind] += count


def pace(
    plan: Iterator[Operation],
    sender: PipelineSender,
    dsn: str,
    *,
    rate: float,
    t0: float,
    deadline: float,
    limit: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    tick: Callable[[int, float], None] | None = None,
) -> Tally:
    """Send ``plan``'s transactions on schedule: transaction i is due at ``t0 + i / rate``, until
    ``limit`` transactions or the ``deadline`` (see :func:`run_workload`). ``tick(done,
    elapsed_s)`` is called at most every ``_PROGRESS_EVERY_S``."""
    tally = Tally()
    sent: list[Operation] = []
    last_tick = t0
    try:
        while tally.done < limit:
            now = clock()
            if now >= deadline:
                break
            done = tally.done
            due = min(limit, math.floor((now - t0) * rate) + 1) - done
            if due <= 0:
                sleep(min(t0 + done / rate, deadline) - now)
                continue
            tally.behind = max(tally.behind, now - (t0 + done / rate))
            sent = list(islice(plan, int(min(due, _BATCH_MAX))))
            sender.send(sent)
            for op in sent:
                tally.counts[op.kind] += 1
                tally.statements += len(op.statements)
                if op.rollback:
                    tally.rolled_back += 1
                else:
                    tally.committed += 1
            tally.done += len(sent)
            sent = []
            if tick is not None and (now - last_tick) >= _PROGRESS_EVERY_S:
                last_tick = now
                tick(tally.done, now - t0)
    except psycopg.Error as exc:
        first, last = tally.done + 1, tally.done + max(len(sent), 1)
        doing = (
            f"workload transaction #{first}"
            if first == last
            else f"workload transactions #{first}-#{last} (one pipelined batch)"
        )
        raise _db_error(exc, dsn, doing) from None
    return tally


def run_workload(
    dsn: str,
    *,
    rate: float,
    duration: float | None = None,
    seed: int = 1,
    max_transactions: int | None = None,
    progress: ProgressCallback | None = None,
    bulk_every: int = BULK_EVERY,
    workers: int = 1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WorkloadReport:
    """Write the planned traffic for ``seed`` into the database at ``dsn``.

    Transaction ``i`` of the plan is due at ``t0 + i / rate`` on the monotonic clock (a schedule,
    so there is no drift: a late run catches up at full speed). The run stops after
    ``max_transactions`` transactions or when ``duration`` seconds have passed, whichever comes
    first; at least one of the two is required.

    Commit protocol: every transaction is sent as BEGIN, its statements, COMMIT (or ROLLBACK) in
    libpq pipeline mode (:class:`devtools.workload_send.PipelineSender`); the pipeline is synced
    at most every ``_BATCH_MAX`` transactions and before any sleep, and transactions are counted
    once their sync returned without error.

    ``workers`` > 1: that many processes, each with its own connection and sub-plan over
    disjoint rows (:func:`plan_operations`, :mod:`devtools.workload_workers`); worker k sends
    the transactions k, k+n, ... of the global schedule. The report sums them.
    """
    _check_positive("transactions per second", rate, "--rate")
    _check_positive("seconds", duration, "--duration")
    if max_transactions is not None and max_transactions < 1:
        raise UsageError(f"max_transactions must be at least 1, not {max_transactions}")
    if duration is None and max_transactions is None:
        raise UsageError("give a duration or a number of transactions to run")
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    log = get_logger("devtools.workload")
    bounds = [n for n in (max_transactions, duration and math.ceil(rate * duration)) if n]
    expected = min(bounds) if bounds else None
    with _connect(dsn) as conn:
        try:
            start = read_start_state(conn)
        except psycopg.Error as exc:
            raise _db_error(exc, dsn, "reading the starting state") from None
        log.info(
            "workload.started",
            seed=seed,
            rate=rate,
            duration_s=duration,
            max_transactions=max_transactions,
            workers=workers,
            where=_where(dsn),
            **start.summary()["max_ids"],
        )

        def tick(done: int, elapsed_s: float) -> None:
            if progress is not None:
                progress(WorkloadProgress(done, expected, elapsed_s))

        limit = max_transactions if max_transactions is not None else math.inf
        if workers > 1:
            from devtools.workload_workers import run_workers

            conn.close()  # the workers have their own connections
            tally, elapsed = run_workers(
                dsn, start, rate=rate, duration=duration, seed=seed, limit=limit,
                bulk_every=bulk_every, workers=workers, tick=tick,
            )  # fmt: skip
        else:
            plan = plan_operations(seed, start, bulk_every=bulk_every)
            t0 = clock()
            deadline = t0 + duration if duration is not None else math.inf
            tally = pace(
                plan, PipelineSender(conn), dsn, rate=rate, t0=t0, deadline=deadline,
                limit=limit, clock=clock, sleep=sleep, tick=tick,
            )  # fmt: skip
            elapsed = clock() - t0
    if progress is not None:
        progress(WorkloadProgress(tally.done, expected, elapsed))
    report = WorkloadReport(
        seed=seed,
        rate_asked=rate,
        duration_asked_s=duration,
        max_transactions=max_transactions,
        transactions=tally.done,
        committed=tally.committed,
        rolled_back=tally.rolled_back,
        statements=tally.statements,
        elapsed_s=elapsed,
        achieved_rate=tally.done / elapsed if elapsed > 0 else 0.0,
        max_behind_s=tally.behind,
        counts={k: v for k, v in tally.counts.items() if v},
        start=start.summary(),
    )
    log.info(
        "workload.finished",
        transactions=tally.done,
        committed=tally.committed,
        rolled_back=tally.rolled_back,
        elapsed_s=round(elapsed, 3),
        achieved_rate=round(report.achieved_rate, 1),
        rate_asked=rate,
        workers=workers,
    )
    return report


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------

_COPY_CHUNK: Final = 2_000


def prefill(
    dsn: str,
    *,
    orders: int = 100_000,
    users: int | None = None,
    merchants: int | None = None,
    products: int | None = None,
    seed: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> PrefillReport:
    """Load the starting data set of :func:`prefill_tables` with COPY, in one transaction.

    Ids continue after the rows already there, so a prefill can be repeated. ``progress`` is
    called as ``(table, rows_done, rows_total)``. Tables are ANALYZEd afterwards.
    """
    flags = {"--orders": orders, "--users": users, "--merchants": merchants, "--products": products}
    for name, value in flags.items():
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}")
    sizes = default_prefill_sizes(orders, users=users, merchants=merchants, products=products)
    rows: dict[str, int] = {}
    t0 = time.monotonic()
    with _connect(dsn) as conn:
        try:
            start = read_start_state(conn)
            with conn.transaction(), conn.cursor() as cur:
                for table, lines in prefill_tables(seed, sizes, start):
                    with cur.copy(_COPY_COLUMNS[table]) as copy:
                        for i in range(0, len(lines), _COPY_CHUNK):
                            copy.write("".join(lines[i : i + _COPY_CHUNK]))
                            if progress is not None:
                                progress(table, min(i + _COPY_CHUNK, len(lines)), len(lines))
                    rows[table] = len(lines)
            for table in TABLES:
                conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier("shop", table)))
        except psycopg.Error as exc:
            raise _db_error(exc, dsn, "prefill") from None
    report = PrefillReport(seed=seed, rows=rows, elapsed_s=time.monotonic() - t0)
    get_logger("devtools.workload").info(
        "prefill.finished",
        seed=seed,
        rows=report.total_rows,
        elapsed_s=round(report.elapsed_s, 3),
        **{f"{t}_rows": n for t, n in rows.items()},
    )
    return report
