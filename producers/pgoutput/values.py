"""PostgreSQL text output format → typed Python values, keyed by type OID.

:func:`decode_value` converts one value, :func:`decode_tuple` a whole tuple of a Relation (with
the converters the Relation resolved once). Unknown OIDs decode to ``str``; the choices (json as
text, no clamping of infinite dates) are explained in the package docstring.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Final, TypeAlias

from cutover.errors import DecodeError, UncarriableValue
from cutover.values import UNCHANGED

if TYPE_CHECKING:  # messages imports this module at run time (Relation resolves converters)
    from producers.pgoutput.messages import RawTuple, RawValue, Relation

Converter: TypeAlias = Callable[[bytes], object]


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


_CONVERTERS: Final[dict[int, Converter]] = {
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


def converter(type_oid: int) -> Converter:
    """The function decoding the text output of type ``type_oid`` (``str`` for unknown OIDs)."""
    return _CONVERTERS.get(type_oid, _to_str)


# What a converter raises for bad text: ValueError (incl. UnicodeDecodeError), InvalidOperation
# (an ArithmeticError) from Decimal, OverflowError from the date/time constructors.
CONVERSION_ERRORS: Final = (ValueError, ArithmeticError, TypeError)


def _describe(type_oid: int, text: bytes, exc: Exception) -> str:
    shown = repr(text) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} bytes)"
    type_name = _TYPE_NAMES.get(type_oid, "type")
    problem = str(exc)
    if len(problem) > 160:  # int() and friends echo the whole input
        problem = problem[:160] + "..."
    return f"cannot decode {type_name} (oid {type_oid}) from {shown}: {problem}"


_DATETIME_OIDS: Final = frozenset({1082, 1114, 1184})


def reason_of(type_oid: int, text: bytes) -> str:
    """The value-free reason a value of ``type_oid`` did not decode (a fixed vocabulary)."""
    if type_oid in _DATETIME_OIDS:
        if text in (b"infinity", b"-infinity"):
            return "infinite_timestamp"
        return "timestamp_out_of_range"
    return "undecodable_" + _TYPE_NAMES.get(type_oid, "value").strip('"')


def decode_value(type_oid: int, text: bytes) -> object:
    """Convert one value from PostgreSQL's text output format to a Python value.

    ``int8/int4/int2/oid`` → ``int``; ``text/varchar/bpchar/name/"char"`` → ``str``;
    ``numeric`` → exact :class:`~decimal.Decimal` (``NaN``, ``±Infinity`` included);
    ``timestamptz`` → aware ``datetime``; ``timestamp`` → naive ``datetime``; ``date`` → ``date``;
    ``bool`` → ``bool``; ``json/jsonb`` → ``str`` (the exact text); ``uuid`` → :class:`uuid.UUID`;
    ``bytea`` → ``bytes``; ``float4/float8`` → ``float``; any other OID → ``str``.
    Raises :class:`UncarriableValue` (a :class:`DecodeError`) for text the type cannot hold,
    including ``infinity`` dates: one row's problem, not the stream's.
    """
    try:
        return converter(type_oid)(text)
    except CONVERSION_ERRORS as exc:
        raise UncarriableValue(
            _describe(type_oid, text, exc),
            table="",
            column=None,
            reason=reason_of(type_oid, text),
        ) from exc


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
    except CONVERSION_ERRORS as exc:
        type_oid = next(c.type_oid for c in relation.columns if c.name == name)
        text = value if isinstance(value, bytes) else b""
        raise UncarriableValue(
            f"relation {relation.qualified_name} column {name}: {_describe(type_oid, text, exc)}",
            table=relation.qualified_name,
            column=name,
            reason=reason_of(type_oid, text),
            row=_decodable_part(plan, raw),
        ) from exc
    return out


def _decodable_part(plan: tuple[tuple[str, Converter], ...], raw: RawTuple) -> dict[str, object]:
    """What decodes of a tuple that did not (None for the rest): enough to name its key."""
    out: dict[str, object] = {}
    for (name, convert), value in zip(plan, raw, strict=True):
        out[name] = None
        if type(value) is bytes:
            with contextlib.suppress(*CONVERSION_ERRORS):
                out[name] = convert(value)
    return out
