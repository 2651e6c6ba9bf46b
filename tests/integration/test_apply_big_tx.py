"""A huge source transaction (100,000 order lines of 1,000 orders, across all partitions) goes
through ``cutover apply`` in sub-batches inside long database transactions: no order is ever
seen with part of its lines or a total that disagrees with them, the final state is exact, and
the consumer's peak RSS stays far under the 300 MB budget (the benchmark measures 1,000,000).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.apply_support import (
    EventFactory,
    Topics,
    cli_env,
    delete_topics,
    make_topics,
    produce,
    publish_schemas,
    start_apply,
    stop_apply,
    total_offsets,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

T = datetime(2025, 3, 1, tzinfo=UTC)
ORDERS = 1000
LINES = 100


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=3)
    try:
        yield t
    finally:
        delete_topics(t)


class OrderChecker(threading.Thread):
    """Counts orders whose lines are partly there or disagree with the order total."""

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
                    "SELECT count(*) FILTER (WHERE o.order_id IS NULL OR l.n IS NULL "
                    "OR l.n <> %s OR l.s <> o.total_minor), count(o.order_id) "
                    "FROM commerce.orders o FULL JOIN (SELECT order_id, count(*) AS n, "
                    "sum(quantity * unit_price_minor) AS s FROM commerce.order_lines "
                    "GROUP BY order_id) l ON l.order_id = o.order_id",
                    (LINES,),
                ).fetchone()
                assert row is not None
                self.views += 1
                if row[0]:
                    self.bad.append(row)


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_100k_row_transaction_is_applied_per_aggregate_atomically_in_bounded_memory(
    commerce: str, topics: Topics, tmp_path: Path
) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    changes: list[tuple[str, str, dict[str, object], dict[str, object]]] = []
    for oid in range(1, ORDERS + 1):
        changes.append(
            (
                "orders",
                "c",
                {
                    "id": oid,
                    "buyer_id": 1,
                    "merchant_id": 1,
                    "status": "paid",
                    "total_idr": Decimal(LINES * 2 * oid),
                    "created_at": T,
                    "updated_at": T,
                },
                {},
            )
        )
        changes += [
            (
                "order_items",
                "c",
                {
                    "order_id": oid,
                    "line_no": n,
                    "product_id": 1,
                    "qty": 2,
                    "unit_price_idr": Decimal(oid),
                },
                {},
            )
            for n in range(1, LINES + 1)
        ]
    msgs = f.transaction(5000, changes)
    produce(topics.bootstrap, msgs)
    group = "bigtx"
    config = write_config(tmp_path, topics, group=group, batch_max_events=2000)
    env = cli_env(commerce, topics.bootstrap)
    log = tmp_path / "apply.log"
    checker = OrderChecker(commerce)
    checker.start()
    proc = start_apply(config, env, log=log)
    try:
        wait_for(lambda: total_offsets(commerce, group) == len(msgs), 300, "the big transaction")
        peak = _rss_peak_mb(proc.pid)
    finally:
        checker.stop.set()
        checker.join(30)
        code = stop_apply(proc)
    text = log.read_text()
    assert code == 0, text
    assert '"apply.long_tx_opened"' in text
    assert checker.views > 5
    assert checker.bad == []
    with psycopg.connect(commerce) as conn:
        assert conn.execute("SELECT count(*) FROM commerce.order_lines").fetchone() == (
            ORDERS * LINES,
        )
    assert peak < 300, f"consumer peak RSS {peak:.0f} MB"


def test_a_member_joining_during_a_long_transaction_loses_and_exposes_nothing(
    commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    # Payment holds most partitions: whatever the assignor moves, part of the long transaction
    # goes with it.
    topics = make_topics(kafka_bootstrap, partitions=6, per_domain={"data": 1, "merchant": 1})
    try:
        f = EventFactory(topics.prefix, topics.partitions)
        publish_schemas(topics, f)
        changes: list[tuple[str, str, dict[str, object], dict[str, object]]] = []
        for oid in range(1, ORDERS + 1):
            changes.append(
                (
                    "orders",
                    "c",
                    {
                        "id": oid,
                        "buyer_id": 1,
                        "merchant_id": 1,
                        "status": "paid",
                        "total_idr": Decimal(LINES * 2 * oid),
                        "created_at": T,
                        "updated_at": T,
                    },
                    {},
                )
            )
            changes += [
                (
                    "order_items",
                    "c",
                    {
                        "order_id": oid,
                        "line_no": n,
                        "product_id": 1,
                        "qty": 2,
                        "unit_price_idr": Decimal(oid),
                    },
                    {},
                )
                for n in range(1, LINES + 1)
            ]
        msgs = f.transaction(5000, changes)
        # Each partition's closing event is held back: the long transaction cannot commit
        # before the rebalance, so the revoke must roll it back.
        last: dict[int, int] = {m.partition: i for i, m in enumerate(msgs)}
        closing = [msgs[i] for i in sorted(last.values())]
        produce(topics.bootstrap, [m for i, m in enumerate(msgs) if i not in last.values()])
        group = "bigtx-rebalance"
        # Small sub-batches: the long transaction stays open long enough for a member to join.
        config = write_config(tmp_path, topics, group=group, batch_max_events=500)
        env = cli_env(commerce, topics.bootstrap)
        log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
        checker = OrderChecker(commerce)
        checker.start()
        first = start_apply(config, env, log=log_a)
        second = None
        try:
            wait_for(lambda: '"apply.long_tx_opened"' in log_a.read_text(), 60, "a long tx")
            second = start_apply(config, env, log=log_b)
            wait_for(lambda: '"apply.partitions_revoked"' in log_a.read_text(), 60, "a revoke")
            produce(topics.bootstrap, closing)
            wait_for(lambda: total_offsets(commerce, group) == len(msgs), 300, "the end")
        finally:
            checker.stop.set()
            checker.join(30)
            codes = [stop_apply(p) for p in (first, second) if p is not None]
        text = log_a.read_text() + log_b.read_text()
        assert codes == [0, 0], text
        # Which partitions move is the assignor's choice: each revoke that took a partition
        # streaming into the open long transaction must have rolled that transaction back.
        events = [json.loads(line) for line in log_a.read_text().splitlines() if line[:1] == "{"]
        for needed, done in _revokes_of_streaming_partitions(events):
            assert done or not needed, text
        assert checker.bad == []
        with psycopg.connect(commerce) as conn:
            assert conn.execute("SELECT count(*) FROM commerce.order_lines").fetchone() == (
                ORDERS * LINES,
            )
    finally:
        delete_topics(topics)


def _revokes_of_streaming_partitions(events: list[dict[str, Any]]) -> list[tuple[bool, bool]]:
    """For each revoke in a consumer's log: (it took a streaming partition, the long
    transaction was rolled back for it). The rollback is logged just before the revoke."""
    out = []
    streaming: set[str] = set()
    rolled: set[str] = set()
    for event in events:
        kind = event["event"]
        if kind == "apply.long_tx_opened":
            streaming.update(event["partition"])
        elif kind == "apply.long_tx_closed":
            streaming.difference_update(event["partition"])
        elif kind == "apply.batch_committed":
            streaming.clear()
        elif kind == "apply.tx_rolled_back":
            rolled, streaming = streaming, set()
        elif kind == "apply.partitions_revoked":
            moved = set(event["partitions"])
            out.append((bool((streaming | rolled) & moved), bool(rolled & moved)))
            rolled = set()
    return out
