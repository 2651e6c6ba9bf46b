"""Helpers for the apply tests (and the apply benchmark): build and produce change events, run
the consumer in-process or as ``cutover apply`` subprocesses, compare the commerce database.

Nothing here goes through the code under test to compute expectations: events are encoded with
:mod:`cutover.codec` exactly as the producer contract says (docs/ARCHITECTURE.md), and the
expected commerce rows are computed by :meth:`ShopModel.expected`, a hand-written copy of the
reference mapping (examples/shop/mapping.toml) — not :mod:`cutover.mapping`.

When the real producer lands, end-to-end tests reuse :func:`write_config`,
:func:`start_apply` and :func:`fetch_commerce`: legacy → ``cutover produce`` → ``cutover apply``
subprocesses → compare with the legacy database mapped by the test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql

from consumers.apply import ApplyConsumer, ApplyOptions, ApplySummary
from cutover import envelope
from cutover.codec import ColumnSpec, WriterSchema, encode, envelope_schema, writer_schema
from cutover.config import ApplySettings, KafkaSettings, Settings, SourceSettings, TargetSettings
from cutover.control_store import ControlStore
from cutover.control_store import offsets as stored_offsets
from cutover.mapping import load_mapping

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "shop"
# The scenario's domains, as its mapping file declares them (names only: the expected rows
# below never go through cutover.mapping).
DOMAINS = tuple(load_mapping(EXAMPLES / "mapping.toml").domains)

# ----------------------------------------------------------------------------- the legacy tables

INT8, INT4, TEXT, TSTZ, NUMERIC = 20, 23, 25, 1184, 1700


def _numeric(precision: int, scale: int) -> int:
    return ((precision << 16) | scale) + 4


# Published columns (excluded ones left out, as the publication column list does).
LEGACY: dict[str, list[ColumnSpec]] = {
    "users": [
        ColumnSpec("id", INT8, -1),
        ColumnSpec("display_name", TEXT, -1),
        ColumnSpec("email", TEXT, -1),
        ColumnSpec("phone", TEXT, -1),
        ColumnSpec("created_at", TSTZ, -1),
        ColumnSpec("updated_at", TSTZ, -1),
    ],
    "merchants": [
        ColumnSpec("id", INT8, -1),
        ColumnSpec("owner_user_id", INT8, -1),
        ColumnSpec("shop_name", TEXT, -1),
        ColumnSpec("status", TEXT, -1),
        ColumnSpec("rating", NUMERIC, _numeric(3, 2)),
        ColumnSpec("created_at", TSTZ, -1),
        ColumnSpec("updated_at", TSTZ, -1),
    ],
    "products": [
        ColumnSpec("id", INT8, -1),
        ColumnSpec("merchant_id", INT8, -1),
        ColumnSpec("title", TEXT, -1),
        ColumnSpec("description", TEXT, -1),
        ColumnSpec("price_idr", NUMERIC, _numeric(14, 2)),
        ColumnSpec("stock", INT4, -1),
        ColumnSpec("status", TEXT, -1),
    ],
    "orders": [
        ColumnSpec("id", INT8, -1),
        ColumnSpec("buyer_id", INT8, -1),
        ColumnSpec("merchant_id", INT8, -1),
        ColumnSpec("status", TEXT, -1),
        ColumnSpec("total_idr", NUMERIC, _numeric(14, 2)),
        ColumnSpec("created_at", TSTZ, -1),
        ColumnSpec("updated_at", TSTZ, -1),
    ],
    "order_items": [
        ColumnSpec("order_id", INT8, -1),
        ColumnSpec("line_no", INT4, -1),
        ColumnSpec("product_id", INT8, -1),
        ColumnSpec("qty", INT4, -1),
        ColumnSpec("unit_price_idr", NUMERIC, _numeric(14, 2)),
    ],
    "payments": [
        ColumnSpec("id", INT8, -1),
        ColumnSpec("order_id", INT8, -1),
        ColumnSpec("method", TEXT, -1),
        ColumnSpec("amount_idr", NUMERIC, _numeric(14, 2)),
        ColumnSpec("status", TEXT, -1),
        ColumnSpec("provider_ref", TEXT, -1),
        ColumnSpec("paid_at", TSTZ, -1),
    ],
    "invoices": [
        ColumnSpec("id", INT8, -1),
        ColumnSpec("order_id", INT8, -1),
        ColumnSpec("invoice_no", TEXT, -1),
        ColumnSpec("issued_at", TSTZ, -1),
    ],
}
PKEY: dict[str, tuple[str, ...]] = {t: ("id",) for t in LEGACY} | {
    "order_items": ("order_id", "line_no")
}
AGGREGATE: dict[str, str] = {
    "users": "id",
    "merchants": "id",
    "products": "merchant_id",
    "orders": "id",
    "order_items": "order_id",
    "payments": "order_id",
    "invoices": "order_id",
}
DOMAIN: dict[str, str] = {
    "users": "data",
    "merchants": "merchant",
    "products": "merchant",
    "orders": "payment",
    "order_items": "payment",
    "payments": "payment",
    "invoices": "payment",
}
TARGET_KEY: dict[str, tuple[str, ...]] = {
    "customers": ("customer_id",),
    "sellers": ("seller_id",),
    "listings": ("listing_id",),
    "orders": ("order_id",),
    "order_lines": ("order_id", "line_no"),
    "payments": ("payment_id",),
    "invoices": ("invoice_id",),
}

Row = dict[str, Any]


@dataclass(frozen=True)
class Message:
    """One Kafka message as the producer would write it."""

    topic: str
    partition: int
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = (("cutover.kind", b"change"),)


class EventFactory:
    """Encodes change events of the legacy tables with the producer's envelope functions."""

    def __init__(self, prefix: str, partitions: int) -> None:
        self.prefix = prefix
        self.partitions = partitions
        #: The schema JSON as published to the schemas topic. NOT ``WriterSchema.canonical``:
        #: the Parsing Canonical Form drops ``logicalType`` (decimals would decode as bytes).
        self.schema_json: dict[str, str] = {
            t: json.dumps(envelope_schema("shop", t, cols)) for t, cols in LEGACY.items()
        }
        self.schemas: dict[str, WriterSchema] = {
            t: writer_schema(json.loads(text)) for t, text in self.schema_json.items()
        }

    def partition_of(self, key: bytes) -> int:
        return zlib.crc32(key) % self.partitions

    def key_of(self, table: str, row: Mapping[str, Any]) -> bytes:
        return str(row[AGGREGATE[table]]).encode()

    def record(
        self,
        table: str,
        op: str,
        row: Mapping[str, Any],
        *,
        lsn: int,
        seq: int,
        ts_ms: int | None = None,
        before: Mapping[str, Any] | None = None,
        unchanged: Sequence[str] = (),
        tx: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        cols = [c.name for c in LEGACY[table]]
        now = int(time.time() * 1000)
        full = {c: row.get(c) for c in cols}
        for c in unchanged:
            full[c] = None
        if op == "d":
            before_rec: dict[str, Any] | None = {c: row.get(c) for c in cols}
            after_rec = None
        else:
            before_rec = {c: before.get(c) for c in cols} if before is not None else None
            after_rec = full
        source = envelope.source_block(
            version="test", connector="cutover", name=self.prefix, db="legacy", schema="shop",
            table=table,
        )  # fmt: skip
        return envelope.change_record(
            source,
            op=op,
            before=before_rec,
            after=after_rec,
            unchanged=list(unchanged),
            position=(lsn, seq),
            tx_id=lsn // 16,
            commit_ms=now if ts_ms is None else ts_ms,
            now_ms=now,
            transaction=dict(tx) if tx is not None else None,
        )

    def message(self, table: str, record: Mapping[str, Any], key_row: Mapping[str, Any]) -> Message:
        key = self.key_of(table, key_row)
        return Message(
            topic=f"{self.prefix}.{DOMAIN[table]}",
            partition=self.partition_of(key),
            key=key,
            value=encode(self.schemas[table], record),
        )

    def change(self, table: str, op: str, row: Mapping[str, Any], **kw: Any) -> Message:
        """A single-event unit (``transaction`` null unless given)."""
        return self.message(table, self.record(table, op, row, **kw), row)

    def transaction(
        self,
        lsn: int,
        changes: Sequence[tuple[str, str, Mapping[str, Any], Mapping[str, Any]]],
        ts_ms: int | None = None,
    ) -> list[Message]:
        """One source transaction: (table, op, row, options) → messages with transaction
        blocks, ``last_in_partition`` set on the last event of each partition."""
        keyed = []
        for seq, (table, op, row, opts) in enumerate(changes):
            key = self.key_of(table, row)
            keyed.append((seq, table, op, row, opts, f"{self.prefix}.{DOMAIN[table]}", key))
        last: dict[tuple[str, int], int] = {}
        for seq, _t, _o, _r, _opts, topic, key in keyed:
            last[(topic, self.partition_of(key))] = seq
        out = []
        for seq, table, op, row, opts, topic, key in keyed:
            tx = envelope.transaction_block(
                lsn // 16, lsn, seq + 1, seq + 1, last=last[(topic, self.partition_of(key))] == seq
            )
            record = self.record(table, op, row, lsn=lsn, seq=seq, tx=tx, ts_ms=ts_ms, **opts)
            out.append(self.message(table, record, row))
        return out


# ----------------------------------------------------------------------------- the shop model

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _money(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low * 100, high * 100)) / 100


@dataclass
class ShopModel:
    """A legacy shop evolving through random source transactions, and its expected mapping.

    ``step()`` returns the messages of one source transaction and updates ``legacy``, the state
    the legacy database would hold. :meth:`expected` maps it to commerce rows by hand.
    """

    factory: EventFactory
    seed: int = 1
    lsn: int = 0x1_0000_0000
    legacy: dict[str, dict[tuple[Any, ...], Row]] = field(default_factory=dict)
    description_size: int = 3000

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.legacy = {t: {} for t in LEGACY}
        self.ids: dict[str, int] = {t: 0 for t in LEGACY}

    def _id(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def _time(self) -> datetime:
        return T0 + timedelta(seconds=self.lsn // 1000 % 10_000_000, microseconds=self.lsn % 1000)

    def _key(self, table: str, row: Row) -> tuple[Any, ...]:
        return tuple(row[c] for c in PKEY[table])

    def _commit(
        self, changes: list[tuple[str, str, Row, dict[str, Any]]], ts_ms: int | None
    ) -> list[Message]:
        self.lsn += self.rng.randint(0x100, 0x4000)
        for table, op, row, _opts in changes:
            key = self._key(table, row)
            if op == "d":
                self.legacy[table].pop(key, None)
            else:
                self.legacy[table][key] = dict(row)
        return self.factory.transaction(self.lsn, changes, ts_ms=ts_ms)

    def pick(self, table: str) -> Row | None:
        rows = self.legacy[table]
        if not rows:
            return None
        return dict(self.rng.choice(list(rows.values())))

    def step(self, ts_ms: int | None = None) -> list[Message]:
        rng = self.rng
        kind = rng.choices(
            [
                "user",
                "merchant",
                "order",
                "pay",
                "cancel",
                "product",
                "user_upd",
                "user_del",
                "product_del",
            ],
            weights=[8, 4, 25, 15, 5, 20, 8, 2, 3],
        )[0]
        now = self._time()
        changes: list[tuple[str, str, Row, dict[str, Any]]] = []
        if kind == "user" or not self.legacy["users"] or not self.legacy["merchants"]:
            uid = self._id("users")
            changes.append(
                (
                    "users",
                    "c",
                    {
                        "id": uid,
                        "display_name": f"User {uid}",
                        "email": f"u{uid}@example.com",
                        "phone": f"+62{rng.randint(10**9, 10**10)}",
                        "created_at": now,
                        "updated_at": now,
                    },
                    {},
                )
            )
            if not self.legacy["merchants"] or kind == "merchant":
                changes.extend(self._new_merchant(uid, now))
        elif kind == "merchant":
            owner = self.pick("users")
            assert owner is not None
            changes.extend(self._new_merchant(owner["id"], now))
        elif kind == "order":
            changes.extend(self._new_order(now))
        elif kind == "pay":
            changes.extend(self._pay_order(now))
        elif kind == "cancel":
            changes.extend(self._cancel_order(now))
        elif kind == "product":
            prod = self.pick("products")
            # Not a deleted one: un-deleting with an unchanged TOAST description would need the
            # description, which the event does not carry (see consumers/sink.py).
            if prod is not None and prod["status"] != "deleted":
                new = dict(prod)
                new["stock"] = rng.randint(0, 500)
                new["price_idr"] = _money(rng, 1_000, 2_000_000)
                new["status"] = rng.choice(["live", "live", "hidden"])
                # The description is TOASTed and unchanged: PostgreSQL does not send it.
                changes.append(("products", "u", new, {"unchanged": ["description"]}))
        elif kind == "user_upd":
            user = self.pick("users")
            if user is not None:
                user["email"] = f"new{rng.randint(0, 10**6)}@example.com"
                user["updated_at"] = now
                changes.append(("users", "u", user, {}))
        elif kind == "user_del":
            user = self.pick("users")
            if user is not None and len(self.legacy["users"]) > 5:
                changes.append(("users", "d", {"id": user["id"]}, {}))
        elif kind == "product_del":
            prod = self.pick("products")
            if prod is not None and prod["status"] != "deleted":
                prod["status"] = "deleted"
                changes.append(("products", "u", prod, {"unchanged": ["description"]}))
        if not changes:
            return self.step(ts_ms)
        return self._commit(changes, ts_ms)

    def _new_merchant(
        self, owner: int, now: datetime
    ) -> list[tuple[str, str, Row, dict[str, Any]]]:
        rng = self.rng
        mid = self._id("merchants")
        out: list[tuple[str, str, Row, dict[str, Any]]] = [
            (
                "merchants",
                "c",
                {
                    "id": mid,
                    "owner_user_id": owner,
                    "shop_name": f"Shop {mid}",
                    "status": rng.choice(["active", "active", "suspended"]),
                    "rating": Decimal(rng.randint(100, 500)) / 100,
                    "created_at": now,
                    "updated_at": now,
                },
                {},
            )
        ]
        for _ in range(rng.randint(1, 3)):
            pid = self._id("products")
            text = f"Product {pid} " + "lorem ipsum dolor sit amet " * (self.description_size // 27)
            out.append(
                (
                    "products",
                    "c",
                    {
                        "id": pid,
                        "merchant_id": mid,
                        "title": f"Product {pid}",
                        "description": text,
                        "price_idr": _money(rng, 1_000, 2_000_000),
                        "stock": rng.randint(0, 500),
                        "status": "live",
                    },
                    {},
                )
            )
        return out

    def _new_order(self, now: datetime) -> list[tuple[str, str, Row, dict[str, Any]]]:
        rng = self.rng
        buyer = self.pick("users")
        prods = [p for p in self.legacy["products"].values() if p["status"] == "live"]
        if buyer is None or not prods:
            return []
        oid = self._id("orders")
        lines: list[tuple[str, str, Row, dict[str, Any]]] = []
        total = Decimal(0)
        for line_no in range(1, rng.randint(1, 4) + 1):
            prod = rng.choice(prods)
            qty = rng.randint(1, 5)
            total += qty * prod["price_idr"]
            lines.append(
                (
                    "order_items",
                    "c",
                    {
                        "order_id": oid,
                        "line_no": line_no,
                        "product_id": prod["id"],
                        "qty": qty,
                        "unit_price_idr": prod["price_idr"],
                    },
                    {},
                )
            )
        order = {
            "id": oid,
            "buyer_id": buyer["id"],
            "merchant_id": prods[0]["merchant_id"],
            "status": "created",
            "total_idr": total,
            "created_at": now,
            "updated_at": now,
        }
        payment = {
            "id": self._id("payments"),
            "order_id": oid,
            "method": rng.choice(["card", "ewallet", "bank_transfer", "cod"]),
            "amount_idr": total,
            "status": "pending",
            "provider_ref": None,
            "paid_at": None,
        }
        return [("orders", "c", order, {}), *lines, ("payments", "c", payment, {})]

    def _pay_order(self, now: datetime) -> list[tuple[str, str, Row, dict[str, Any]]]:
        created = [o for o in self.legacy["orders"].values() if o["status"] == "created"]
        if not created:
            return []
        order = dict(self.rng.choice(created))
        order["status"] = "paid"
        order["updated_at"] = now
        out: list[tuple[str, str, Row, dict[str, Any]]] = [("orders", "u", order, {})]
        for pay in self.legacy["payments"].values():
            if pay["order_id"] == order["id"]:
                new = dict(pay, status="settled", paid_at=now, provider_ref=f"ref-{pay['id']}")
                out.append(("payments", "u", new, {}))
        iid = self._id("invoices")
        out.append(
            (
                "invoices",
                "c",
                {
                    "id": iid,
                    "order_id": order["id"],
                    "invoice_no": f"INV-{iid:08d}",
                    "issued_at": now,
                },
                {},
            )
        )
        return out

    def _cancel_order(self, now: datetime) -> list[tuple[str, str, Row, dict[str, Any]]]:
        created = [o for o in self.legacy["orders"].values() if o["status"] == "created"]
        if not created:
            return []
        order = dict(self.rng.choice(created))
        order["status"] = "cancelled"
        order["updated_at"] = now
        items = [i for i in self.legacy["order_items"].values() if i["order_id"] == order["id"]]
        # A cancelled order keeps its first line only (the others are deleted): deletes in a tx.
        out: list[tuple[str, str, Row, dict[str, Any]]] = [
            ("order_items", "d", {"order_id": i["order_id"], "line_no": i["line_no"]}, {})
            for i in items[1:]
        ]
        if items[1:]:
            first = items[0]
            order["total_idr"] = first["qty"] * first["unit_price_idr"]
        out.append(("orders", "u", order, {}))
        for pay in self.legacy["payments"].values():
            if pay["order_id"] == order["id"]:
                out.append(
                    ("payments", "u", dict(pay, status="failed", amount_idr=order["total_idr"]), {})
                )
        return out

    def expected(self) -> dict[str, dict[tuple[Any, ...], Row]]:
        """The commerce rows the legacy state maps to (a hand-written reference mapping)."""
        return expected_commerce(self.legacy)


def minor(value: Decimal) -> int:
    scaled = value * 100
    assert scaled == scaled.to_integral_value()
    return int(scaled)


def expected_commerce(
    legacy: Mapping[str, Mapping[tuple[Any, ...], Row]],
) -> dict[str, dict[tuple[Any, ...], Row]]:
    out: dict[str, dict[tuple[Any, ...], Row]] = {t: {} for t in TARGET_KEY}
    for u in legacy.get("users", {}).values():
        out["customers"][(u["id"],)] = {
            "customer_id": u["id"],
            "display_name": u["display_name"],
            "email": u["email"],
            "phone": u["phone"],
            "created_at": u["created_at"],
            "updated_at": u["updated_at"],
        }
    for m in legacy.get("merchants", {}).values():
        out["sellers"][(m["id"],)] = {
            "seller_id": m["id"],
            "owner_customer_id": m["owner_user_id"],
            "name": m["shop_name"],
            "state": m["status"].upper(),
            "rating": m["rating"],
            "created_at": m["created_at"],
            "updated_at": m["updated_at"],
        }
    for p in legacy.get("products", {}).values():
        if p["status"] == "deleted":
            continue
        out["listings"][(p["id"],)] = {
            "listing_id": p["id"],
            "seller_id": p["merchant_id"],
            "title": p["title"],
            "description": p["description"],
            "price_minor": minor(p["price_idr"]),
            "stock": p["stock"],
            "visible": p["status"] == "live",
        }
    for o in legacy.get("orders", {}).values():
        out["orders"][(o["id"],)] = {
            "order_id": o["id"],
            "customer_id": o["buyer_id"],
            "seller_id": o["merchant_id"],
            "state": o["status"].upper(),
            "total_minor": minor(o["total_idr"]),
            "created_at": o["created_at"],
            "updated_at": o["updated_at"],
        }
    for i in legacy.get("order_items", {}).values():
        out["order_lines"][(i["order_id"], i["line_no"])] = {
            "order_id": i["order_id"],
            "line_no": i["line_no"],
            "listing_id": i["product_id"],
            "quantity": i["qty"],
            "unit_price_minor": minor(i["unit_price_idr"]),
        }
    for pay in legacy.get("payments", {}).values():
        out["payments"][(pay["id"],)] = {
            "payment_id": pay["id"],
            "order_id": pay["order_id"],
            "method": pay["method"].upper(),
            "amount_minor": minor(pay["amount_idr"]),
            "state": pay["status"].upper(),
            "provider_ref": pay["provider_ref"],
            "paid_at": pay["paid_at"],
        }
    for inv in legacy.get("invoices", {}).values():
        out["invoices"][(inv["id"],)] = {
            "invoice_id": inv["id"],
            "order_id": inv["order_id"],
            "invoice_no": inv["invoice_no"],
            "link": f"https://commerce.example/invoices/{inv['invoice_no']}",
            "issued_at": inv["issued_at"],
        }
    return out


# ----------------------------------------------------------------------------- Kafka helpers


@dataclass
class Topics:
    """The topics of one test: a unique prefix, created (and deleted) by :func:`make_topics`."""

    bootstrap: str
    prefix: str
    partitions: int

    def topic(self, domain: str) -> str:
        return f"{self.prefix}.{domain}"

    @property
    def schemas(self) -> str:
        return f"{self.prefix}.schemas"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"


def make_topics(
    bootstrap: str,
    partitions: int = 3,
    prefix: str | None = None,
    *,
    per_domain: Mapping[str, int] | None = None,
) -> Topics:
    """Fresh topics under a unique prefix; ``per_domain`` overrides the partition count of
    some domain topics (events of those domains need a factory of the same count)."""
    prefix = prefix or f"t{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    counts = {d: (per_domain or {}).get(d, partitions) for d in DOMAINS}
    new = [
        NewTopic(f"{prefix}.{d}", num_partitions=counts[d], replication_factor=1) for d in DOMAINS
    ]
    new.append(NewTopic(f"{prefix}.dlq", num_partitions=1, replication_factor=1))
    new.append(
        NewTopic(
            f"{prefix}.schemas",
            num_partitions=1,
            replication_factor=1,
            config={"cleanup.policy": "compact"},
        )
    )
    for fut in admin.create_topics(new, operation_timeout=30).values():
        fut.result(timeout=30)
    return Topics(bootstrap, prefix, partitions)


def delete_topics(topics: Topics) -> None:
    admin = AdminClient({"bootstrap.servers": topics.bootstrap})
    names = [topics.topic(d) for d in DOMAINS] + [topics.dlq, topics.schemas]
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        with suppress(Exception):
            fut.result(timeout=30)


def producer(bootstrap: str, **extra: Any) -> Producer:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        **extra,
    }
    return Producer(conf)


def publish_schemas(topics: Topics, factory: EventFactory) -> None:
    """What the producer does: every writer schema to the compacted schemas topic (key =
    fingerprint hex, value = the full schema JSON)."""
    prod = producer(topics.bootstrap)
    for table, ws in factory.schemas.items():
        prod.produce(
            topics.schemas, key=ws.fingerprint_hex.encode(), value=factory.schema_json[table]
        )
    assert prod.flush(30) == 0


def produce(bootstrap: str, messages: Iterable[Message], prod: Producer | None = None) -> int:
    own = prod is None
    prod = prod or producer(bootstrap)
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    n = 0
    for m in messages:
        while True:
            try:
                prod.produce(
                    m.topic,
                    value=m.value,
                    key=m.key,
                    partition=m.partition,
                    headers=list(m.headers),
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                prod.poll(0.05)
        n += 1
        if n % 10_000 == 0:
            prod.poll(0)
    if own:
        assert prod.flush(60) == 0
    assert not errors, errors[:3]
    return n


def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list[Any]:
    """Every message of ``topic`` from the beginning (until ``expect`` were read)."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
    finally:
        consumer.close()
    return out


# ----------------------------------------------------------------------------- database helpers


def init_control(dsn: str) -> None:
    """What `cutover init` does on the commerce side, for these tests: the control tables."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ControlStore(conn, "cutover").ensure("consumer")


def fetch_commerce(dsn: str) -> dict[str, dict[tuple[Any, ...], Row]]:
    """Every commerce table as {key: row without the bookkeeping columns}."""
    out: dict[str, dict[tuple[Any, ...], Row]] = {}
    with psycopg.connect(dsn) as conn:
        for table, key in TARGET_KEY.items():
            cur = conn.execute(
                sql.SQL("SELECT * FROM {}").format(sql.Identifier("commerce", table))
            )
            names = [d.name for d in cur.description or []]
            rows: dict[tuple[Any, ...], Row] = {}
            for values in cur.fetchall():
                row = {n: v for n, v in zip(names, values, strict=True) if not n.startswith("_src")}
                rows[tuple(row[k] for k in key)] = row
            out[table] = rows
    return out


def table_checksums(dsn: str) -> dict[str, str]:
    """md5 of each commerce table's rows (bookkeeping included), in key order."""
    out = {}
    with psycopg.connect(dsn) as conn:
        for table, key in TARGET_KEY.items():
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, '|' "
                    "ORDER BY {order})), '') FROM {table} AS t"
                ).format(
                    order=sql.SQL(", ").join(sql.Identifier("t", k) for k in key),
                    table=sql.Identifier("commerce", table),
                )
            ).fetchone()
            assert row is not None
            out[table] = str(row[0])
    return out


def diff(
    expected: Mapping[str, Mapping[tuple[Any, ...], Row]],
    actual: Mapping[str, Mapping[tuple[Any, ...], Row]],
) -> list[str]:
    """Human-readable differences (empty when equal)."""
    problems = []
    for table in TARGET_KEY:
        exp, act = expected.get(table, {}), actual.get(table, {})
        for key in sorted(set(exp) | set(act), key=repr):
            if key not in act:
                problems.append(f"{table} {key}: missing")
            elif key not in exp:
                problems.append(f"{table} {key}: unexpected {act[key]}")
            elif exp[key] != act[key]:
                cols = [c for c in exp[key] if exp[key][c] != act[key].get(c)]
                problems.append(
                    f"{table} {key}: {[(c, exp[key][c], act[key].get(c)) for c in cols]}"
                )
    return problems


def offsets(dsn: str, group: str) -> dict[tuple[str, int], int]:
    with psycopg.connect(dsn) as conn:
        rows = stored_offsets.read_group(ControlStore(conn, "cutover"), group)
    return {(o.topic, o.partition): o.next_offset for o in rows}


def total_offsets(dsn: str, group: str) -> int:
    return sum(offsets(dsn, group).values())


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ----------------------------------------------------------------------------- running apply

FAST_GROUP = {
    # Quick rebalances in tests: a killed member's partitions move within seconds.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
}


def settings_for(
    dsn: str,
    topics: Topics,
    group: str | None = None,
    *,
    batch_max_events: int = 5000,
    batch_max_wait_ms: int = 100,
    dlq_policy: Literal["dlq", "halt"] = "dlq",
    consumer: Mapping[str, Any] | None = None,
) -> Settings:
    return Settings(
        source=SourceSettings(dsn="dbname=unused"),
        target=TargetSettings(dsn=dsn),
        kafka=KafkaSettings(
            bootstrap=topics.bootstrap,
            topic_prefix=topics.prefix,
            partitions=topics.partitions,
            consumer=dict(consumer if consumer is not None else FAST_GROUP),
        ),
        mapping_path=EXAMPLES / "mapping.toml",
        apply=ApplySettings(
            group_id=group or f"g-{uuid.uuid4().hex[:8]}",
            batch_max_events=batch_max_events,
            batch_max_wait_ms=batch_max_wait_ms,
            dlq_policy=dlq_policy,
        ),
    )


@contextmanager
def running_apply(
    settings: Settings, options: ApplyOptions | None = None
) -> Iterator[tuple[ApplyConsumer, threading.Event]]:
    """Run an ApplyConsumer in a thread; stop it (and re-raise its error) on exit."""
    stop = threading.Event()
    consumer = ApplyConsumer(settings, options=options, stop=stop)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="apply", daemon=True)
    thread.start()
    try:
        yield consumer, stop
    except AssertionError:
        if errors:  # the consumer died: its error says more than the timeout
            raise errors[0] from None
        raise
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "apply consumer did not stop"
    if errors:
        raise errors[0]


def apply_until(
    settings: Settings,
    done: Callable[[], bool],
    timeout: float = 60.0,
    options: ApplyOptions | None = None,
) -> ApplySummary:
    with running_apply(settings, options) as (consumer, stop):
        wait_for(
            lambda: done() or not consumer_alive(consumer, stop),
            timeout,
            "the commerce database to catch up",
        )
        if not done():
            raise AssertionError("the apply consumer stopped before catching up")
        return consumer.summary


def consumer_alive(consumer: ApplyConsumer, stop: threading.Event) -> bool:
    return any(t.name == "apply" and t.is_alive() for t in threading.enumerate())


def write_config(
    tmp_path: Path,
    topics: Topics,
    *,
    group: str,
    batch_max_events: int = 5000,
    dlq_policy: str = "dlq",
    consumer: Mapping[str, Any] | None = None,
    kafka: Mapping[str, Any] | None = None,
) -> Path:
    """A cutover.toml for subprocess runs (DSNs and bootstrap come from CUTOVER_* env);
    ``kafka``: more ``[kafka]`` settings (e.g. apply_assignment)."""
    lines = [
        "[kafka]",
        f'topic_prefix = "{topics.prefix}"',
        f"partitions = {topics.partitions}",
        *(f"{k} = {json.dumps(v)}" for k, v in (kafka or {}).items()),
        "[kafka.consumer]",
        *(f'"{k}" = {json.dumps(v)}' for k, v in (consumer or FAST_GROUP).items()),
        "[mapping]",
        f'file = "{EXAMPLES / "mapping.toml"}"',
        "[apply]",
        f'group_id = "{group}"',
        f"batch_max_events = {batch_max_events}",
        f'dlq_policy = "{dlq_policy}"',
    ]
    path = tmp_path / f"cutover-{group}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli_env(target_dsn: str, bootstrap: str, source_dsn: str = "dbname=unused") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUTOVER_")}
    env.update(
        CUTOVER_TARGET_DSN=target_dsn,
        CUTOVER_KAFKA_BOOTSTRAP=bootstrap,
        CUTOVER_SOURCE_DSN=source_dsn,
        PYTHONUNBUFFERED="1",
    )
    return env


def start_apply(
    config: Path, env: Mapping[str, str], *args: str, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``python -m cli.main --config CONFIG apply ARGS`` in the background."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.entry",
            "--log-json",
            "--config",
            str(config),
            "apply",
            *args,
        ],
        cwd=REPO,
        env=dict(env),
        stdout=out,
        stderr=out,
    )


def stop_apply(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)
