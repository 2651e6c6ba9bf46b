"""The producer's pure core: routing, partitioning, hold-back, envelopes, snapshot windows.

Messages are built as pgoutput dataclasses (their byte framing is covered by test_pgoutput.py);
the emitted records are decoded with a SchemaStore fed only from what ``on_schema`` published,
exactly as a consumer reading the schemas topic would.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cutover import codec
from cutover.codec import ColumnSpec, SchemaStore
from cutover.errors import (
    DecodeError,
    SchemaIncompatible,
    TruncateStopped,
    UnmappableRow,
    UsageError,
)
from cutover.fence import FENCE_MESSAGE_PREFIX, fence_message, parse_fence_message
from cutover.mapping import MappingSpec, load_mapping
from cutover.values import UNCHANGED
from producers.events import (
    SNAPSHOT_HIGH_PREFIX,
    SNAPSHOT_LOW_PREFIX,
    ChangeStream,
    ChunkWindow,
    HoldBack,
    SourceInfo,
    TableRoute,
    avro_row,
    partition_for,
    pg_time_to_ms,
)
from producers.pgoutput import (
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    Truncate,
    Update,
)
from producers.truncates import Carry, parse_carry

REPO = Path(__file__).resolve().parents[2]
INT8, INT4, TEXT, NUMERIC, TIMESTAMPTZ, UUID = 20, 23, 25, 1700, 1184, 2950
MONEY = (14 << 16 | 2) + 4  # numeric(14,2) typmod
USERS, PRODUCTS, ITEMS = 100, 101, 102


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping(REPO / "examples" / "shop" / "mapping.toml")


def users_rel(extra: tuple[Column, ...] = ()) -> Relation:
    return Relation(
        USERS,
        "shop",
        "users",
        "d",
        (
            Column("id", INT8, -1, True),
            Column("display_name", TEXT, -1, False),
            Column("email", TEXT, -1, False),
            Column("phone", TEXT, -1, False),
            Column("created_at", TIMESTAMPTZ, -1, False),
            Column("updated_at", TIMESTAMPTZ, -1, False),
            *extra,
        ),
    )


def products_rel() -> Relation:
    return Relation(
        PRODUCTS,
        "shop",
        "products",
        "i",
        (
            Column("id", INT8, -1, True),
            Column("merchant_id", INT8, -1, True),
            Column("title", TEXT, -1, False),
            Column("description", TEXT, -1, False),
            Column("price_idr", NUMERIC, MONEY, False),
            Column("stock", INT4, -1, False),
            Column("status", TEXT, -1, False),
        ),
    )


def items_rel() -> Relation:
    return Relation(
        ITEMS,
        "shop",
        "order_items",
        "d",
        (
            Column("order_id", INT8, -1, True),
            Column("line_no", INT4, -1, True),
            Column("product_id", INT8, -1, False),
            Column("qty", INT4, -1, False),
            Column("unit_price_idr", NUMERIC, MONEY, False),
        ),
    )


TS = b"2026-11-27 10:00:00+00"


def user(uid: int, name: str = "Ann") -> tuple[bytes | None, ...]:
    return (str(uid).encode(), name.encode(), b"a@x", None, TS, TS)


def product(pid: int, mid: int, stock: int = 1, desc: Any = b"long text") -> tuple[Any, ...]:
    return (
        str(pid).encode(),
        str(mid).encode(),
        b"T",
        desc,
        b"10.50",
        str(stock).encode(),
        b"live",
    )


def item(oid: int, line: int) -> tuple[bytes, ...]:
    return (str(oid).encode(), str(line).encode(), b"7", b"2", b"3.25")


@dataclass
class Harness:
    """A ChangeStream wired to lists instead of Kafka and the schemas topic."""

    mapping: MappingSpec
    partitions: int = 6
    sent: list[tuple[str, int, bytes, bytes]] = field(default_factory=list)
    schemas: list[tuple[str, list[str]]] = field(default_factory=list)
    store: SchemaStore = field(default_factory=SchemaStore)
    #: More keyword arguments of ChangeStream (carry_truncates, fenced_domains, ...).
    options: dict[str, Any] = field(default_factory=dict)
    stream: ChangeStream = field(init=False)

    def __post_init__(self) -> None:
        topics = {f"shop.{d}": self.partitions for d in ("payment", "data", "merchant")}
        self.stream = ChangeStream(
            self.mapping,
            SourceInfo(version="1.0", name="shop", db="legacy"),
            partitions=topics,
            topic_for=lambda d: f"shop.{d}",
            emit=lambda t, p, k, v: self.sent.append((t, p, k, v)),
            on_schema=self._on_schema,
            clock_ms=lambda: 42,
            **self.options,
        )

    def _on_schema(self, route: TableRoute, changes: list[str]) -> None:
        self.store.add(route.writer)
        self.schemas.append((route.qualified, changes))

    def records(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        out = []
        for topic, partition, key, value in self.sent:
            _, record = self.store.decode(value)
            out.append((topic, partition, key.decode(), record))
        return out

    def tx(self, xid: int, lsn: int, *msgs: Any, end: int | None = None) -> None:
        self.stream.handle(Begin(lsn, 849_138_845_123_456, xid))
        for m in msgs:
            self.stream.handle(m)
        self.stream.handle(Commit(0, lsn, end or lsn + 8, 849_138_845_123_456))


# --- partitioning and hold-back -------------------------------------------------------------


def test_partition_is_crc32_of_the_utf8_key_modulo_partitions() -> None:
    assert partition_for("12345", 6) == zlib.crc32(b"12345") % 6
    assert partition_for(b"12345", 6) == partition_for("12345", 6)
    assert {partition_for(str(i), 6) for i in range(200)} == set(range(6))


def test_pg_time_to_ms() -> None:
    assert pg_time_to_ms(0) == 946_684_800_000
    assert pg_time_to_ms(1_500) == 946_684_800_001


def test_holdback_releases_the_previous_item_of_a_partition_and_drains_the_rest() -> None:
    hold: HoldBack[str] = HoldBack()
    assert hold.push("t", 0, "a") is None
    assert hold.push("t", 1, "b") is None
    assert hold.push("t", 0, "c") == "a"
    assert hold.push("u", 0, "d") is None
    assert len(hold) == 3
    assert sorted(hold.drain()) == ["b", "c", "d"]
    assert hold.drain() == []


# --- envelopes --------------------------------------------------------------------------------


def test_insert_update_delete_envelopes(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    h.tx(
        700,
        0x1000,
        Insert(USERS, user(1)),
        Update(USERS, None, None, user(1, "Bob")),
        Delete(USERS, (b"1", None, None, None, None, None), "K"),
        end=0x1100,
    )
    recs = h.records()
    assert [r[3]["op"] for r in recs] == ["c", "u", "d"]
    key = "1"
    part = zlib.crc32(b"1") % 6
    assert all(r[:3] == ("shop.data", part, key) for r in recs)
    ins, upd, dele = (r[3] for r in recs)
    assert ins["before"] is None
    assert ins["after"]["display_name"] == "Ann"
    assert ins["after"]["created_at"].isoformat() == "2026-11-27T10:00:00+00:00"
    assert upd["after"]["display_name"] == "Bob"
    assert dele["after"] is None
    assert dele["before"] == {
        "id": 1, "display_name": None, "email": None, "phone": None,
        "created_at": None, "updated_at": None,
    }  # fmt: skip
    for seq, rec in enumerate((ins, upd, dele)):
        src = rec["source"]
        assert (src["lsn"], src["seq"], src["txId"]) == (0x1000, seq, 700)
        assert src["snapshot"] == "false"
        assert (src["schema"], src["table"], src["db"], src["name"]) == (
            "shop", "users", "legacy", "shop",
        )  # fmt: skip
        assert src["ts_ms"] == pg_time_to_ms(849_138_845_123_456)
        assert rec["transaction"]["id"] == f"700:{0x1000}"
        assert rec["transaction"]["total_order"] == seq + 1
        assert rec["transaction"]["data_collection_order"] == seq + 1
        assert rec["ts_ms"] == 42
    # One partition: only the last event of the transaction there is marked.
    assert [r["transaction"]["last_in_partition"] for r in (ins, upd, dele)] == [
        False, False, True,
    ]  # fmt: skip
    assert h.stream.last_commit_end_lsn == 0x1100
    assert h.stream.transactions == 1
    assert h.stream.events == 3


def test_last_in_partition_marks_the_last_event_of_each_partition(mapping: MappingSpec) -> None:
    h = Harness(mapping, partitions=64)
    h.stream.handle(items_rel())
    orders = [1, 2, 3]
    msgs = [Insert(ITEMS, item(o, line)) for line in (1, 2) for o in orders]
    h.tx(9, 0x2000, *msgs)
    recs = h.records()
    assert len(recs) == 6
    last_seq: dict[int, int] = {}
    for _, part, _, rec in recs:
        last_seq[part] = max(last_seq.get(part, -1), rec["source"]["seq"])
    for _, part, key, rec in recs:
        assert rec["transaction"]["last_in_partition"] is (rec["source"]["seq"] == last_seq[part])
        assert part == zlib.crc32(key.encode()) % 64
    # Within a partition, the events keep their transaction order.
    per_part: dict[int, list[int]] = {}
    for _, part, _, rec in recs:
        per_part.setdefault(part, []).append(rec["source"]["seq"])
    assert all(seqs == sorted(seqs) for seqs in per_part.values())


def test_unchanged_toast_is_null_and_listed(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(products_rel())
    h.tx(5, 0x3000, Update(PRODUCTS, None, None, product(7, 3, stock=9, desc=UNCHANGED)))
    (topic, _, key, rec) = h.records()[0]
    assert (topic, key) == ("shop.merchant", "3")  # the aggregate key: merchant_id
    assert rec["after"]["description"] is None
    assert rec["unchanged_toast"] == ["description"]
    assert rec["after"]["stock"] == 9
    assert rec["after"]["price_idr"] == Decimal("10.50")


def test_delete_under_an_identity_index_is_keyed_by_the_aggregate(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(products_rel())
    h.tx(5, 0x3000, Delete(PRODUCTS, (b"7", b"3", None, None, None, None, None), "K"))
    (_, part, key, rec) = h.records()[0]
    assert key == "3" and part == zlib.crc32(b"3") % 6
    assert rec["before"]["id"] == 7 and rec["before"]["merchant_id"] == 3


def test_delete_without_the_aggregate_key_is_unmappable(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(products_rel())
    h.stream.handle(Begin(0x10, 0, 1))
    with pytest.raises(UnmappableRow, match="merchant_id"):
        h.stream.handle(Delete(PRODUCTS, (b"7", None, None, None, None, None, None), "K"))


def test_uuid_and_unconstrained_numeric_are_text(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    rel = users_rel((Column("token", UUID, -1, False), Column("score", NUMERIC, -1, False)))
    cols = tuple(ColumnSpec(c.name, c.type_oid, c.type_modifier) for c in rel.columns)
    route = h.stream.route_for("shop", "users", cols)
    import uuid as uuidlib

    token = uuidlib.UUID(int=5)
    row, unchanged = avro_row(
        route, {"id": 1, "token": token, "score": Decimal("1E-7"), "email": UNCHANGED}
    )
    assert row == {"id": 1, "token": str(token), "score": "0.0000001", "email": None}
    assert unchanged == ["email"]


def test_table_not_in_the_mapping_is_refused(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    with pytest.raises(UnmappableRow, match="not in the mapping"):
        h.stream.handle(Relation(1, "shop", "audit_log", "d", (Column("id", INT8, -1, True),)))


def _stop_mapping(tmp_path: Path) -> MappingSpec:
    text = (REPO / "examples" / "shop" / "mapping.toml").read_text(encoding="utf-8")
    text = text.replace("[tables.users]\n", '[tables.users]\non_truncate = "stop"\n', 1)
    path = tmp_path / "mapping.toml"
    path.write_text(text, encoding="utf-8")
    spec = load_mapping(path)
    assert spec.tables["users"].on_truncate == "stop"
    return spec


def test_truncate_goes_to_every_partition_in_commit_order(mapping: MappingSpec) -> None:
    h = Harness(mapping, partitions=4)
    h.store.add(codec.truncate_schema())
    h.stream.handle(users_rel())
    before, after = user(1), user(2)
    h.tx(
        5,
        0x3000,
        Insert(USERS, before),
        Truncate((USERS,), False, True),
        Insert(USERS, after),
        end=0x3100,
    )
    recs = h.records()
    truncates = [r for r in recs if r[3]["op"] == "t"]
    assert sorted(r[1] for r in truncates) == [0, 1, 2, 3]  # one copy per partition
    assert all(r[0] == "shop.data" for r in truncates)
    # Every copy at the same position, between the changes before and after it.
    assert {(r[3]["source"]["lsn"], r[3]["source"]["seq"]) for r in truncates} == {(0x3000, 1)}
    assert all(r[3]["source"]["table"] == "users" and r[3]["restart_identity"] for r in truncates)
    for part in range(4):
        seqs = [r[3]["source"]["seq"] for r in recs if r[1] == part]
        assert seqs == sorted(seqs)
        # The last event of the transaction in each partition closes it, the others do not.
        lasts = [r[3]["transaction"]["last_in_partition"] for r in recs if r[1] == part]
        assert lasts == [False] * (len(lasts) - 1) + [True]
    assert [r[3]["source"]["seq"] for r in recs if r[3]["op"] == "c"] == [0, 2]
    assert h.stream.truncates == 1


def test_truncate_empties_an_open_snapshot_window(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.store.add(codec.truncate_schema())
    h.stream.handle(users_rel())
    route = h.stream.route_for(
        "shop",
        "users",
        [ColumnSpec(c.name, c.type_oid, c.type_modifier) for c in users_rel().columns],
    )
    window = ChunkWindow("c1", route, {(1,): {"id": 1}, (2,): {"id": 2}})
    h.stream.add_window(window)
    h.tx(6, 0x3200, LogicalMessage(True, 0x3200, SNAPSHOT_LOW_PREFIX, b"c1"))
    h.tx(7, 0x3300, Truncate((USERS,), False, False))
    assert window.rows == {}  # rows read before the TRUNCATE are not emitted after it


def test_truncate_policy_stop_names_the_table_and_the_resume_command(tmp_path: Path) -> None:
    h = Harness(_stop_mapping(tmp_path))
    h.stream.handle(users_rel())
    h.stream.handle(Begin(0x10_0000_0010, 0, 77))
    with pytest.raises(TruncateStopped) as caught:
        h.stream.handle(Truncate((USERS,), False, False))
    message = caught.value.message
    assert "TRUNCATE of shop.users" in message and "commit LSN 10/10" in message
    assert "cutover produce --carry-truncate shop.users@10/10" in message
    assert caught.value.tables == ("shop.users",) and caught.value.exit_code == 3
    assert h.sent == []


def test_carried_truncate_passes_a_stop_policy_once(tmp_path: Path) -> None:
    spec = _stop_mapping(tmp_path)
    h = Harness(spec, options={"carry_truncates": [parse_carry("shop.users@0/4000")]})
    h.store.add(codec.truncate_schema())
    h.stream.handle(users_rel())
    h.tx(8, 0x4000, Truncate((USERS,), False, False))
    assert len(h.records()) == 6
    with pytest.raises(TruncateStopped):  # another TRUNCATE of the table stops again
        h.tx(9, 0x5000, Truncate((USERS,), False, False))


def test_parse_carry() -> None:
    assert parse_carry("shop.invoices@16/B374D848") == Carry("shop.invoices", 0x16_B374D848)
    assert str(Carry("shop.invoices", 0x16_B374D848)) == "shop.invoices@16/B374D848"
    for bad in ("shop.invoices", "invoices@0/1", "shop.invoices@zz"):
        with pytest.raises(UsageError):
            parse_carry(bad)


def test_change_before_relation_is_a_decode_error(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(Begin(0x10, 0, 1))
    with pytest.raises(DecodeError, match="before its Relation"):
        h.stream.handle(Insert(USERS, user(1)))


# --- schemas ----------------------------------------------------------------------------------


def test_every_schema_is_announced_before_its_first_event(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    assert h.schemas == [("shop.users", [])]
    assert not h.sent
    # The same Relation again (every peek resends them) publishes nothing new.
    h.stream.handle(users_rel())
    assert len(h.schemas) == 1


def test_added_column_is_a_new_compatible_schema_version(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    h.tx(1, 0x100, Insert(USERS, user(1)))
    h.stream.handle(users_rel((Column("tier", TEXT, -1, False),)))
    h.tx(2, 0x200, Insert(USERS, (*user(2), b"gold")))
    assert h.schemas[1] == ("shop.users", ["added tier"])
    first, second = (r[3] for r in h.records())
    assert "tier" not in first["after"]
    assert second["after"]["tier"] == "gold"


def test_changed_type_is_incompatible(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    changed = Relation(
        USERS, "shop", "users", "d", (Column("id", TEXT, -1, True), *users_rel().columns[1:])
    )
    with pytest.raises(SchemaIncompatible, match=r"shop\.users"):
        h.stream.handle(changed)


def test_known_columns_from_an_earlier_run_are_checked_too(mapping: MappingSpec) -> None:
    old = (ColumnSpec("id", TEXT, -1),)
    h = Harness(mapping)
    h.stream = ChangeStream(
        mapping,
        SourceInfo(version="1", name="shop", db="legacy"),
        partitions={"shop.data": 6},
        topic_for=lambda d: f"shop.{d}",
        emit=lambda *a: None,
        on_schema=lambda r, c: None,
        known_columns={"shop.users": old},
        clock_ms=lambda: 0,
    )
    with pytest.raises(SchemaIncompatible):
        h.stream.handle(users_rel())


# --- snapshot windows (DBLog) -----------------------------------------------------------------


def _window(h: Harness, rows: dict[int, str]) -> ChunkWindow:
    rel = users_rel()
    cols = tuple(ColumnSpec(c.name, c.type_oid, c.type_modifier) for c in rel.columns)
    route = h.stream.route_for("shop", "users", cols)
    from datetime import UTC, datetime

    at = datetime(2026, 1, 1, tzinfo=UTC)
    window = ChunkWindow(
        chunk_id="1:1:abc",
        route=route,
        rows={
            (uid,): {
                "id": uid,
                "display_name": name,
                "email": None,
                "phone": None,
                "created_at": at,
                "updated_at": at,
            }
            for uid, name in rows.items()
        },
        request_id=1,
    )
    h.stream.add_window(window)
    return window


def _mark(prefix: str, chunk: str = "1:1:abc") -> LogicalMessage:
    return LogicalMessage(True, 0, prefix, chunk.encode())


def test_window_drops_keys_changed_between_watermarks(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    # Changed BEFORE the low watermark: not dropped (the chunk read after it is newer).
    h.tx(1, 0x100, Insert(USERS, user(1, "early")))
    window = _window(h, {1: "one", 2: "two", 3: "three", 4: "four"})
    h.tx(2, 0x200, _mark(SNAPSHOT_LOW_PREFIX))
    h.tx(3, 0x300, Update(USERS, None, None, user(2, "streamed")))
    h.tx(4, 0x400, Delete(USERS, (b"3", None, None, None, None, None), "K"))
    h.tx(5, 0x500, _mark(SNAPSHOT_HIGH_PREFIX), end=0x508)
    # After the high watermark: nothing to drop any more.
    h.tx(6, 0x600, Update(USERS, None, None, user(4, "late")))
    recs = [r[3] for r in h.records()]
    snap = [r for r in recs if r["op"] == "r"]
    assert [r["after"]["id"] for r in snap] == [1, 4]
    assert [r["after"]["display_name"] for r in snap] == ["one", "four"]
    for seq, r in enumerate(snap):
        assert r["source"]["snapshot"] == "true"
        assert r["source"]["lsn"] == 0x500  # the high watermark's commit LSN
        assert r["source"]["seq"] == seq
        assert r["transaction"] is None
    # Stream order: the streamed changes come before the chunk rows, the late one after.
    assert [r["op"] for r in recs] == ["c", "u", "d", "r", "r", "u"]
    assert window.state == "closed" and window.dropped == 2 and window.emitted == 2
    assert h.stream.completed_chunks == [window]
    assert not h.stream.windows
    assert h.stream.snapshot_rows == 2


def test_unchanged_toast_update_in_the_window_asks_for_a_reread(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    window = _window(h, {1: "one", 2: "two"})
    h.tx(2, 0x200, _mark(SNAPSHOT_LOW_PREFIX))
    partial = (b"1", b"x", UNCHANGED, None, TS, TS)
    h.tx(3, 0x300, Update(USERS, None, None, partial))
    h.tx(4, 0x400, Update(USERS, None, None, user(2, "full")))
    h.tx(5, 0x500, _mark(SNAPSHOT_HIGH_PREFIX))
    assert window.reread == [(1,)]
    assert window.emitted == 0


def test_high_watermark_without_low_fails_the_chunk(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    window = _window(h, {1: "one"})
    h.tx(5, 0x500, _mark(SNAPSHOT_HIGH_PREFIX))
    assert window.state == "failed"
    assert h.stream.completed_chunks == [window]
    assert not [r for r in h.records() if r[3]["op"] == "r"]


def test_watermarks_of_unknown_chunks_and_other_messages_are_ignored(
    mapping: MappingSpec,
) -> None:
    seen: list[str] = []
    h = Harness(mapping)
    h.stream._on_message = lambda m, tx: seen.append(m.prefix)
    h.tx(1, 0x100, _mark(SNAPSHOT_LOW_PREFIX, "9:9:zzz"), LogicalMessage(True, 0, "app", b"x"))
    assert seen == ["app"]
    assert h.stream.transactions == 1
    assert not h.sent


def test_heartbeat_schema_is_the_codec_one() -> None:
    ws = codec.writer_schema(codec.heartbeat_schema())
    assert ws.name == "cutover.Heartbeat"


# --- no echo ----------------------------------------------------------------------------------


def test_transactions_of_our_appliers_are_dropped_and_still_advance(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    h.tx(1, 0x1000, Insert(USERS, user(1)), end=0x1010)
    # An applier of the other direction wrote this one (origin cutover_apply_3): no event.
    h.tx(2, 0x2000, Origin(0x99, "cutover_apply_3"), Insert(USERS, user(2)), end=0x2010)
    # Another tool's origin is not ours: its changes are carried as usual.
    h.tx(3, 0x3000, Origin(0x98, "pglogical_node"), Insert(USERS, user(3)), end=0x3010)
    h.tx(4, 0x4000, Insert(USERS, user(4)), end=0x4010)
    assert [r[2] for r in h.records()] == ["1", "3", "4"]
    assert h.stream.echo_dropped == 1
    # The dropped transaction counts: the slot may advance past it.
    assert h.stream.transactions == 4
    assert h.stream.last_commit_end_lsn == 0x4010


def test_the_echo_mark_ends_with_its_transaction(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    h.tx(2, 0x2000, Origin(0x99, "cutover_apply_0"), Insert(USERS, user(2)), end=0x2010)
    h.tx(5, 0x5000, Insert(USERS, user(5)), end=0x5010)
    assert [r[2] for r in h.records()] == ["5"]


# --- the write fence in the stream ------------------------------------------------------------


def _fence(domain: str, fenced: bool) -> LogicalMessage:
    return LogicalMessage(True, 0, FENCE_MESSAGE_PREFIX, fence_message(domain, fenced))


def test_a_fenced_domains_changes_are_dropped_between_raise_and_lower(
    mapping: MappingSpec,
) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    h.stream.handle(products_rel())
    h.tx(1, 0x100, Update(USERS, None, None, user(1, "before")), end=0x108)
    # The raise commits with the fence row: what follows in WAL order is dropped.
    h.tx(2, 0x200, _fence("data", True), end=0x208)
    # The social app updates its own columns (fence narrowed): the whole-row image would carry
    # stale mapped values forward; the other domains flow as usual.
    h.tx(3, 0x300, Update(USERS, None, None, user(1, "stale")), Insert(PRODUCTS, product(7, 3)))
    assert h.stream.fenced == {"data"}
    h.tx(4, 0x400, _fence("data", False), end=0x408)
    h.tx(5, 0x500, Update(USERS, None, None, user(1, "after")), end=0x508)
    got = [(r[0], r[2], (r[3]["after"] or {}).get("display_name")) for r in h.records()]
    assert got == [
        ("shop.data", "1", "before"),
        ("shop.merchant", "3", None),
        ("shop.data", "1", "after"),
    ]
    assert h.stream.fence_dropped == 1
    assert h.stream.transactions == 5  # the slot may advance past all of them


def test_the_fence_state_at_start_comes_from_the_caller(mapping: MappingSpec) -> None:
    h = Harness(mapping, options={"fenced_domains": {"data"}})
    h.stream.handle(users_rel())
    h.tx(1, 0x100, Delete(USERS, (b"1", None, None, None, None, None), "K"))
    assert not h.sent
    assert h.stream.fence_dropped == 1


def test_fence_messages_of_another_shape_change_nothing(mapping: MappingSpec) -> None:
    h = Harness(mapping)
    h.stream.handle(users_rel())
    # An older release emitted the bare domain name after the fence LSN.
    h.tx(1, 0x100, LogicalMessage(True, 0, FENCE_MESSAGE_PREFIX, b"data"))
    h.tx(2, 0x200, LogicalMessage(True, 0, FENCE_MESSAGE_PREFIX, b'{"domain": "data"}'))
    h.tx(3, 0x300, Insert(USERS, user(1)))
    assert [r[2] for r in h.records()] == ["1"]
    assert parse_fence_message(fence_message("payment", True)) == ("payment", True)


def test_a_chunk_closing_after_its_domains_fence_is_never_emitted(mapping: MappingSpec) -> None:
    """A snapshot of a domain whose writes moved would overwrite commerce's newer rows with
    legacy's: the chunk ends ``fenced`` (its request is failed by the runner), unemitted."""
    h = Harness(mapping)
    h.stream.handle(users_rel())
    window = _window(h, {1: "one", 2: "two"})
    h.tx(2, 0x200, _mark(SNAPSHOT_LOW_PREFIX))
    h.tx(3, 0x300, _fence("data", True), end=0x308)
    h.tx(5, 0x500, _mark(SNAPSHOT_HIGH_PREFIX))
    assert window.state == "fenced" and window.emitted == 0
    assert h.stream.completed_chunks == [window]
    assert not h.stream.windows
    assert not [r for r in h.records() if r[3]["op"] == "r"]
    # Another domain's fence leaves a chunk alone.
    other = _window(h, {3: "three"})
    h.tx(6, 0x600, _mark(SNAPSHOT_LOW_PREFIX), _fence("data", False), _fence("payment", True))
    h.tx(7, 0x700, _mark(SNAPSHOT_HIGH_PREFIX))
    assert other.state == "closed" and other.emitted == 1
