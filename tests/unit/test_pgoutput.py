"""Golden-bytes tests for producers.pgoutput: hand-built protocol-version-1 messages.

Every message is assembled field by field with struct.pack, each field commented with its
protocol name, so a reader can check the bytes against PostgreSQL's "Logical Replication Message
Formats" page. All integers are big-endian. No server is involved.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from cutover.envelope import lsn_to_str
from cutover.errors import DecodeError
from cutover.values import UNCHANGED
from producers.pgoutput import (
    PG_EPOCH,
    Begin,
    BinaryValue,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    OldKind,
    Origin,
    Relation,
    Truncate,
    TypeMsg,
    Update,
    decode_tuple,
    decode_value,
    parse_message,
    pg_ts_to_datetime,
)

# Built-in type OIDs (pg_type.oid), as the Relation message carries them.
BOOL, BYTEA, NAME, INT8, INT2, INT4, TEXT, OID, JSON = 16, 17, 19, 20, 21, 23, 25, 26, 114
FLOAT4, FLOAT8, BPCHAR, VARCHAR, DATE = 700, 701, 1042, 1043, 1082
TIMESTAMP, TIMESTAMPTZ, NUMERIC, UUID, JSONB = 1114, 1184, 1700, 2950, 3802

LSN = 0x16_B374D848  # prints as 16/B374D848
END_LSN = 0x16_B374D8F0
# 2026-11-27 23:54:05.123456 UTC as microseconds since 2000-01-01 00:00 UTC.
COMMIT_US = 849_138_845_123_456
COMMIT_AT = datetime(2026, 11, 27, 23, 54, 5, 123456, tzinfo=UTC)
ORDERS_OID = 16390


# --- field builders ----------------------------------------------------------------------------


def cstr(text: str) -> bytes:
    """String: UTF-8 bytes followed by a NUL terminator."""
    return text.encode() + b"\x00"


def t(value: bytes) -> bytes:
    """TupleData column, kind 't' (text): Byte1('t'), Int32 length, the text bytes."""
    return b"t" + struct.pack(">i", len(value)) + value


def b(value: bytes) -> bytes:
    """TupleData column, kind 'b' (binary): Byte1('b'), Int32 length, the send-format bytes."""
    return b"b" + struct.pack(">i", len(value)) + value


N = b"n"  # TupleData column, kind 'n': NULL, no payload.
U = b"u"  # TupleData column, kind 'u': unchanged TOAST value, no payload.


def tuple_data(*columns: bytes) -> bytes:
    """TupleData: Int16 number of columns, then each column as built above."""
    return struct.pack(">H", len(columns)) + b"".join(columns)


def relation_msg(
    oid: int,
    namespace: str,
    name: str,
    identity: bytes,
    columns: list[tuple[int, str, int, int]],
) -> bytes:
    """Relation message; columns are (flags, name, type oid, typmod)."""
    body = (
        b"R"  # Byte1('R')
        + struct.pack(">I", oid)  # Int32 relation oid
        + cstr(namespace)  # String namespace ('' for pg_catalog)
        + cstr(name)  # String relation name
        + identity  # Int8 replica identity (relreplident)
        + struct.pack(">H", len(columns))  # Int16 number of columns
    )
    for flags, col_name, type_oid, typmod in columns:
        body += (
            struct.pack(">B", flags)  # Int8 flags (1 = part of the key)
            + cstr(col_name)  # String column name
            + struct.pack(">I", type_oid)  # Int32 type oid
            + struct.pack(">i", typmod)  # Int32 type modifier (atttypmod)
        )
    return body


ORDERS_COLUMNS = [
    (1, "id", INT8, -1),
    (0, "customer", VARCHAR, 64 + 4),  # varchar(64): typmod is length + VARHDRSZ
    (0, "total", NUMERIC, ((12 << 16) | 2) + 4),  # numeric(12,2)
    (0, "placed_at", TIMESTAMPTZ, -1),
    (0, "paid", BOOL, -1),
    (0, "ref", UUID, -1),
    (0, "meta", JSONB, -1),
]
ORDERS_RELATION = relation_msg(ORDERS_OID, "public", "orders", b"d", ORDERS_COLUMNS)
ORDERS_ROW = tuple_data(
    t(b"42"),
    t(b"Ada Lovelace"),
    t(b"12345678901.23"),
    t(b"2026-11-27 23:54:05.123456+00"),
    t(b"t"),
    t(b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    t(b'{"tags": ["x"], "weight": 1.50}'),
)
ORDERS_INSERT = b"I" + struct.pack(">I", ORDERS_OID) + b"N" + ORDERS_ROW

BEGIN = (
    b"B"  # Byte1('B')
    + struct.pack(">Q", LSN)  # Int64 final LSN of the transaction
    + struct.pack(">q", COMMIT_US)  # Int64 commit timestamp, µs since 2000-01-01
    + struct.pack(">I", 771)  # Int32 xid
)
COMMIT = (
    b"C"  # Byte1('C')
    + struct.pack(">B", 0)  # Int8 flags (unused, 0)
    + struct.pack(">Q", LSN)  # Int64 commit LSN
    + struct.pack(">Q", END_LSN)  # Int64 end LSN of the transaction
    + struct.pack(">q", COMMIT_US)  # Int64 commit timestamp
)
ORIGIN = (
    b"O"  # Byte1('O')
    + struct.pack(">Q", 0x1_00000010)  # Int64 commit LSN on the origin server
    + cstr("legacy_node")  # String origin name
)
TYPE = (
    b"Y"  # Byte1('Y')
    + struct.pack(">I", 16401)  # Int32 type oid
    + cstr("public")  # String namespace
    + cstr("order_state")  # String type name
)
TRUNCATE = (
    b"T"  # Byte1('T')
    + struct.pack(">i", 2)  # Int32 number of relations
    + struct.pack(">B", 3)  # Int8 options: 1 CASCADE | 2 RESTART IDENTITY
    + struct.pack(">II", ORDERS_OID, 16395)  # Int32 relation oid × 2
)
MESSAGE = (
    b"M"  # Byte1('M')
    + struct.pack(">B", 1)  # Int8 flags: 1 = transactional
    + struct.pack(">Q", LSN)  # Int64 LSN of the message
    + cstr("cutover")  # String prefix
    + struct.pack(">i", 5)  # Int32 content length
    + b"ab\x00cd"  # Byte_n content (may hold NULs)
)
UPDATE_KEY = (
    b"U"  # Byte1('U')
    + struct.pack(">I", ORDERS_OID)  # Int32 relation oid
    + b"K"  # Byte1('K'): old key follows
    + tuple_data(t(b"41"), N, N, N, N, N, N)  # old key: non-key columns sent as NULL
    + b"N"  # Byte1('N'): new tuple follows
    + ORDERS_ROW
)
DELETE_FULL = (
    b"D"  # Byte1('D')
    + struct.pack(">I", ORDERS_OID)  # Int32 relation oid
    + b"O"  # Byte1('O'): whole old row follows (REPLICA IDENTITY FULL)
    + ORDERS_ROW
)

ALL_GOLDEN = [
    BEGIN,
    COMMIT,
    ORIGIN,
    ORDERS_RELATION,
    TYPE,
    ORDERS_INSERT,
    UPDATE_KEY,
    DELETE_FULL,
    TRUNCATE,
    MESSAGE,
]


def orders() -> Relation:
    relation = parse_message(ORDERS_RELATION)
    assert isinstance(relation, Relation)
    return relation


# --- message framing -------------------------------------------------------------------------


def test_begin() -> None:
    msg = parse_message(BEGIN)
    assert msg == Begin(final_lsn=LSN, commit_time_us=COMMIT_US, xid=771)
    assert isinstance(msg, Begin)
    assert msg.commit_time == COMMIT_AT
    assert lsn_to_str(msg.final_lsn) == "16/B374D848"


def test_begin_literal_bytes() -> None:
    # The same Begin spelled out byte for byte, to pin the struct layout independently.
    literal = (
        b"B"
        b"\x00\x00\x00\x16\xb3\x74\xd8\x48"  # final LSN 16/B374D848
        b"\x00\x03\x04\x49\x8b\x3a\x83\x80"  # commit ts 849138845123456 µs
        b"\x00\x00\x03\x03"  # xid 771
    )
    assert literal == BEGIN
    assert parse_message(literal) == Begin(LSN, COMMIT_US, 771)


def test_commit() -> None:
    msg = parse_message(COMMIT)
    assert msg == Commit(flags=0, commit_lsn=LSN, end_lsn=END_LSN, commit_time_us=COMMIT_US)
    assert isinstance(msg, Commit)
    assert msg.commit_time == COMMIT_AT


def test_origin() -> None:
    assert parse_message(ORIGIN) == Origin(lsn=0x1_00000010, name="legacy_node")


def test_relation() -> None:
    rel = orders()
    assert rel.oid == ORDERS_OID
    assert rel.namespace == "public"
    assert rel.name == "orders"
    assert rel.qualified_name == "public.orders"
    assert rel.replica_identity == "d"
    assert rel.key_columns == ("id",)
    assert rel.columns[0] == Column("id", INT8, -1, is_key=True)
    assert rel.columns[1] == Column("customer", VARCHAR, 68, is_key=False)
    assert rel.columns[2].type_modifier == ((12 << 16) | 2) + 4
    assert [c.name for c in rel.columns] == [
        "id",
        "customer",
        "total",
        "placed_at",
        "paid",
        "ref",
        "meta",
    ]


def test_relation_empty_namespace_is_pg_catalog_and_full_identity() -> None:
    data = relation_msg(1259, "", "pg_class", b"f", [(0, "relname", NAME, -1)])
    rel = parse_message(data)
    assert isinstance(rel, Relation)
    assert rel.namespace == ""
    assert rel.qualified_name == "pg_catalog.pg_class"
    assert rel.replica_identity == "f"
    assert rel.key_columns == ()


def test_relation_with_no_columns() -> None:
    rel = parse_message(relation_msg(5, "s", "empty", b"n", []))
    assert rel == Relation(5, "s", "empty", "n", ())


def test_relation_equality_ignores_the_decode_plan_and_replace_rebuilds_it() -> None:
    rel = orders()
    assert rel == orders()
    assert hash(rel) == hash(orders())
    narrowed = dataclasses.replace(rel, columns=rel.columns[:1])
    assert decode_tuple(narrowed, (b"7",)) == {"id": 7}


def test_messages_are_frozen() -> None:
    rel = orders()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rel.name = "other"  # type: ignore[misc]


def test_type() -> None:
    assert parse_message(TYPE) == TypeMsg(oid=16401, namespace="public", name="order_state")


def test_insert_every_tuple_kind() -> None:
    data = (
        b"I"  # Byte1('I')
        + struct.pack(">I", 16400)  # Int32 relation oid
        + b"N"  # Byte1('N'): new tuple follows
        + tuple_data(N, U, t(b"hello"), b(b"\x00\x00\x00\x2a"), t(b""))
    )
    msg = parse_message(data)
    assert isinstance(msg, Insert)
    assert msg.relation_oid == 16400
    null, unchanged, text, binary, empty = msg.new
    assert null is None
    assert unchanged is UNCHANGED
    assert text == b"hello"
    assert type(text) is bytes
    assert binary == b"\x00\x00\x00\x2a"
    assert type(binary) is BinaryValue
    assert empty == b""


def test_insert_literal_bytes() -> None:
    literal = (
        b"I"
        b"\x00\x00\x40\x06"  # relation oid 16390
        b"N"
        b"\x00\x02"  # 2 columns
        b"t\x00\x00\x00\x0242"  # 't', length 2, "42"
        b"n"  # NULL
    )
    assert parse_message(literal) == Insert(ORDERS_OID, (b"42", None))


def test_insert_golden_row() -> None:
    msg = parse_message(ORDERS_INSERT)
    assert isinstance(msg, Insert)
    assert msg.relation_oid == ORDERS_OID
    assert msg.new[0] == b"42"
    assert len(msg.new) == 7


def test_update_without_old_tuple() -> None:
    data = (
        b"U"  # Byte1('U')
        + struct.pack(">I", ORDERS_OID)  # Int32 relation oid
        + b"N"  # Byte1('N'): only the new tuple (key unchanged, identity not FULL)
        + tuple_data(t(b"1"), U)
    )
    assert parse_message(data) == Update(ORDERS_OID, None, None, (b"1", UNCHANGED))


def test_update_with_old_key() -> None:
    msg = parse_message(UPDATE_KEY)
    assert isinstance(msg, Update)
    assert msg.old_kind == "K"
    assert msg.old == (b"41", None, None, None, None, None, None)
    assert msg.new[0] == b"42"


def test_update_with_old_row() -> None:
    data = (
        b"U"  # Byte1('U')
        + struct.pack(">I", 7)  # Int32 relation oid
        + b"O"  # Byte1('O'): whole old row follows
        + tuple_data(t(b"1"), t(b"old"))
        + b"N"  # Byte1('N'): new tuple follows
        + tuple_data(t(b"1"), t(b"new"))
    )
    assert parse_message(data) == Update(7, (b"1", b"old"), "O", (b"1", b"new"))


@pytest.mark.parametrize("kind", ["K", "O"])
def test_delete(kind: OldKind) -> None:
    data = (
        b"D"  # Byte1('D')
        + struct.pack(">I", 9)  # Int32 relation oid
        + kind.encode()  # Byte1('K') key only, or Byte1('O') whole old row
        + tuple_data(t(b"5"), N)
    )
    assert parse_message(data) == Delete(9, (b"5", None), kind)


def test_delete_full_golden() -> None:
    msg = parse_message(DELETE_FULL)
    assert isinstance(msg, Delete)
    assert msg.old_kind == "O"
    assert len(msg.old) == 7


@pytest.mark.parametrize(
    ("options", "cascade", "restart"),
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
)
def test_truncate_options(options: int, cascade: bool, restart: bool) -> None:
    data = (
        b"T"  # Byte1('T')
        + struct.pack(">i", 1)  # Int32 number of relations
        + struct.pack(">B", options)  # Int8 options
        + struct.pack(">I", ORDERS_OID)  # Int32 relation oid
    )
    assert parse_message(data) == Truncate((ORDERS_OID,), cascade, restart)


def test_truncate_several_relations() -> None:
    assert parse_message(TRUNCATE) == Truncate((ORDERS_OID, 16395), True, True)


def test_transactional_message() -> None:
    assert parse_message(MESSAGE) == LogicalMessage(
        transactional=True, lsn=LSN, prefix="cutover", content=b"ab\x00cd"
    )


def test_non_transactional_empty_message() -> None:
    data = (
        b"M"  # Byte1('M')
        + struct.pack(">B", 0)  # Int8 flags: 0 = not transactional
        + struct.pack(">Q", 5)  # Int64 LSN
        + cstr("")  # String prefix (empty)
        + struct.pack(">i", 0)  # Int32 content length
    )
    assert parse_message(data) == LogicalMessage(False, 5, "", b"")


def test_accepts_bytearray_and_memoryview() -> None:
    assert parse_message(bytearray(BEGIN)) == parse_message(BEGIN)
    assert parse_message(memoryview(ORDERS_INSERT)) == parse_message(ORDERS_INSERT)


# --- malformed input -------------------------------------------------------------------------


def test_empty_message() -> None:
    with pytest.raises(DecodeError, match="empty message"):
        parse_message(b"")


def test_unknown_message_type() -> None:
    with pytest.raises(DecodeError, match=r"offset 0: unknown message type 'X' \(0x58\)"):
        parse_message(b"X\x00\x00")


def test_streaming_message_type_names_the_protocol_version() -> None:
    with pytest.raises(DecodeError, match=r"Stream Start.*proto_version 2"):
        parse_message(b"S\x00\x00\x00\x01\x01")


@pytest.mark.parametrize("golden", ALL_GOLDEN, ids=lambda m: chr(m[0]))
def test_every_truncation_raises_decode_error(golden: bytes) -> None:
    # Cut each golden message at every length: never a struct.error or IndexError.
    for cut in range(1, len(golden)):
        with pytest.raises(DecodeError, match=r"pgoutput \w+ message \('.'\) at offset \d+"):
            parse_message(golden[:cut])


@pytest.mark.parametrize("golden", ALL_GOLDEN, ids=lambda m: chr(m[0]))
def test_trailing_bytes_raise_decode_error(golden: bytes) -> None:
    with pytest.raises(DecodeError, match=f"offset {len(golden)}: 1 unexpected trailing bytes"):
        parse_message(golden + b"\x00")


def test_truncated_begin_message_text() -> None:
    with pytest.raises(
        DecodeError,
        match=r"pgoutput Begin message \('B'\) at offset 1: truncated: "
        r"the message body needs 20 bytes but only 9 remain",
    ):
        parse_message(BEGIN[:10])


def test_truncated_text_value_names_column_and_offset() -> None:
    data = b"I" + struct.pack(">I", 1) + b"N" + tuple_data(t(b"12"), t(b"abcdef"))[:-2]
    # Offsets: type 0, oid 1-4, 'N' 5, ncols 6-7, col0 8-14, col1 kind 15, length 16-19, value 20.
    with pytest.raises(
        DecodeError,
        match=r"Insert message \('I'\) at offset 20: truncated: value of column 1 "
        r"needs 6 bytes but only 4 remain",
    ):
        parse_message(data)


def test_unknown_tuple_kind() -> None:
    data = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 2) + N + b"x"
    with pytest.raises(
        DecodeError, match=r"Insert message \('I'\) at offset 9: unknown tuple column kind 'x'"
    ):
        parse_message(data)


def test_negative_value_length() -> None:
    data = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">i", -1)
    with pytest.raises(DecodeError, match="offset 9: column 0 has negative length -1"):
        parse_message(data)


def test_insert_without_new_tuple_marker() -> None:
    with pytest.raises(DecodeError, match=r"offset 5: expected 'N' before the new tuple, got 'K'"):
        parse_message(b"I" + struct.pack(">I", 1) + b"K" + tuple_data())


def test_update_with_bad_submessage_byte() -> None:
    with pytest.raises(DecodeError, match=r"Update .* offset 5: expected 'K', 'O' or 'N'"):
        parse_message(b"U" + struct.pack(">I", 1) + b"Z" + tuple_data())


def test_update_old_tuple_followed_by_wrong_byte() -> None:
    data = b"U" + struct.pack(">I", 1) + b"K" + tuple_data(N) + b"K" + tuple_data(N)
    with pytest.raises(DecodeError, match=r"offset 9: expected 'K', 'O' or 'N'.*got 'K'"):
        parse_message(data)


def test_delete_needs_an_old_tuple() -> None:
    with pytest.raises(DecodeError, match=r"Delete .* expected 'K' or 'O'.*got 'N'"):
        parse_message(b"D" + struct.pack(">I", 1) + b"N" + tuple_data())


def test_relation_string_without_nul() -> None:
    with pytest.raises(DecodeError, match=r"Relation .* offset 5: truncated: namespace has no"):
        parse_message(b"R" + struct.pack(">I", 1) + b"public")


def test_relation_invalid_utf8_name() -> None:
    data = relation_msg(1, "public", "x", b"d", [])
    data = data.replace(b"x\x00", b"\xff\x00")
    with pytest.raises(DecodeError, match="relation name is not valid UTF-8"):
        parse_message(data)


def test_relation_unknown_replica_identity() -> None:
    with pytest.raises(DecodeError, match="unknown replica identity 'z'"):
        parse_message(relation_msg(1, "s", "t", b"z", []))


def test_truncate_negative_count() -> None:
    with pytest.raises(DecodeError, match="negative relation count -1"):
        parse_message(b"T" + struct.pack(">iB", -1, 0))


def test_truncate_count_larger_than_buffer() -> None:
    with pytest.raises(DecodeError, match="truncated: 1000000 relation oids needs 4000000 bytes"):
        parse_message(b"T" + struct.pack(">iBI", 1_000_000, 0, 1))


def test_message_negative_length() -> None:
    data = b"M" + struct.pack(">BQ", 0, 1) + cstr("p") + struct.pack(">i", -5)
    with pytest.raises(DecodeError, match="negative content length -5"):
        parse_message(data)


# --- text output format -> Python ----------------------------------------------------------


@pytest.mark.parametrize(
    ("type_oid", "text", "expected"),
    [
        (INT2, b"-32768", -32768),
        (INT4, b"2147483647", 2147483647),
        (INT8, b"-9223372036854775808", -9223372036854775808),
        (OID, b"4294967295", 4294967295),
        (TEXT, "café ✓".encode(), "café ✓"),
        (VARCHAR, b"", ""),
        (BPCHAR, b"ab  ", "ab  "),  # blank padding is part of the printed value
        (NAME, b"orders", "orders"),
        (BOOL, b"t", True),
        (BOOL, b"f", False),
        (FLOAT8, b"0.1", 0.1),
        (FLOAT8, b"-1.5e+300", -1.5e300),
        (FLOAT8, b"Infinity", float("inf")),
        (FLOAT4, b"-Infinity", float("-inf")),
        (FLOAT4, b"3.4028235e+38", 3.4028235e38),
        (DATE, b"2026-11-27", date(2026, 11, 27)),
        (TIMESTAMP, b"2026-11-27 23:54:05", datetime(2026, 11, 27, 23, 54, 5)),
        (TIMESTAMP, b"2026-11-27 23:54:05.5", datetime(2026, 11, 27, 23, 54, 5, 500000)),
        (
            UUID,
            b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            uuid.UUID(int=0xA0EEBC999C0B4EF8BB6D6BB9BD380A11),
        ),
        (BYTEA, b"\\xdeadbeef00", b"\xde\xad\xbe\xef\x00"),
        (BYTEA, b"\\x", b""),
        (BYTEA, b"ab\\\\c\\000\\377", b"ab\\c\x00\xff"),  # bytea_output = escape
        (
            JSONB,
            b'{"a": 1.10000000000000000001, "b": [1, 2]}',
            '{"a": 1.10000000000000000001, "b": [1, 2]}',
        ),
        (JSON, b'{"b":1,  "b":2}', '{"b":1,  "b":2}'),  # json keeps duplicates and spacing
        (999_999, b"(1,2)", "(1,2)"),  # unknown oid: the text as str
    ],
)
def test_decode_value(type_oid: int, text: bytes, expected: object) -> None:
    value = decode_value(type_oid, text)
    assert value == expected
    assert type(value) is type(expected)


def test_float_nan() -> None:
    value = decode_value(FLOAT8, b"NaN")
    assert isinstance(value, float)
    assert math.isnan(value)


@pytest.mark.parametrize(
    "text",
    [
        "12345678901.23",
        "-12345678901.23",
        "0.00",
        "-0.000000000000000000000000000001",
        "123456789012345678901234567890123456789.0123456789",
        "100000.000",  # trailing zeros are scale, and scale is kept
    ],
)
def test_numeric_is_exact(text: str) -> None:
    value = decode_value(NUMERIC, text.encode())
    assert isinstance(value, Decimal)
    # Same digits, same scale: nothing went through float.
    assert format(value, "f") == text


def test_numeric_value_and_sign() -> None:
    assert decode_value(NUMERIC, b"12345678901.23") == Decimal("12345678901.23")
    assert decode_value(NUMERIC, b"-0.5") == Decimal("-0.5")


def test_numeric_nan_and_infinity() -> None:
    nan = decode_value(NUMERIC, b"NaN")
    assert isinstance(nan, Decimal)
    assert nan.is_nan()
    assert decode_value(NUMERIC, b"Infinity") == Decimal("Infinity")
    assert decode_value(NUMERIC, b"-Infinity") == Decimal("-Infinity")


@pytest.mark.parametrize(
    ("text", "offset", "utc"),
    [
        (
            b"2026-11-27 23:54:05.123456+00",
            timedelta(0),
            datetime(2026, 11, 27, 23, 54, 5, 123456, tzinfo=UTC),
        ),
        (
            b"2026-11-28 05:24:05.5+05:30",
            timedelta(hours=5, minutes=30),
            datetime(2026, 11, 27, 23, 54, 5, 500000, tzinfo=UTC),
        ),
        (
            b"2026-11-27 20:54:05-03",
            timedelta(hours=-3),
            datetime(2026, 11, 27, 23, 54, 5, tzinfo=UTC),
        ),
        (
            b"2026-11-27 23:54:05.1+00",
            timedelta(0),
            datetime(2026, 11, 27, 23, 54, 5, 100000, tzinfo=UTC),
        ),
        # Local mean time offsets before 1900 print with seconds (Europe/Amsterdam here).
        (
            b"1850-01-01 00:19:32+00:19:32",
            timedelta(minutes=19, seconds=32),
            datetime(1850, 1, 1, tzinfo=UTC),
        ),
    ],
)
def test_timestamptz(text: bytes, offset: timedelta, utc: datetime) -> None:
    value = decode_value(TIMESTAMPTZ, text)
    assert isinstance(value, datetime)
    assert value.utcoffset() == offset
    assert value == utc
    assert value.astimezone(UTC) == utc


def test_timestamptz_keeps_the_printed_offset() -> None:
    value = decode_value(TIMESTAMPTZ, b"2026-11-28 05:24:05+05:30")
    assert value == datetime(2026, 11, 28, 5, 24, 5, tzinfo=timezone(timedelta(hours=5.5)))


@pytest.mark.parametrize("oid", [TIMESTAMPTZ, TIMESTAMP, DATE])
@pytest.mark.parametrize("text", [b"infinity", b"-infinity"])
def test_infinity_raises(oid: int, text: bytes) -> None:
    with pytest.raises(DecodeError, match="has no Python datetime equivalent"):
        decode_value(oid, text)


def test_bc_timestamp_raises() -> None:
    with pytest.raises(DecodeError, match="BC dates are outside"):
        decode_value(TIMESTAMPTZ, b"0044-03-15 12:00:00+00 BC")


def test_year_after_9999_raises() -> None:
    with pytest.raises(DecodeError, match="years after 9999"):
        decode_value(DATE, b"10000-01-01")


def test_non_iso_datestyle_raises() -> None:
    with pytest.raises(DecodeError, match=r"timestamptz \(oid 1184\).*DateStyle=ISO"):
        decode_value(TIMESTAMPTZ, b"Fri Nov 27 23:54:05.123456 2026 UTC")


def test_timestamptz_without_offset_raises() -> None:
    with pytest.raises(DecodeError, match="no UTC offset"):
        decode_value(TIMESTAMPTZ, b"2026-11-27 23:54:05")


def test_timestamp_with_offset_raises() -> None:
    with pytest.raises(DecodeError, match="carries a UTC offset"):
        decode_value(TIMESTAMP, b"2026-11-27 23:54:05+00")


@pytest.mark.parametrize(
    ("oid", "text", "problem"),
    [
        (BOOL, b"true", "expected 't' or 'f'"),
        (INT4, b"12.5", "invalid literal"),
        (NUMERIC, b"12,5", "numeric \\(oid 1700\\)"),
        (UUID, b"not-a-uuid", "uuid \\(oid 2950\\)"),
        (BYTEA, b"\\xzz", "bytea \\(oid 17\\)"),
        (BYTEA, b"a\\b", "neither hex"),
        (TEXT, b"\xff\xfe", "text \\(oid 25\\).*utf-8"),
        (FLOAT8, b"", "float8"),
    ],
)
def test_decode_value_errors(oid: int, text: bytes, problem: str) -> None:
    with pytest.raises(DecodeError, match=f"cannot decode .*{problem}"):
        decode_value(oid, text)


def test_decode_value_error_shortens_long_text() -> None:
    with pytest.raises(DecodeError, match=r"\.\.\. \(1000 bytes\)") as info:
        decode_value(INT8, b"x" * 1000)
    assert len(str(info.value)) < 300


# --- decode_tuple ----------------------------------------------------------------------------


def test_decode_tuple_end_to_end() -> None:
    rel = orders()
    insert = parse_message(ORDERS_INSERT)
    assert isinstance(insert, Insert)
    assert decode_tuple(rel, insert.new) == {
        "id": 42,
        "customer": "Ada Lovelace",
        "total": Decimal("12345678901.23"),
        "placed_at": COMMIT_AT,
        "paid": True,
        "ref": uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        "meta": '{"tags": ["x"], "weight": 1.50}',
    }


def test_decode_tuple_keeps_null_and_unchanged() -> None:
    rel = orders()
    row = decode_tuple(rel, (b"1", None, UNCHANGED, None, b"f", None, UNCHANGED))
    assert row["id"] == 1
    assert row["customer"] is None
    assert row["total"] is UNCHANGED
    assert row["meta"] is UNCHANGED
    assert row["paid"] is False


def test_decode_tuple_column_count_mismatch() -> None:
    with pytest.raises(
        DecodeError,
        match=r"relation public\.orders \(oid 16390\) has 7 columns but the tuple has 2",
    ):
        decode_tuple(orders(), (b"1", b"x"))


def test_decode_tuple_names_the_bad_column() -> None:
    raw = (b"1", b"x", b"not a number", None, None, None, None)
    with pytest.raises(
        DecodeError,
        match=r"relation public\.orders column total: cannot decode numeric \(oid 1700\) "
        r"from b'not a number'",
    ):
        decode_tuple(orders(), raw)


def test_decode_tuple_infinity_names_the_column() -> None:
    raw = (b"1", None, None, b"infinity", None, None, None)
    with pytest.raises(DecodeError, match=r"column placed_at: .*'infinity' has no Python datetime"):
        decode_tuple(orders(), raw)


def test_decode_tuple_refuses_binary_values() -> None:
    raw = (BinaryValue(b"\x00" * 8), None, None, None, None, None, None)
    with pytest.raises(DecodeError, match="column id: binary-format value"):
        decode_tuple(orders(), raw)


# --- timestamps -------------------------------------------------------------------------------


def test_pg_ts_to_datetime() -> None:
    assert pg_ts_to_datetime(0) == PG_EPOCH == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_ts_to_datetime(86_400_000_000) == datetime(2000, 1, 2, tzinfo=UTC)
    assert pg_ts_to_datetime(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert pg_ts_to_datetime(COMMIT_US) == COMMIT_AT


def test_pg_ts_to_datetime_out_of_range() -> None:
    with pytest.raises(DecodeError, match="outside datetime's range"):
        pg_ts_to_datetime((1 << 63) - 1)  # PostgreSQL's timestamp 'infinity'
