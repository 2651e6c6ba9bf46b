"""Pure parser for the pgoutput logical replication protocol, version 1.

The CDC producer reads changes with::

    pg_logical_slot_peek_binary_changes(slot, NULL, n,
        'proto_version', '1', 'publication_names', 'pub', 'messages', 'true')

Each row's ``data`` is one pgoutput message whose first byte names its type. This module turns
those bytes into frozen dataclasses and does no I/O, so it can be tested with hand-built bytes
and reused by anything that holds the messages (SQL interface or a walsender stream).

Two layers, deliberately separate:

1. :func:`parse_message` — protocol framing only. Column values stay *raw*: ``None`` for SQL
   NULL (kind ``n``), :data:`~cutover.values.UNCHANGED` for an unchanged TOAST value (kind
   ``u``, which is not NULL: the applier must keep what it has), or ``bytes`` holding the
   still-encoded text output of the column's type (kind ``t``). A binary-format value (kind
   ``b``, only sent when the ``binary`` option is on) is kept as a :class:`BinaryValue`, a
   ``bytes`` subclass, so nobody can mistake it for text.
2. :func:`decode_tuple` / :func:`decode_value` — PostgreSQL *text* output format to typed Python
   values, keyed by type OID. Unknown OIDs decode to ``str``.

Assumptions about the decoding session (the one that calls the SQL function, because the type
output functions run with its settings):

* ``DateStyle`` is ``ISO`` (the default). Other styles make date/time columns fail loudly.
* ``bytea_output`` is ``hex`` (the default); ``escape`` is accepted too.
* ``extra_float_digits`` is at its default (1): since PostgreSQL 12 floats are then printed in
  the shortest form that round-trips exactly.
* The database encoding is UTF-8; names and text values are decoded as UTF-8.

Choices that are not forced by the protocol:

* ``timestamp``/``timestamptz``/``date`` values ``infinity`` and ``-infinity``, BC dates and years
  after 9999 have no :mod:`datetime` equivalent. They raise :class:`DecodeError` rather than being
  clamped to ``datetime.max``/``min``, which would silently change the value and compare equal to
  a real timestamp. The caller treats the row as a poison message.
* ``json``/``jsonb`` decode to their text (``str``), not to parsed objects: ``json.loads`` turns
  numbers into floats (losing digits), drops duplicate keys and would not round-trip to the exact
  text the source holds. Whoever needs the structure parses the string.
* :func:`decode_tuple` refuses binary-format values: their bytes are the type's ``send`` format,
  and running a text converter over them would produce garbage without an error.

Strictness: every message must be consumed exactly; trailing bytes are an error. That is what
catches a peer that speaks another protocol version (e.g. streamed transactions carry an extra
xid) instead of mis-reading it.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Final, Literal, TypeAlias

from cutover.errors import DecodeError
from cutover.values import UNCHANGED, Unchanged

__all__ = [
    "PG_EPOCH",
    "Begin",
    "BinaryValue",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "OldKind",
    "Origin",
    "RawTuple",
    "RawValue",
    "Relation",
    "Truncate",
    "TypeMsg",
    "Update",
    "decode_tuple",
    "decode_value",
    "lsn_to_str",
    "parse_message",
    "pg_ts_to_datetime",
    "str_to_lsn",
]


class BinaryValue(bytes):
    """A column value sent in binary (``send``) format, tuple kind ``b``; kept as raw bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"BinaryValue({bytes(self)!r})"


RawValue: TypeAlias = bytes | Unchanged | None
"""One column as sent: text-format ``bytes`` (or a :class:`BinaryValue`), UNCHANGED or NULL."""

RawTuple: TypeAlias = tuple[RawValue, ...]

OldKind: TypeAlias = Literal["K", "O"]
"""``K``: the old tuple holds the replica-identity key columns only (the others are NULL).
``O``: the old tuple is the whole old row (``REPLICA IDENTITY FULL``)."""

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""The PostgreSQL epoch: protocol timestamps count microseconds from here."""


def pg_ts_to_datetime(microseconds: int) -> datetime:
    """Convert a protocol timestamp (microseconds since 2000-01-01 UTC) to an aware datetime."""
    try:
        return PG_EPOCH + timedelta(microseconds=microseconds)
    except OverflowError:
        raise DecodeError(
            f"PostgreSQL timestamp {microseconds} µs since 2000-01-01 is outside datetime's range"
        ) from None


_LSN_PART = re.compile(r"[0-9A-Fa-f]{1,8}")
_U64_MAX: Final = (1 << 64) - 1


def lsn_to_str(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints ``pg_lsn``: ``'16/B374D848'`` (upper-case hex)."""
    if not 0 <= lsn <= _U64_MAX:
        raise DecodeError(f"LSN {lsn} is outside the unsigned 64-bit range")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    """Parse PostgreSQL's ``pg_lsn`` text form (``'16/B374D848'``, any hex case) to an int."""
    high, sep, low = text.partition("/")
    if not sep or not _LSN_PART.fullmatch(high) or not _LSN_PART.fullmatch(low):
        raise DecodeError(f"{text!r} is not an LSN; expected two hex numbers like '16/B374D848'")
    return (int(high, 16) << 32) | int(low, 16)


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    """``B``: start of a transaction; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_time_us: int
    xid: int

    @property
    def commit_time(self) -> datetime:
        """The commit timestamp as an aware UTC datetime."""
        return pg_ts_to_datetime(self.commit_time_us)


@dataclass(frozen=True, slots=True)
class Commit:
    """``C``: end of a transaction. ``end_lsn`` is where the next transaction's changes start."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int

    @property
    def commit_time(self) -> datetime:
        """The commit timestamp as an aware UTC datetime."""
        return pg_ts_to_datetime(self.commit_time_us)


@dataclass(frozen=True, slots=True)
class Origin:
    """``O``: the transaction was replicated in from origin ``name`` at ``lsn`` there."""

    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a :class:`Relation`, in tuple order."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


_Converter: TypeAlias = Callable[[bytes], object]


@dataclass(frozen=True, slots=True)
class Relation:
    """``R``: describes a table; sent before the first change to it and after each DDL change.

    ``namespace`` is ``''`` for ``pg_catalog`` (as the protocol sends it). ``replica_identity`` is
    ``relreplident``: ``d`` default (primary key), ``n`` nothing, ``f`` full, ``i`` index.
    """

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    # Resolved once here because decode_tuple runs for every change: (name, converter).
    _plan: tuple[tuple[str, _Converter], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        plan = tuple((c.name, _CONVERTERS.get(c.type_oid, _to_str)) for c in self.columns)
        object.__setattr__(self, "_plan", plan)

    @property
    def qualified_name(self) -> str:
        """``schema.table`` (``pg_catalog.table`` when the protocol sent an empty namespace)."""
        return f"{self.namespace or 'pg_catalog'}.{self.name}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Names of the replica-identity key columns, in column order."""
        return tuple(c.name for c in self.columns if c.is_key)


@dataclass(frozen=True, slots=True)
class TypeMsg:
    """``Y``: names a non-built-in type used by a following Relation message."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``I``: a new row."""

    relation_oid: int
    new: RawTuple


@dataclass(frozen=True, slots=True)
class Update:
    """``U``: a changed row. ``old``/``old_kind`` are ``None`` when no old tuple was sent (the key
    did not change and replica identity is not FULL)."""

    relation_oid: int
    old: RawTuple | None
    old_kind: OldKind | None
    new: RawTuple


@dataclass(frozen=True, slots=True)
class Delete:
    """``D``: a removed row, identified by ``old`` (key columns for ``K``, whole row for ``O``)."""

    relation_oid: int
    old: RawTuple
    old_kind: OldKind


@dataclass(frozen=True, slots=True)
class Truncate:
    """``T``: one TRUNCATE statement over ``relation_oids``."""

    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """``M``: a ``pg_logical_emit_message`` record (needs the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMsg
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------

_NAMES: Final = {
    0x42: "Begin",
    0x43: "Commit",
    0x4F: "Origin",
    0x52: "Relation",
    0x59: "Type",
    0x49: "Insert",
    0x55: "Update",
    0x44: "Delete",
    0x54: "Truncate",
    0x4D: "Message",
}
# Sent only with proto_version >= 2 and streaming on; named so the error says what happened.
_STREAMING: Final = {
    0x53: "Stream Start",
    0x45: "Stream Stop",
    0x63: "Stream Commit",
    0x41: "Stream Abort",
}

_BEGIN: Final = struct.Struct(">QqI")  # final_lsn, commit ts, xid
_COMMIT: Final = struct.Struct(">BQQq")  # flags, commit_lsn, end_lsn, commit ts
_OID_MARK: Final = struct.Struct(">IB")  # relation oid, following submessage byte
_U16: Final = struct.Struct(">H")
_I32: Final = struct.Struct(">i")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_COLUMN_TAIL: Final = struct.Struct(">Ii")  # type oid, typmod (after flags and name)

# Bound once: attribute lookups on the Struct would otherwise run per column.
_i32_from: Final = _I32.unpack_from
_u16_from: Final = _U16.unpack_from
_oid_mark_from: Final = _OID_MARK.unpack_from

_N: Final = 0x4E  # 'N' new tuple
_OLD_KINDS: Final[dict[int, OldKind]] = {0x4B: "K", 0x4F: "O"}
_KIND_TEXT: Final = 0x74  # 't'
_KIND_NULL: Final = 0x6E  # 'n'
_KIND_UNCHANGED: Final = 0x75  # 'u'
_KIND_BINARY: Final = 0x62  # 'b'


def _error(type_byte: int, offset: int, problem: str) -> DecodeError:
    name = _NAMES.get(type_byte, "unknown")
    return DecodeError(
        f"pgoutput {name} message ({chr(type_byte)!r}) at offset {offset}: {problem}"
    )


def _truncated(type_byte: int, offset: int, what: str, need: int, size: int) -> DecodeError:
    have = max(size - offset, 0)
    return _error(type_byte, offset, f"truncated: {what} needs {need} bytes but only {have} remain")


def _trailing(type_byte: int, pos: int, size: int) -> DecodeError:
    return _error(
        type_byte,
        pos,
        f"{size - pos} unexpected trailing bytes (is the slot read with proto_version 1?)",
    )


def _check_end(type_byte: int, pos: int, size: int) -> None:
    if pos != size:
        raise _trailing(type_byte, pos, size)


def _bad_length(type_byte: int, start: int, index: int, length: int, size: int) -> DecodeError:
    if length < 0:
        return _error(type_byte, start - 4, f"column {index} has negative length {length}")
    return _truncated(type_byte, start, f"value of column {index}", length, size)


def _read_tuple(data: bytes, pos: int, type_byte: int) -> tuple[RawTuple, int]:
    """Read one TupleData at ``pos``; return it and the offset just after it."""
    size = len(data)
    if pos + 2 > size:
        raise _truncated(type_byte, pos, "TupleData column count", 2, size)
    ncols = _u16_from(data, pos)[0]
    pos += 2
    values: list[RawValue] = []
    append = values.append
    for index in range(ncols):
        if pos >= size:
            raise _error(
                type_byte, pos, f"truncated: column {index} of {ncols} is missing its kind byte"
            )
        kind = data[pos]
        pos += 1
        if kind == _KIND_TEXT:
            # Inlined rather than shared with 'b': this branch runs for nearly every column.
            if pos + 4 > size:
                raise _truncated(type_byte, pos, f"length of column {index}", 4, size)
            length = _i32_from(data, pos)[0]
            start = pos + 4
            pos = start + length
            if length < 0 or pos > size:
                raise _bad_length(type_byte, start, index, length, size)
            append(data[start:pos])
        elif kind == _KIND_NULL:
            append(None)
        elif kind == _KIND_UNCHANGED:
            append(UNCHANGED)
        elif kind == _KIND_BINARY:
            if pos + 4 > size:
                raise _truncated(type_byte, pos, f"length of column {index}", 4, size)
            length = _i32_from(data, pos)[0]
            start = pos + 4
            pos = start + length
            if length < 0 or pos > size:
                raise _bad_length(type_byte, start, index, length, size)
            append(BinaryValue(data[start:pos]))
        else:
            raise _error(
                type_byte,
                pos - 1,
                f"unknown tuple column kind {chr(kind)!r} (0x{kind:02x}) for column {index}; "
                "expected 'n', 'u', 't' or 'b'",
            )
    return tuple(values), pos


def _parse_begin(data: bytes) -> Begin:
    if len(data) != 1 + _BEGIN.size:
        raise _size_error(data, 1 + _BEGIN.size)
    final_lsn, ts, xid = _BEGIN.unpack_from(data, 1)
    return Begin(final_lsn, ts, xid)


def _parse_commit(data: bytes) -> Commit:
    if len(data) != 1 + _COMMIT.size:
        raise _size_error(data, 1 + _COMMIT.size)
    flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, 1)
    return Commit(flags, commit_lsn, end_lsn, ts)


def _size_error(data: bytes, expected: int) -> DecodeError:
    """The error for a fixed-size message whose length is not ``expected``."""
    size = len(data)
    if size < expected:
        return _truncated(data[0], 1, "the message body", expected - 1, size)
    return _trailing(data[0], expected, size)


def _parse_insert(data: bytes) -> Insert:
    size = len(data)
    if size < 6:
        raise _truncated(data[0], 1, "relation oid and 'N'", 5, size)
    oid, mark = _oid_mark_from(data, 1)
    if mark != _N:
        raise _error(data[0], 5, f"expected 'N' before the new tuple, got {chr(mark)!r}")
    new, pos = _read_tuple(data, 6, data[0])
    _check_end(data[0], pos, size)
    return Insert(oid, new)


def _parse_update(data: bytes) -> Update:
    size = len(data)
    if size < 6:
        raise _truncated(data[0], 1, "relation oid and submessage byte", 5, size)
    oid, mark = _oid_mark_from(data, 1)
    pos = 6
    old: RawTuple | None = None
    old_kind = _OLD_KINDS.get(mark)
    if old_kind is not None:
        old, pos = _read_tuple(data, pos, data[0])
        if pos >= size:
            raise _truncated(data[0], pos, "'N' before the new tuple", 1, size)
        mark = data[pos]
        pos += 1
    if mark != _N:
        raise _error(
            data[0], pos - 1, f"expected 'K', 'O' or 'N' before a tuple, got {chr(mark)!r}"
        )
    new, pos = _read_tuple(data, pos, data[0])
    _check_end(data[0], pos, size)
    return Update(oid, old, old_kind, new)


def _parse_delete(data: bytes) -> Delete:
    size = len(data)
    if size < 6:
        raise _truncated(data[0], 1, "relation oid and 'K'/'O'", 5, size)
    oid, mark = _oid_mark_from(data, 1)
    old_kind = _OLD_KINDS.get(mark)
    if old_kind is None:
        raise _error(data[0], 5, f"expected 'K' or 'O' before the old tuple, got {chr(mark)!r}")
    old, pos = _read_tuple(data, 6, data[0])
    _check_end(data[0], pos, size)
    return Delete(oid, old, old_kind)


class _Reader:
    """Sequential reader for the less frequent, variable-layout messages."""

    __slots__ = ("data", "pos", "type_byte")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 1
        self.type_byte = data[0]

    def take(self, size: int, what: str) -> int:
        start = self.pos
        if start + size > len(self.data):
            raise _truncated(self.type_byte, start, what, size, len(self.data))
        self.pos = start + size
        return start

    def u8(self, what: str) -> int:
        return self.data[self.take(1, what)]

    def u16(self, what: str) -> int:
        value: int = _U16.unpack_from(self.data, self.take(2, what))[0]
        return value

    def i32(self, what: str) -> int:
        value: int = _I32.unpack_from(self.data, self.take(4, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self.data, self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = _U64.unpack_from(self.data, self.take(8, what))[0]
        return value

    def raw(self, size: int, what: str) -> bytes:
        start = self.take(size, what)
        return self.data[start : start + size]

    def string(self, what: str) -> str:
        start = self.pos
        end = self.data.find(0, start)
        if end < 0:
            raise _error(self.type_byte, start, f"truncated: {what} has no terminating NUL")
        self.pos = end + 1
        try:
            return self.data[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _error(self.type_byte, start, f"{what} is not valid UTF-8: {exc}") from None

    def finish(self) -> None:
        _check_end(self.type_byte, self.pos, len(self.data))


_REPLICA_IDENTITIES: Final = frozenset("dnfi")


def _parse_relation(data: bytes) -> Relation:
    r = _Reader(data)
    oid = r.u32("relation oid")
    namespace = r.string("namespace")
    name = r.string("relation name")
    ident_at = r.pos
    identity = chr(r.u8("replica identity"))
    if identity not in _REPLICA_IDENTITIES:
        raise _error(
            data[0], ident_at, f"unknown replica identity {identity!r}; expected d, n, f or i"
        )
    ncols = r.u16("column count")
    columns = []
    for index in range(ncols):
        flags = r.u8(f"flags of column {index}")
        col_name = r.string(f"name of column {index}")
        start = r.take(_COLUMN_TAIL.size, f"type oid and typmod of column {col_name!r}")
        type_oid, typmod = _COLUMN_TAIL.unpack_from(data, start)
        columns.append(Column(col_name, type_oid, typmod, bool(flags & 1)))
    r.finish()
    return Relation(oid, namespace, name, identity, tuple(columns))


def _parse_type(data: bytes) -> TypeMsg:
    r = _Reader(data)
    oid = r.u32("type oid")
    namespace = r.string("namespace")
    name = r.string("type name")
    r.finish()
    return TypeMsg(oid, namespace, name)


def _parse_truncate(data: bytes) -> Truncate:
    r = _Reader(data)
    nrels = r.i32("relation count")
    if nrels < 0:
        raise _error(data[0], 1, f"negative relation count {nrels}")
    options = r.u8("options")
    start = r.take(4 * nrels, f"{nrels} relation oids")
    oids = struct.unpack_from(f">{nrels}I", data, start)
    r.finish()
    return Truncate(oids, bool(options & 1), bool(options & 2))


def _parse_logical_message(data: bytes) -> LogicalMessage:
    r = _Reader(data)
    flags = r.u8("flags")
    lsn = r.u64("lsn")
    prefix = r.string("prefix")
    length = r.i32("content length")
    if length < 0:
        raise _error(data[0], r.pos - 4, f"negative content length {length}")
    content = r.raw(length, "content")
    r.finish()
    return LogicalMessage(bool(flags & 1), lsn, prefix, content)


def _parse_origin(data: bytes) -> Origin:
    r = _Reader(data)
    lsn = r.u64("origin lsn")
    name = r.string("origin name")
    r.finish()
    return Origin(lsn, name)


_PARSERS: Final[dict[int, Callable[[bytes], Message]]] = {
    0x42: _parse_begin,
    0x43: _parse_commit,
    0x4F: _parse_origin,
    0x52: _parse_relation,
    0x59: _parse_type,
    0x49: _parse_insert,
    0x55: _parse_update,
    0x44: _parse_delete,
    0x54: _parse_truncate,
    0x4D: _parse_logical_message,
}


def parse_message(data: bytes | bytearray | memoryview) -> Message:
    """Parse one pgoutput (protocol version 1) message.

    Raises :class:`DecodeError` naming the message type, the offset and the problem when the
    bytes are truncated, carry trailing bytes, or use an unknown type or tuple kind.
    """
    buf = data if type(data) is bytes else bytes(data)
    if not buf:
        raise DecodeError("pgoutput message at offset 0: empty message, expected a type byte")
    parser = _PARSERS.get(buf[0])
    if parser is None:
        raise _unknown_type(buf[0])
    return parser(buf)


def _unknown_type(type_byte: int) -> DecodeError:
    shown = f"{chr(type_byte)!r} (0x{type_byte:02x})"
    streaming = _STREAMING.get(type_byte, "")
    hint = (
        f"; that is a {streaming} message, which needs proto_version 2 and streaming, "
        "neither of which this parser speaks"
        if streaming
        else ""
    )
    return DecodeError(f"pgoutput message at offset 0: unknown message type {shown}{hint}")


# ---------------------------------------------------------------------------------------------
# Text output format -> Python values
# ---------------------------------------------------------------------------------------------


def _to_str(text: bytes) -> str:
    return text.decode("utf-8")


def _to_bool(text: bytes) -> bool:
    if text == b"t":
        return True
    if text == b"f":
        return False
    raise ValueError("expected 't' or 'f'")


def _to_decimal(text: bytes) -> Decimal:
    # Decimal(str) is exact whatever the context precision; NaN and ±Infinity come through too.
    return Decimal(text.decode("ascii"))


def _timestamp_problem(text: bytes) -> str:
    if text in (b"infinity", b"-infinity"):
        return f"PostgreSQL {text.decode()!r} has no Python datetime equivalent"
    if text.endswith(b" BC"):
        return "BC dates are outside Python's datetime range"
    return (
        "not an ISO 8601 date/time; the decoding session must use DateStyle=ISO "
        "(years after 9999 are also out of range)"
    )


def _to_timestamptz(text: bytes) -> datetime:
    try:
        value = datetime.fromisoformat(text.decode("ascii"))
    except ValueError:
        raise ValueError(_timestamp_problem(text)) from None
    if value.tzinfo is None:
        raise ValueError("timestamptz value has no UTC offset")
    return value


def _to_timestamp(text: bytes) -> datetime:
    try:
        value = datetime.fromisoformat(text.decode("ascii"))
    except ValueError:
        raise ValueError(_timestamp_problem(text)) from None
    if value.tzinfo is not None:
        raise ValueError("timestamp without time zone value carries a UTC offset")
    return value


def _to_date(text: bytes) -> date:
    try:
        return date.fromisoformat(text.decode("ascii"))
    except ValueError:
        raise ValueError(_timestamp_problem(text)) from None


def _to_uuid(text: bytes) -> uuid.UUID:
    return uuid.UUID(text.decode("ascii"))


# bytea "escape" output: printable bytes as themselves, backslash doubled, the rest as \ooo.
_BYTEA_ESCAPED: Final = re.compile(rb"(?:[^\\]|\\\\|\\[0-3][0-7]{2})*", re.DOTALL)
_BYTEA_ESCAPE: Final = re.compile(rb"\\(\\|[0-3][0-7]{2})")


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    return b"\\" if code == b"\\" else bytes((int(code, 8),))


def _to_bytea(text: bytes) -> bytes:
    if text.startswith(b"\\x"):
        return bytes.fromhex(text[2:].decode("ascii"))
    if _BYTEA_ESCAPED.fullmatch(text) is None:
        raise ValueError("neither hex (\\x...) nor escape bytea format")
    return _BYTEA_ESCAPE.sub(_unescape, text)


def _to_float(text: bytes) -> float:
    # float() takes bytes and PostgreSQL's NaN / Infinity / -Infinity spellings as they are.
    return float(text)


def _to_int(text: bytes) -> int:
    return int(text)


_CONVERTERS: Final[dict[int, _Converter]] = {
    16: _to_bool,  # bool
    17: _to_bytea,  # bytea
    18: _to_str,  # "char"
    19: _to_str,  # name
    20: _to_int,  # int8
    21: _to_int,  # int2
    23: _to_int,  # int4
    25: _to_str,  # text
    26: _to_int,  # oid
    114: _to_str,  # json: kept as text, see the module docstring
    700: _to_float,  # float4
    701: _to_float,  # float8
    1042: _to_str,  # bpchar: blank padding kept, as PostgreSQL prints it
    1043: _to_str,  # varchar
    1082: _to_date,  # date
    1114: _to_timestamp,  # timestamp
    1184: _to_timestamptz,  # timestamptz
    1700: _to_decimal,  # numeric
    2950: _to_uuid,  # uuid
    3802: _to_str,  # jsonb: kept as text, see the module docstring
}

_TYPE_NAMES: Final = {
    16: "bool",
    17: "bytea",
    18: '"char"',
    19: "name",
    20: "int8",
    21: "int2",
    23: "int4",
    25: "text",
    26: "oid",
    114: "json",
    700: "float4",
    701: "float8",
    1042: "bpchar",
    1043: "varchar",
    1082: "date",
    1114: "timestamp",
    1184: "timestamptz",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
}

# What a converter raises for bad text: ValueError (incl. UnicodeDecodeError), InvalidOperation
# (an ArithmeticError) from Decimal, OverflowError from the date/time constructors.
_CONVERSION_ERRORS: Final = (ValueError, ArithmeticError, TypeError)


def _describe(type_oid: int, text: bytes, exc: Exception) -> str:
    shown = repr(text) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} bytes)"
    type_name = _TYPE_NAMES.get(type_oid, "type")
    problem = str(exc)
    if len(problem) > 160:  # int() and friends echo the whole input
        problem = problem[:160] + "..."
    return f"cannot decode {type_name} (oid {type_oid}) from {shown}: {problem}"


def decode_value(type_oid: int, text: bytes) -> object:
    """Convert one value from PostgreSQL's text output format to a Python value.

    ``int8/int4/int2/oid`` → ``int``; ``text/varchar/bpchar/name/"char"`` → ``str``;
    ``numeric`` → exact :class:`~decimal.Decimal` (``NaN``, ``±Infinity`` included);
    ``timestamptz`` → aware ``datetime``; ``timestamp`` → naive ``datetime``; ``date`` → ``date``;
    ``bool`` → ``bool``; ``json/jsonb`` → ``str`` (the exact text); ``uuid`` → :class:`uuid.UUID`;
    ``bytea`` → ``bytes``; ``float4/float8`` → ``float``; any other OID → ``str``.
    Raises :class:`DecodeError` for text the type cannot hold, including ``infinity`` dates.
    """
    try:
        return _CONVERTERS.get(type_oid, _to_str)(text)
    except _CONVERSION_ERRORS as exc:
        raise DecodeError(_describe(type_oid, text, exc)) from exc


def decode_tuple(relation: Relation, raw: RawTuple) -> dict[str, object]:
    """Map column name → typed value for one tuple of ``relation``.

    ``None`` (NULL) and ``UNCHANGED`` (unchanged TOAST) pass through as they are. Raises
    :class:`DecodeError` naming the relation when the column count differs (a Relation message
    was missed), when a value does not decode, or for a binary-format value.
    """
    plan = relation._plan
    if len(raw) != len(plan):
        raise DecodeError(
            f"relation {relation.qualified_name} (oid {relation.oid}) has {len(plan)} columns "
            f"but the tuple has {len(raw)}; a Relation message was missed or is stale"
        )
    out: dict[str, object] = {}
    # Pre-bound so the except clause can name the failing column: loop variables outlive the loop.
    name = ""
    value: RawValue = None
    try:
        for (name, convert), value in zip(plan, raw, strict=True):
            if type(value) is bytes:
                out[name] = convert(value)
            elif value is None or value is UNCHANGED:
                out[name] = value
            else:
                raise DecodeError(
                    f"relation {relation.qualified_name} column {name}: binary-format value; "
                    "this decoder reads the text format, do not set the pgoutput 'binary' option"
                )
    except _CONVERSION_ERRORS as exc:
        type_oid = next(c.type_oid for c in relation.columns if c.name == name)
        text = value if isinstance(value, bytes) else b""
        raise DecodeError(
            f"relation {relation.qualified_name} column {name}: {_describe(type_oid, text, exc)}"
        ) from exc
    return out
