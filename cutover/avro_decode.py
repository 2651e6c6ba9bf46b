"""Avro binary decoding on the hot path, compiled per writer schema.

fastavro's ``schemaless_reader`` walks the schema for every message and reads each byte through a
file object: ~28 µs of CPU per shop change event, the largest single cost of an applier.
:func:`decoder_for` instead generates, once per writer schema, one flat Python function that reads
the fields in schema order straight from the message ``bytes`` (an integer cursor, varints of one
byte inline): no schema walk, no per-field dispatch, no file object.

The result equals fastavro's (a randomized unit test compares them): the same dict shapes and
key order, and the same logical-type conversions; the rare ones (uuid, time-*, *-millis) call
fastavro's own converters, the common ones (timestamp-micros, decimal, date) are inlined
with fastavro's exact arithmetic. Damaged data raises (IndexError, ValueError, struct.error,
UnicodeDecodeError, :class:`Corrupt`): ``SchemaStore.decode`` turns any of them into a
DecodeError. Where fastavro would silently read a short string or a negative length, this reader
raises: the message is corrupt either way.

Schemas using anything else (recursive types, unions of more than 63 branches, named types not
defined in the schema, non-record top level) fall back to fastavro: still exact, slower.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
from collections.abc import Callable
from decimal import Context
from typing import Any, Final

from fastavro import parse_schema, schemaless_reader
from fastavro.read import LOGICAL_READERS

from cutover.codegen import SourceBuilder

#: ``decode(data, offset)``: the record encoded in ``data`` from ``offset`` on.
Decoder = Callable[[bytes, int], dict[str, Any]]

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_NAIVE: Final = dt.datetime(1970, 1, 1)
_DAYS_SHIFT: Final = dt.date(1970, 1, 1).toordinal()
_PRIMITIVES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_NAMED: Final = frozenset({"record", "enum", "fixed", "error"})


class Unsupported(Exception):
    """The schema uses a construct the generator does not handle (fall back to fastavro)."""


class Corrupt(ValueError):
    """The bytes do not follow the schema (a bad length, union branch or enum index)."""


def _bad(what: str, value: object) -> Corrupt:
    return Corrupt(f"invalid {what} {value!r}")


_HELPERS: Final[dict[str, Any]] = {
    "_bad": _bad,
    "_double": struct.Struct("<d").unpack_from,
    "_float": struct.Struct("<f").unpack_from,
    "_from_bytes": int.from_bytes,
    "_td": dt.timedelta,
    "_EPOCH": _EPOCH,
    "_EPOCH_NAIVE": _EPOCH_NAIVE,
    "_fromordinal": dt.date.fromordinal,
    "_DAYS_SHIFT": _DAYS_SHIFT,
}


class _Gen(SourceBuilder):
    """Emits the lines of one decode function (locals: ``data``, ``pos``, ``end_of_data``)."""

    def __init__(self) -> None:
        super().__init__()
        self.expanding: set[int] = set()

    # -- names (the parsed schema defines each named type once, later uses name it) --------

    def register(self, schema: dict[str, Any], namespace: str) -> str:
        name = schema.get("name")
        if not isinstance(name, str):
            raise Unsupported(f"named type without a name: {schema}")
        ns = schema.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
        full = name if "." in name else f"{ns}.{name}" if ns else name
        self.names[full] = schema
        self.names.setdefault(name.rsplit(".", 1)[-1], schema)
        return str(ns or "")

    def resolve(self, schema: Any, namespace: str) -> Any:
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            full = schema if "." in schema else f"{namespace}.{schema}" if namespace else schema
            found = self.names.get(full, self.names.get(schema))
            if found is None:
                raise Unsupported(f"unknown named type {schema}")
            return found
        return schema

    # -- reading ---------------------------------------------------------------------------

    def long(self, var: str, depth: int) -> None:
        """``var`` = the next zig-zag varint, inline (a call per value cost ~7 % of decoding)."""
        shift = self.var("s")
        self.emit(depth, f"{var} = data[pos]")
        self.emit(depth, "pos += 1")
        self.emit(depth, f"if {var} > 127:")
        self.emit(depth + 1, f"{var} &= 127")
        self.emit(depth + 1, f"{shift} = 7")
        self.emit(depth + 1, "while True:")
        self.emit(depth + 2, "b = data[pos]")
        self.emit(depth + 2, "pos += 1")
        self.emit(depth + 2, f"{var} |= (b & 127) << {shift}")
        self.emit(depth + 2, "if b < 128:")
        self.emit(depth + 3, "break")
        self.emit(depth + 2, f"{shift} += 7")
        self.emit(depth + 2, f"if {shift} > 63:")
        self.emit(depth + 3, "raise _bad('varint longer than', '10 bytes')")
        self.emit(depth, f"{var} = ({var} >> 1) ^ -({var} & 1)")

    def raw(self, var: str, depth: int) -> None:
        """``var`` = the next length-prefixed bytes."""
        n = self.var("n")
        self.long(n, depth)
        self.emit(depth, f"{var} = pos + {n}")
        self.emit(depth, f"if {n} < 0 or {var} > end_of_data:")
        self.emit(depth + 1, f"raise _bad('length', {n})")
        self.emit(depth, f"{var}, pos = data[pos:{var}], {var}")

    def value(self, schema: Any, var: str, depth: int, namespace: str) -> None:
        """Lines reading one value of ``schema`` into ``var``."""
        schema = self.resolve(schema, namespace)
        if isinstance(schema, list):
            self.union(schema, var, depth, namespace)
        elif isinstance(schema, dict):
            self.complex(schema, var, depth, namespace)
        elif schema == "null":
            self.emit(depth, f"{var} = None")
        elif schema == "boolean":
            self.emit(depth, f"{var} = data[pos] != 0")
            self.emit(depth, "pos += 1")
        elif schema in ("int", "long"):
            self.long(var, depth)
        elif schema in ("double", "float"):
            size = 8 if schema == "double" else 4
            self.emit(depth, f"{var} = _{schema}(data, pos)[0]")
            self.emit(depth, f"pos += {size}")
        elif schema == "bytes":
            self.raw(var, depth)
        elif schema == "string":
            self.raw(var, depth)
            self.emit(depth, f"{var} = {var}.decode()")
        else:
            raise Unsupported(f"type {schema!r}")

    def union(self, branches: list[Any], var: str, depth: int, namespace: str) -> None:
        if not branches or len(branches) > 63:
            raise Unsupported(f"union of {len(branches)} branches")
        # Branch i is the varint 2*i: one byte below 64 branches.
        self.emit(depth, f"{var} = data[pos]")
        self.emit(depth, "pos += 1")
        for i, branch in enumerate(branches):
            self.emit(depth, f"{'if' if i == 0 else 'elif'} {var} == {2 * i}:")
            self.value(branch, var, depth + 1, namespace)
        self.emit(depth, "else:")
        self.emit(depth + 1, f"raise _bad('union branch', {var})")

    def complex(self, schema: dict[str, Any], var: str, depth: int, namespace: str) -> None:
        kind = schema.get("type")
        if kind in _NAMED:
            key = id(schema)
            if key in self.expanding:
                raise Unsupported("recursive type")
            self.expanding.add(key)
            inner = self.register(schema, namespace)
            self.named(schema, str(kind), var, depth, inner)
            self.expanding.discard(key)
        elif kind == "array":
            self.array(schema["items"], var, depth, namespace, keyed=False)
        elif kind == "map":
            self.array(schema["values"], var, depth, namespace, keyed=True)
        elif isinstance(kind, str) and kind in _PRIMITIVES:
            self.value(kind, var, depth, namespace)
        else:
            raise Unsupported(f"type {schema}")
        logical = schema.get("logicalType")
        if logical and f"{kind}-{logical}" in LOGICAL_READERS:
            self.logical(schema, f"{kind}-{logical}", var, depth)

    def named(self, schema: dict[str, Any], kind: str, var: str, depth: int, ns: str) -> None:
        if kind in ("record", "error"):
            fields = []
            for field in schema["fields"]:
                name = field["name"]
                if not isinstance(name, str):
                    raise Unsupported(f"field name {name!r}")
                fvar = self.var("f")
                self.value(field["type"], fvar, depth, ns)
                fields.append(f"{name!r}: {fvar}")
            self.emit(depth, f"{var} = {{{', '.join(fields)}}}")
        elif kind == "enum":
            symbols = self.const(tuple(schema["symbols"]))
            self.long(var, depth)
            self.emit(depth, f"if {var} < 0:")
            self.emit(depth + 1, f"raise _bad('enum index', {var})")
            self.emit(depth, f"{var} = {symbols}[{var}]")
        else:  # fixed
            size = schema["size"]
            if type(size) is not int or size < 0:
                raise Unsupported(f"fixed size {size!r}")
            self.emit(depth, f"{var} = data[pos:pos + {size}]")
            self.emit(depth, f"if len({var}) != {size}:")
            self.emit(depth + 1, f"raise _bad('fixed of size', len({var}))")
            self.emit(depth, f"pos += {size}")

    def array(self, items: Any, var: str, depth: int, namespace: str, *, keyed: bool) -> None:
        """An array (or a map, ``keyed``): blocks of items, a negative count has a byte size."""
        count, item, key, index = self.var("c"), self.var("it"), self.var("k"), self.var("i")
        self.emit(depth, f"{var} = {{}}" if keyed else f"{var} = []")
        self.long(count, depth)
        self.emit(depth, f"while {count} != 0:")
        self.emit(depth + 1, f"if {count} < 0:")
        self.emit(depth + 2, f"{count} = -{count}")
        self.long(self.var("size"), depth + 2)
        self.emit(depth + 1, f"for {index} in range({count}):")
        if keyed:
            self.raw(key, depth + 2)
            self.emit(depth + 2, f"{key} = {key}.decode()")
        self.value(items, item, depth + 2, namespace)
        self.emit(depth + 2, f"{var}[{key}] = {item}" if keyed else f"{var}.append({item})")
        self.long(count, depth + 1)

    def logical(self, schema: dict[str, Any], key: str, var: str, depth: int) -> None:
        """fastavro's conversion of a logical type, inlined for the common ones."""
        if key == "long-timestamp-micros":
            self.emit(depth, f"{var} = _EPOCH + _td(microseconds={var})")
        elif key == "long-local-timestamp-micros":
            self.emit(depth, f"{var} = _EPOCH_NAIVE + _td(microseconds={var})")
        elif key == "int-date":
            self.emit(depth, f"{var} = _fromordinal({var} + _DAYS_SHIFT)")
        elif key in ("bytes-decimal", "fixed-decimal"):
            # fastavro: a context of the schema's precision, the unscaled integer, scaleb.
            try:
                context = Context(prec=schema["precision"])
                scale = int(schema.get("scale", 0))
            except (KeyError, TypeError, ValueError) as exc:
                raise Unsupported(f"decimal {schema}: {exc}") from None
            ctx = self.const(context)
            self.emit(
                depth,
                f"{var} = {ctx}.create_decimal(_from_bytes({var}, 'big', signed=True))"
                f".scaleb({-scale}, {ctx})",
            )
        else:
            convert, spec = self.const(LOGICAL_READERS[key]), self.const(schema)
            self.emit(depth, f"{var} = {convert}({var}, {spec}, None)")


def _generate(schema: Any, name: str) -> Decoder:
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise Unsupported("top-level type is not a record")
    gen = _Gen()
    gen.emit(1, "end_of_data = len(data)")
    gen.value(schema, "record", 1, "")
    gen.emit(1, "return record")
    decode: Decoder = gen.build("decode(data, pos)", f"avro decoder {name}", _HELPERS)
    return decode


def _fastavro_decoder(parsed: Any) -> Decoder:
    def decode(data: bytes, offset: int) -> dict[str, Any]:
        record: dict[str, Any] = schemaless_reader(io.BytesIO(data[offset:]), parsed, None)  # type: ignore[assignment]
        return record

    return decode


def decoder_for(schema_json: str, parsed: Any, name: str) -> Decoder:
    """A function decoding one record written with the schema ``schema_json`` (its full JSON;
    ``parsed``: fastavro's parsed form of it, for the fallback)."""
    try:
        return _generate(json.loads(schema_json), name)
    except Unsupported:
        return _fastavro_decoder(parsed)


def fastavro_decoder(schema_json: str) -> Decoder:
    """fastavro's reader behind the :data:`Decoder` interface (tests compare the two)."""
    return _fastavro_decoder(parse_schema(json.loads(schema_json)))
