"""pgoutput protocol framing: one message's bytes → a message dataclass (:func:`parse_message`).

Column values stay raw here; every message must be consumed exactly (see the package docstring).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from cutover.errors import DecodeError
from cutover.values import UNCHANGED
from producers.pgoutput.messages import (
    Begin,
    BinaryValue,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    OldKind,
    Origin,
    RawTuple,
    RawValue,
    Relation,
    Truncate,
    TypeMsg,
    Update,
)

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
