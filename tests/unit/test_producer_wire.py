"""The producer's wire output pinned byte for byte: raw pgoutput bytes in, Kafka records out.

A representative stream (every column type the shop and the codec carry, NULLs, an unchanged
TOAST value, inserts, updates with and without an old key, deletes, several partitions, a
TRUNCATE and a snapshot chunk) is fed through :meth:`ChangeStream.feed`, the producer's hot
path, with the production encoder (:func:`producers.fast_avro.encoder_for`) and with fastavro.
Topic, partition, key, headers-free value bytes and their order must stay exactly as pinned:
a change to any of them is a change of the wire format that consumers already read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cutover import codec
from cutover.codec import ColumnSpec
from cutover.errors import DecodeError
from cutover.mapping import MappingSpec, load_mapping
from producers import fast_avro
from producers.change_encoder import change_encoder
from producers.events import (
    SNAPSHOT_HIGH_PREFIX,
    SNAPSHOT_LOW_PREFIX,
    ChangeStream,
    ChunkWindow,
    SourceInfo,
    TxContext,
)
from producers.fast_avro import encoder_for, write_long
from producers.pgoutput import Relation, parse_message
from producers.pgoutput.rows import read_change
from producers.routes import build_route, encode_change

REPO = Path(__file__).resolve().parents[2]
BOOL, BYTEA, INT8, INT2, INT4, TEXT, JSON = 16, 17, 20, 21, 23, 25, 114
FLOAT8, VARCHAR, DATE, TIMESTAMP, TIMESTAMPTZ = 701, 1043, 1082, 1114, 1184
NUMERIC, UUID, JSONB = 1700, 2950, 3802
MONEY = ((14 << 16) | 2) + 4  # numeric(14,2)
RATING = ((3 << 16) | 2) + 4  # numeric(3,2)
USERS, PRODUCTS, ITEMS = 500, 501, 502
COMMIT_US = 849_138_845_123_456


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def _t(value: bytes) -> bytes:
    return b"t" + struct.pack(">i", len(value)) + value


N, U = b"n", b"u"


def _tuple(*columns: bytes) -> bytes:
    return struct.pack(">H", len(columns)) + b"".join(columns)


def _relation(oid: int, name: str, identity: bytes, cols: list[tuple[int, str, int, int]]) -> bytes:
    body = b"R" + struct.pack(">I", oid) + _cstr("shop") + _cstr(name) + identity
    body += struct.pack(">H", len(cols))
    for flags, col, type_oid, typmod in cols:
        body += struct.pack(">B", flags) + _cstr(col) + struct.pack(">Ii", type_oid, typmod)
    return body


def _begin(lsn: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", lsn, COMMIT_US, xid)


def _commit(lsn: int) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, lsn, lsn + 0x28, COMMIT_US)


def _insert(oid: int, row: bytes) -> bytes:
    return b"I" + struct.pack(">I", oid) + b"N" + row


def _update(oid: int, row: bytes, old: bytes | None = None) -> bytes:
    head = b"U" + struct.pack(">I", oid)
    return head + (b"K" + old if old is not None else b"") + b"N" + row


def _delete(oid: int, old: bytes) -> bytes:
    return b"D" + struct.pack(">I", oid) + b"K" + old


def _message(prefix: str, content: bytes) -> bytes:
    return (
        b"M" + struct.pack(">BQ", 1, 0) + _cstr(prefix) + struct.pack(">i", len(content)) + content
    )


USERS_REL = _relation(
    USERS,
    "users",
    b"d",
    [
        (1, "id", INT8, -1),
        (0, "display_name", TEXT, -1),
        (0, "email", VARCHAR, 68),
        (0, "follower_count", INT4, -1),
        (0, "created_at", TIMESTAMPTZ, -1),
        (0, "token", UUID, -1),
        (0, "score", NUMERIC, -1),
        (0, "rating", NUMERIC, RATING),
        (0, "verified", BOOL, -1),
        (0, "born", DATE, -1),
        (0, "seen_at", TIMESTAMP, -1),
        (0, "avatar", BYTEA, -1),
        (0, "weight", FLOAT8, -1),
        (0, "prefs", JSONB, -1),
        (0, "legacy", JSON, -1),
        (0, "level", INT2, -1),
    ],
)
PRODUCTS_REL = _relation(
    PRODUCTS,
    "products",
    b"i",
    [
        (1, "id", INT8, -1),
        (1, "merchant_id", INT8, -1),
        (0, "title", TEXT, -1),
        (0, "description", TEXT, -1),
        (0, "price_idr", NUMERIC, MONEY),
        (0, "stock", INT4, -1),
        (0, "status", TEXT, -1),
    ],
)
ITEMS_REL = _relation(
    ITEMS,
    "order_items",
    b"d",
    [
        (1, "order_id", INT8, -1),
        (1, "line_no", INT4, -1),
        (0, "product_id", INT8, -1),
        (0, "qty", INT4, -1),
        (0, "unit_price_idr", NUMERIC, MONEY),
    ],
)


def _user(uid: int, name: bytes) -> bytes:
    return _tuple(
        _t(str(uid).encode()),
        _t(name),
        _t(b"ann@example.com") if uid % 2 else N,
        _t(b"12345"),
        _t(b"2026-11-27 10:00:00.123456+07"),
        _t(b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        _t(b"-12345678901234567890.000000001"),
        _t(b"4.75"),
        _t(b"t"),
        _t(b"1990-02-28"),
        _t(b"2026-11-27 23:54:05.5"),
        _t(b"\\x00ff10"),
        _t(b"-0.1"),
        _t(b'{"a": [1, 2.50]}'),
        _t(b"[]"),
        _t(b"-3"),
    )


def _product(pid: int, mid: int, desc: bytes) -> bytes:
    return _tuple(
        _t(str(pid).encode()),
        _t(str(mid).encode()),
        _t("Kopi Gayo \u2615".encode()),
        desc,
        _t(b"125000.50"),
        _t(b"-7"),
        _t(b"live"),
    )


def _item(order: int, line: int) -> bytes:
    return _tuple(
        _t(str(order).encode()),
        _t(str(line).encode()),
        _t(b"9001"),
        _t(b"2"),
        _t(b"0.00"),
    )


STREAM: list[bytes] = [
    USERS_REL,
    PRODUCTS_REL,
    ITEMS_REL,
    _begin(0x16_B374D848, 771),
    _insert(USERS, _user(1, b"Ann")),
    _insert(USERS, _user(2, "Bj\u00f6rk".encode())),
    _update(USERS, _user(1, b"Ann B.")),
    _update(USERS, _user(3, b"Cy"), old=_tuple(_t(b"2"), *[N] * 15)),
    _insert(PRODUCTS, _product(7, 3, _t(b"long text"))),
    _update(PRODUCTS, _product(7, 3, U)),
    _delete(PRODUCTS, _tuple(_t(b"8"), _t(b"4"), N, N, N, N, N)),
    *[_insert(ITEMS, _item(order, line)) for order in (10, 11, 12) for line in (1, 2)],
    _delete(ITEMS, _tuple(_t(b"10"), _t(b"1"), N, N, N)),
    _commit(0x16_B374D848),
    _begin(0x16_B374E000, 772),
    _message(SNAPSHOT_LOW_PREFIX, b"1:1:abc"),
    _commit(0x16_B374E000),
    _begin(0x16_B374F000, 773),
    _update(USERS, _user(5, b"streamed")),
    _commit(0x16_B374F000),
    _begin(0x16_B3750000, 774),
    _message(SNAPSHOT_HIGH_PREFIX, b"1:1:abc"),
    _commit(0x16_B3750000),
    _begin(0x16_B3760000, 775),
    _insert(ITEMS, _item(13, 1)),
    b"T" + struct.pack(">iBI", 1, 0, ITEMS),
    _commit(0x16_B3760000),
]

# (topic, partition, key, sha256 of the value, first 16 hex digits), in emission order.
EXPECTED: list[tuple[str, int, str, str]] = [
    ("shop.data", 5, "1", "67f96b43413e2ce2"),
    ("shop.data", 1, "2", "0594bdc9faa0fbaf"),
    ("shop.merchant", 3, "3", "fa7e40da8c9bbe2e"),
    ("shop.payment", 3, "10", "e1329817f2e01a0f"),
    ("shop.payment", 3, "10", "464acc2929df346b"),
    ("shop.payment", 3, "11", "5ab8aacf8884351a"),
    ("shop.payment", 3, "11", "00fe256c40bb8976"),
    ("shop.payment", 3, "12", "34ab832d27d2e1db"),
    ("shop.payment", 3, "12", "e3ee776eb1651af7"),
    ("shop.data", 5, "1", "bda97ac451f3cd01"),
    ("shop.data", 1, "3", "7f2b8b616bf3794a"),
    ("shop.merchant", 3, "3", "94714c6a65557bfd"),
    ("shop.merchant", 0, "4", "5ec080a415117b18"),
    ("shop.payment", 3, "10", "0ea3742de10e42df"),
    ("shop.data", 4, "5", "eb7b330ffe23e903"),
    ("shop.data", 4, "4", "f2449cb98a40c4d9"),
    ("shop.data", 4, "6", "bb98cc06b0146587"),
    ("shop.payment", 5, "13", "0552099549926cfa"),
    ("shop.payment", 5, "__truncate__shop.order_items", "4c554be2e5d73dd0"),
    ("shop.payment", 0, "__truncate__shop.order_items", "4c554be2e5d73dd0"),
    ("shop.payment", 1, "__truncate__shop.order_items", "4c554be2e5d73dd0"),
    ("shop.payment", 2, "__truncate__shop.order_items", "4c554be2e5d73dd0"),
    ("shop.payment", 3, "__truncate__shop.order_items", "4c554be2e5d73dd0"),
    ("shop.payment", 4, "__truncate__shop.order_items", "4c554be2e5d73dd0"),
]


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping(REPO / "examples" / "shop" / "mapping.toml")


def _run(
    mapping: MappingSpec,
    factory: Callable[[codec.WriterSchema], Any] | None,
    *,
    strict: bool = False,
) -> list[Any]:
    """What the stream emits; ``strict``: every message parsed into its dataclass first (the
    path of anything the fused row-change path leaves to it)."""
    sent: list[tuple[str, int, str, str]] = []
    stream = ChangeStream(
        mapping,
        SourceInfo(version="1.2.3", name="shop", db="legacy"),
        partitions={"shop.payment": 6, "shop.data": 6, "shop.merchant": 4},
        topic_for=lambda d: f"shop.{d}",
        emit=lambda t, p, k, v: sent.append((t, p, k.decode(), hashlib.sha256(v).hexdigest()[:16])),
        on_schema=lambda route, changes: None,
        clock_ms=lambda: 1_764_000_000_042,
        encoder_factory=factory,
        carry_truncates=(),
    )
    feed = stream.feed
    for index, message in enumerate(STREAM):
        if index == 3:  # the chunk whose watermarks follow: users 4, 5 and 6
            rel = parse_message(USERS_REL)
            assert isinstance(rel, Relation)
            cols = [ColumnSpec(c.name, c.type_oid, c.type_modifier) for c in rel.columns]
            route = stream.route_for("shop", "users", cols)
            at = datetime(2026, 1, 1, tzinfo=UTC)
            rows: dict[tuple[object, ...], dict[str, object]] = {
                (uid,): {"id": uid, "display_name": f"snap {uid}", "created_at": at}
                for uid in (4, 5, 6)
            }
            stream.add_window(ChunkWindow(chunk_id="1:1:abc", route=route, rows=rows))
        if strict:
            stream.handle(parse_message(message))
        else:
            feed(message)
    return sent


@pytest.mark.parametrize("factory", [encoder_for, None], ids=["fast_avro", "fastavro"])
def test_the_encoded_stream_is_pinned(mapping: MappingSpec, factory: Any) -> None:
    assert _run(mapping, factory) == EXPECTED


def test_the_fused_row_path_emits_what_the_strict_path_emits(mapping: MappingSpec) -> None:
    assert _run(mapping, encoder_for, strict=True) == EXPECTED


# --- the fast paths decide nothing the strict path would decide differently ------------------


def _stream(mapping: MappingSpec, **options: Any) -> tuple[ChangeStream, list[Any]]:
    sent: list[Any] = []
    stream = ChangeStream(
        mapping,
        SourceInfo(version="1", name="shop", db="legacy"),
        partitions={"shop.payment": 6, "shop.data": 6, "shop.merchant": 4},
        topic_for=lambda d: f"shop.{d}",
        emit=lambda t, p, k, v: sent.append((t, p, k, v)),
        on_schema=lambda route, changes: None,
        clock_ms=lambda: 1,
        encoder_factory=encoder_for,
        **options,
    )
    stream.feed(ITEMS_REL)
    stream.feed(_begin(0x100, 1))
    return stream, sent


@pytest.mark.parametrize(
    "message",
    [
        _insert(ITEMS, _item(1, 1))[:-2],  # truncated value
        _insert(ITEMS, _item(1, 1)) + b"\x00",  # trailing byte
        _insert(ITEMS, _tuple(_t(b"1"), _t(b"1"))),  # fewer columns than the Relation
        _insert(ITEMS, _tuple(_t(b"1"), b"b" + struct.pack(">i", 1) + b"\x01", N, N, N)),
        b"I" + struct.pack(">I", ITEMS) + b"X" + _item(1, 1),  # no 'N' mark
        _update(ITEMS, _item(1, 1), old=_item(1, 1))[:-1],
        _delete(ITEMS, _item(1, 1)) + b"N",
        _insert(999, _item(1, 1)),  # a relation never described
    ],
    ids=["truncated", "trailing", "count", "binary", "mark", "update", "delete", "relation"],
)
def test_a_malformed_row_change_raises_the_strict_paths_error(
    mapping: MappingSpec, message: bytes
) -> None:
    strict, _ = _stream(mapping)
    with pytest.raises(DecodeError) as expected:
        strict.handle(parse_message(message))
    fused, sent = _stream(mapping)
    with pytest.raises(DecodeError) as got:
        fused.feed(message)
    assert str(got.value) == str(expected.value)
    assert sent == []


def test_an_undecodable_value_is_withheld_by_the_strict_path(mapping: MappingSpec) -> None:
    letters: list[Any] = []
    stream, sent = _stream(mapping, on_letter=letters.append)
    bad = _tuple(_t(b"7"), _t(b"1"), _t(b"x"), _t(b"2"), _t(b"1.00"))  # product_id 'x'
    assert read_change(_insert(ITEMS, bad), {ITEMS: _parsed(ITEMS_REL)}) is None
    stream.feed(_insert(ITEMS, bad))
    stream.feed(_insert(ITEMS, _item(7, 2)))
    stream.feed(_commit(0x100))
    assert [letter.reason for letter in letters] == ["undecodable_int8"]
    assert [k for _, _, k, _ in sent] == [b"7"]


def _parsed(message: bytes) -> Relation:
    rel = parse_message(message)
    assert isinstance(rel, Relation)
    return rel


def test_read_change_gives_the_rows_of_insert_update_and_delete() -> None:
    rels = {ITEMS: _parsed(ITEMS_REL)}
    row = {"order_id": 1, "line_no": 2, "product_id": 9001, "qty": 2}
    got = read_change(_insert(ITEMS, _item(1, 2)), rels)
    assert got is not None and got[:3] == (ITEMS, "c", None) and got[3] is not None
    assert {k: v for k, v in got[3].items() if k != "unit_price_idr"} == row
    key = _tuple(_t(b"1"), _t(b"2"), N, N, N)
    upd = read_change(_update(ITEMS, _item(1, 2), old=key), rels)
    assert upd is not None and upd[1] == "u" and upd[2] is not None
    assert upd[2]["line_no"] == 2 and upd[2]["qty"] is None
    dele = read_change(_delete(ITEMS, key), rels)
    assert dele is not None and dele[1:] == (
        "d",
        {"order_id": 1, "line_no": 2, "product_id": None, "qty": None, "unit_price_idr": None},
        None,
    )


def test_a_schema_of_another_layout_keeps_the_record_path() -> None:
    writer = codec.writer_schema(codec.truncate_schema())
    assert change_encoder(writer, writer.header, {}) is None


@pytest.mark.parametrize(
    "n",
    [0, 1, -1, 63, -64, 8191, 8192, -8193, (1 << 13) - 1, 1 << 27, -(1 << 27) - 1, 1 << 41,
     (1 << 55) - 1, 1 << 55, -(1 << 55), (1 << 63) - 1, -(1 << 63), 1_764_000_000_123_456],
)  # fmt: skip
def test_varints_by_table_are_the_loops(n: int) -> None:
    out = bytearray()
    write_long(out, n)
    z = (n << 1) ^ (n >> 63)
    expected = bytearray()
    while z >= 0x80:
        expected.append((z & 0x7F) | 0x80)
        z >>= 7
    expected.append(z)
    assert out == expected


def test_decimal_encodings_kept_by_text_still_check_each_representation() -> None:
    kept: dict[str, bytes] = {}
    first, again, other = bytearray(), bytearray(), bytearray()
    fast_avro._decimal_field(first, Decimal("800.00"), 14, 2, kept)
    fast_avro._decimal_field(again, Decimal("800.00"), 14, 2, kept)
    fast_avro._decimal_field(other, Decimal("800.0"), 14, 2, kept)  # the same value
    assert first == again == other
    assert bytes(first) == bytes([6]) + (80000).to_bytes(3, "big", signed=True)
    # Equal to a kept value, but a scale the schema does not allow: refused every time.
    with pytest.raises(ValueError, match="Scale"):
        fast_avro._decimal_field(bytearray(), Decimal("800.000"), 14, 2, kept)
    with pytest.raises(ValueError, match="precision"):
        fast_avro._decimal_field(bytearray(), Decimal("1234567890123.45"), 14, 2, kept)
    assert set(kept) == {"800.00", "800.0"}


def test_the_change_encoder_keeps_the_framing_the_factory_chose(mapping: MappingSpec) -> None:
    # A schema registry's factory: the Confluent header in place of the single-object one.
    header = codec.confluent_header(7)

    def factory(ws: codec.WriterSchema) -> Any:
        return encoder_for(dataclasses.replace(ws, header=header))

    rel = _parsed(ITEMS_REL)
    cols = [ColumnSpec(c.name, c.type_oid, c.type_modifier) for c in rel.columns]
    route = build_route(
        mapping.tables["order_items"], "shop", cols, topic="shop.payment", partitions=6,
        source=SourceInfo(version="1", name="shop", db="legacy"), encoder_factory=factory,
    )  # fmt: skip
    assert route.change is not None
    tx = TxContext(9, 0x200, 1_764_000_000_000)
    row = {"order_id": 1, "line_no": 2, "product_id": 3, "qty": 4, "unit_price_idr": None}
    fast = encode_change(route, "c", None, dict(row), tx=tx, seq=0, order=1, now_ms=5)
    plain = dataclasses.replace(route, change=None)
    slow = encode_change(plain, "c", None, dict(row), tx=tx, seq=0, order=1, now_ms=5)
    assert fast.value is not None and slow.record is not None
    assert bytes(fast.value) == route.encoder(slow.record)
    assert bytes(fast.value).startswith(header)
