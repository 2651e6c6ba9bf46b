"""Apply effects on the real stack: inserts, updates, deletes, unchanged TOAST, snapshot rows vs
newer streamed rows, older events after newer ones, duplicates, replay from offset 0.

Events are built by hand with cutover.codec and produced to fresh topics; the expected commerce
rows are written out in the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from cutover.codec import encode, heartbeat_schema, writer_schema
from devtools.apply_support import (
    EventFactory,
    Message,
    ShopModel,
    Topics,
    apply_until,
    delete_topics,
    diff,
    fetch_commerce,
    make_topics,
    offsets,
    produce,
    producer,
    publish_schemas,
    settings_for,
    table_checksums,
    total_offsets,
)

pytestmark = pytest.mark.integration

T = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DESC = "A long description. " * 400  # ~8 kB: TOASTed in the source


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=3)
    try:
        yield t
    finally:
        delete_topics(t)


def _user(uid: int, email: str) -> dict[str, object]:
    return {
        "id": uid,
        "display_name": f"U{uid}",
        "email": email,
        "phone": None,
        "created_at": T,
        "updated_at": T,
    }


def _product(pid: int, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": pid,
        "merchant_id": 7,
        "title": f"P{pid}",
        "description": DESC,
        "price_idr": Decimal("15000.50"),
        "stock": 10,
        "status": "live",
    }
    row.update(kw)
    return row


def _order(oid: int, status: str, total: str) -> dict[str, object]:
    return {
        "id": oid,
        "buyer_id": 1,
        "merchant_id": 7,
        "status": status,
        "total_idr": Decimal(total),
        "created_at": T,
        "updated_at": T,
    }


def test_effects_of_every_kind_of_change(commerce: str, topics: Topics) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    settings = settings_for(commerce, topics)
    group = settings.apply.group_id

    # Phase 1: the newer state.
    first: list[Message] = [
        f.change("users", "c", _user(1, "a@x"), lsn=100, seq=0),
        f.change("users", "u", _user(1, "b@x"), lsn=200, seq=0),
        f.change("users", "c", _user(2, "c@x"), lsn=210, seq=0),
        f.change("users", "d", {"id": 2}, lsn=220, seq=0),
        f.change("products", "c", _product(10), lsn=300, seq=0),
        # Unchanged TOAST: the description is not sent; commerce must keep it.
        f.change(
            "products",
            "u",
            _product(10, stock=3, description=None),
            lsn=310,
            seq=0,
            unchanged=["description"],
        ),
        f.change("products", "c", _product(11), lsn=320, seq=0),
        f.change(
            "products",
            "u",
            _product(11, status="deleted", description=None),
            lsn=330,
            seq=0,
            unchanged=["description"],
        ),
        f.change("orders", "c", _order(50, "created", "100.00"), lsn=400, seq=0),
        f.change("orders", "u", _order(50, "paid", "100.00"), lsn=800, seq=0),
        # A snapshot row for a key nobody streamed: applied.
        f.change("orders", "r", _order(51, "shipped", "5.25"), lsn=450, seq=3),
    ]
    produce(topics.bootstrap, first)
    with_dupes = first + first[:3]  # duplicates: redelivery of the first three
    produce(topics.bootstrap, first[:3])

    # Phase 2: late and duplicate events, all older than what phase 1 left.
    second = [
        # A snapshot row older than the streamed update of the same order: ignored.
        f.change("orders", "r", _order(50, "created", "1.00"), lsn=600, seq=9),
        # An older event after a newer one: ignored.
        f.change("orders", "u", _order(50, "shipped", "100.00"), lsn=700, seq=0),
        # The deleted user's insert replayed: the tombstone keeps it deleted.
        f.change("users", "c", _user(2, "c@x"), lsn=210, seq=0),
        # The deleted listing's older update replayed: stays deleted.
        f.change("products", "u", _product(11, stock=99), lsn=325, seq=0),
        # A user re-created after the delete, with a newer position: wins over the tombstone.
        f.change("users", "c", _user(3, "z@x"), lsn=900, seq=0),
        f.change("users", "d", {"id": 3}, lsn=910, seq=0),
        f.change("users", "c", _user(3, "again@x"), lsn=920, seq=0),
    ]

    n1 = len(with_dupes)
    with_all = n1 + len(second)

    def caught_up(n: int) -> bool:
        return total_offsets(commerce, group) >= n

    apply_until(settings, lambda: caught_up(n1))
    produce(topics.bootstrap, second)
    apply_until(settings, lambda: caught_up(with_all))

    expected = {
        "customers": {
            (1,): {
                "customer_id": 1,
                "display_name": "U1",
                "email": "b@x",
                "phone": None,
                "created_at": T,
                "updated_at": T,
            },
            (3,): {
                "customer_id": 3,
                "display_name": "U3",
                "email": "again@x",
                "phone": None,
                "created_at": T,
                "updated_at": T,
            },
        },
        "listings": {
            (10,): {
                "listing_id": 10,
                "seller_id": 7,
                "title": "P10",
                "description": DESC,
                "price_minor": 1500050,
                "stock": 3,
                "visible": True,
            },
        },
        "orders": {
            (50,): {
                "order_id": 50,
                "customer_id": 1,
                "seller_id": 7,
                "state": "PAID",
                "total_minor": 10000,
                "created_at": T,
                "updated_at": T,
            },
            (51,): {
                "order_id": 51,
                "customer_id": 1,
                "seller_id": 7,
                "state": "SHIPPED",
                "total_minor": 525,
                "created_at": T,
                "updated_at": T,
            },
        },
    }
    assert diff(expected, fetch_commerce(commerce)) == []
    with psycopg.connect(commerce) as conn:
        pos = conn.execute("SELECT _src_lsn, _src_seq FROM commerce.orders WHERE order_id = 50")
        assert pos.fetchone() == (800, 0)
        tomb = conn.execute(
            "SELECT target_table, row_key, src_lsn FROM cutover.tombstones ORDER BY 1, 2"
        ).fetchall()
        # User 3's delete and re-insert met in one batch: merged, the insert simply won.
        assert tomb == [("customers", "[2]", 220), ("listings", "[11]", 330)]
        dead = conn.execute("SELECT count(*) FROM cutover.dead_letters").fetchone()
        assert dead == (0,)


def test_replay_from_offset_zero_changes_nothing(commerce: str, topics: Topics) -> None:
    model = ShopModel(EventFactory(topics.prefix, topics.partitions), seed=7)
    publish_schemas(topics, model.factory)
    # One step is one source transaction (its last message in each partition closes it).
    steps = [model.step() for _ in range(400)]
    messages = [m for step in steps for m in step]
    produce(topics.bootstrap, messages)
    settings = settings_for(commerce, topics, batch_max_events=300)
    group = settings.apply.group_id
    apply_until(settings, lambda: total_offsets(commerce, group) == len(messages))
    assert diff(model.expected(), fetch_commerce(commerce)) == []
    before = table_checksums(commerce)

    # The same events once more, newest source transaction first: every batch now carries
    # events older than the rows hold, in an order no in-batch merge can put right. Only the
    # position guards keep them from taking the rows back in time.
    produce(topics.bootstrap, [m for step in reversed(steps) for m in step])
    total = 2 * len(messages)
    apply_until(settings, lambda: total_offsets(commerce, group) == total)
    assert table_checksums(commerce) == before

    # A new group id starts from offset 0 and replays the whole topic, in order and reversed.
    replay = settings_for(commerce, topics, batch_max_events=1000)
    apply_until(replay, lambda: total_offsets(commerce, replay.apply.group_id) == total)
    assert table_checksums(commerce) == before
    assert offsets(commerce, replay.apply.group_id) == offsets(commerce, group)


def test_heartbeats_update_the_offsets_row_and_apply_nothing(commerce: str, topics: Topics) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    beat = writer_schema(heartbeat_schema())
    prod = producer(topics.bootstrap)
    sent = 0
    for domain in ("payment", "data", "merchant"):
        for partition in range(topics.partitions):
            value = encode(beat, {"ts_ms": 1_700_000_000_000 + sent, "lsn": 4242, "producer": "p"})
            prod.produce(
                topics.topic(domain),
                value=value,
                key=b"__heartbeat__",
                partition=partition,
                headers=[("cutover.kind", b"heartbeat")],
            )
            sent += 1
    assert prod.flush(30) == 0
    settings = settings_for(commerce, topics)
    group = settings.apply.group_id
    apply_until(settings, lambda: total_offsets(commerce, group) == sent)
    with psycopg.connect(commerce) as conn:
        rows = conn.execute(
            "SELECT count(*), min(last_heartbeat_ms), count(last_source_lsn) "
            "FROM cutover.consumer_offsets WHERE group_id = %s",
            (group,),
        ).fetchone()
        letters = conn.execute("SELECT count(*) FROM cutover.dead_letters").fetchone()
    assert rows == (sent, 1_700_000_000_000, 0)
    assert letters == (0,)
    assert all(not table for table in fetch_commerce(commerce).values())
