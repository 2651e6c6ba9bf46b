"""The fused fast path for row changes: a TupleData's bytes straight to the decoded row.

:func:`~producers.pgoutput.parse_message` then :func:`~producers.pgoutput.decode_tuple` build a
message dataclass and a tuple of raw values only for the next step to take them apart again;
for an Insert, Update or Delete that is most of the parsing cost of a change event.
:func:`read_row` reads the column values and converts them in one pass. It is deliberately
*partial*: on anything unusual (a truncated or malformed tuple, a binary-format value, a
column count that does not match the Relation, a value that does not decode) it returns None
and the caller takes the strict path, which raises the exact error (or withholds the row) as
before. So it never decides anything the strict path would decide differently.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

from cutover.values import UNCHANGED
from producers.pgoutput.messages import Relation
from producers.pgoutput.values import CONVERSION_ERRORS

_INSERT, _UPDATE, _DELETE = 0x49, 0x55, 0x44
#: The message kinds :func:`read_change` reads.
ROW_KINDS: Final = frozenset({_INSERT, _UPDATE, _DELETE})
_NEW: Final = 0x4E  # 'N'
_OLD_MARKS: Final = frozenset({0x4B, 0x4F})  # 'K', 'O'
_oid_mark_from: Final = struct.Struct(">IB").unpack_from
_u16_from: Final = struct.Struct(">H").unpack_from
_i32_from: Final = struct.Struct(">i").unpack_from
_TEXT: Final = 0x74  # 't'
_NULL: Final = 0x6E  # 'n'
_UNCHANGED: Final = 0x75  # 'u'
_FAILED: Final = (IndexError, struct.error, *CONVERSION_ERRORS)


def read_row(relation: Relation, data: bytes, pos: int) -> tuple[dict[str, object], int] | None:
    """The decoded row of the TupleData at ``pos`` and the offset after it; None when the
    strict path must handle it (see the module docstring)."""
    plan = relation._plan
    try:
        if _u16_from(data, pos)[0] != len(plan):
            return None
        pos += 2
        size = len(data)
        out: dict[str, object] = {}
        for name, convert in plan:
            kind = data[pos]
            if kind == _TEXT:
                length = _i32_from(data, pos + 1)[0]
                start = pos + 5
                pos = start + length
                if length < 0 or pos > size:
                    return None
                out[name] = convert(data[start:pos])
            elif kind == _NULL:
                out[name] = None
                pos += 1
            elif kind == _UNCHANGED:
                out[name] = UNCHANGED
                pos += 1
            else:
                return None
    except _FAILED:
        return None
    return out, pos


Row = dict[str, object]


def read_change(
    data: bytes, relations: Mapping[int, Relation]
) -> tuple[int, str, Row | None, Row | None] | None:
    """(relation oid, op, old row, new row) of an Insert, Update or Delete message of a relation
    in ``relations``; None when the strict path must handle it (see the module docstring)."""
    size = len(data)
    if size < 6:
        return None
    oid, mark = _oid_mark_from(data, 1)
    rel = relations.get(oid)
    if rel is None:
        return None
    kind = data[0]
    old: Row | None = None
    pos = 6
    if mark != _NEW:
        if kind == _INSERT or mark not in _OLD_MARKS:
            return None
        got = read_row(rel, data, pos)
        if got is None:
            return None
        old, pos = got
        if kind == _DELETE:
            return (oid, "d", old, None) if pos == size else None
        if pos >= size or data[pos] != _NEW:
            return None
        pos += 1
    elif kind == _DELETE:
        return None
    got = read_row(rel, data, pos)
    if got is None or got[1] != size:
        return None
    return oid, "c" if kind == _INSERT else "u", old, got[0]
