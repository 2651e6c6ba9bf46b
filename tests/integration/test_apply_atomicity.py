"""Per-aggregate atomicity on the real stack: a source transaction split across polls (and, past
``long_tx_events``, applied in sub-batches inside one long database transaction) is never
half-visible. A concurrent reader compares ``count(*)`` and ``Σ quantity × unit price`` of an
order's lines with the order's total in one snapshot, all along.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from consumers.apply import ApplyOptions
from devtools.apply_support import (
    EventFactory,
    Message,
    Topics,
    apply_until,
    delete_topics,
    fetch_commerce,
    make_topics,
    produce,
    publish_schemas,
    settings_for,
    total_offsets,
)

pytestmark = pytest.mark.integration

T = datetime(2025, 3, 1, tzinfo=UTC)
ORDER = 777
LINES = 1500
ROUNDS = 6


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=3)
    try:
        yield t
    finally:
        delete_topics(t)


def _big_order_transactions(f: EventFactory) -> tuple[list[Message], int]:
    """ROUNDS transactions rewriting all LINES lines of one order and its total; plus small
    orders of other partitions in between. Returns the messages and the final total (minor)."""
    msgs: list[Message] = []
    lsn = 1000
    total = 0
    for rnd in range(ROUNDS):
        lsn += 100
        qty = rnd + 1
        price = Decimal("10.00") + rnd
        total = int(LINES * qty * price * 100)
        op = "c" if rnd == 0 else "u"
        changes: list[tuple[str, str, dict[str, object], dict[str, object]]] = [
            (
                "orders",
                op,
                {
                    "id": ORDER,
                    "buyer_id": 1,
                    "merchant_id": 2,
                    "status": "created",
                    "total_idr": Decimal(total) / 100,
                    "created_at": T,
                    "updated_at": T,
                },
                {},
            ),
        ]
        changes += [
            (
                "order_items",
                op,
                {
                    "order_id": ORDER,
                    "line_no": n,
                    "product_id": 5,
                    "qty": qty,
                    "unit_price_idr": price,
                },
                {},
            )
            for n in range(1, LINES + 1)
        ]
        msgs += f.transaction(lsn, changes)
        for small in range(20):  # other aggregates, other partitions, interleaved
            lsn += 1
            oid = 10_000 + rnd * 100 + small
            msgs += f.transaction(
                lsn,
                [
                    (
                        "orders",
                        "c",
                        {
                            "id": oid,
                            "buyer_id": 1,
                            "merchant_id": 2,
                            "status": "paid",
                            "total_idr": Decimal("5.00"),
                            "created_at": T,
                            "updated_at": T,
                        },
                        {},
                    ),
                    (
                        "order_items",
                        "c",
                        {
                            "order_id": oid,
                            "line_no": 1,
                            "product_id": 5,
                            "qty": 1,
                            "unit_price_idr": Decimal("5.00"),
                        },
                        {},
                    ),
                ],
            )
    return msgs, total


class Reader(threading.Thread):
    """Polls the order and its lines in one snapshot; records every inconsistent view."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.stop = threading.Event()
        self.views = 0
        self.bad: list[tuple[object, ...]] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT o.total_minor, l.n, l.s FROM (SELECT 1) AS one "
                    "LEFT JOIN commerce.orders o ON o.order_id = %(id)s "
                    "CROSS JOIN LATERAL (SELECT count(*) AS n, "
                    "sum(quantity * unit_price_minor) AS s FROM commerce.order_lines "
                    "WHERE order_id = %(id)s) l",
                    {"id": ORDER},
                ).fetchone()
                assert row is not None
                total, n, s = row
                self.views += 1
                if total is None and n == 0:
                    continue  # not there yet: consistent
                if total is None or n != LINES or s != total:
                    self.bad.append(row)


@pytest.mark.parametrize(
    "long_tx_events",
    [
        pytest.param(100_000, id="buffered-across-polls"),
        pytest.param(300, id="long-db-transaction"),
    ],
)
def test_a_transaction_split_across_polls_is_never_half_visible(
    commerce: str, topics: Topics, long_tx_events: int
) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    msgs, total = _big_order_transactions(f)
    produce(topics.bootstrap, msgs)
    settings = settings_for(commerce, topics, batch_max_events=250)
    reader = Reader(commerce)
    reader.start()
    try:
        apply_until(
            settings,
            lambda: total_offsets(commerce, settings.apply.group_id) == len(msgs),
            timeout=180,
            options=ApplyOptions(long_tx_events=long_tx_events),
        )
    finally:
        reader.stop.set()
        reader.join(10)
    assert reader.views > 20
    assert reader.bad == []
    rows = fetch_commerce(commerce)
    assert rows["orders"][(ORDER,)]["total_minor"] == total
    assert len([k for k in rows["order_lines"] if k[0] == ORDER]) == LINES
    assert len(rows["orders"]) == 1 + ROUNDS * 20
