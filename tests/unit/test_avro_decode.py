"""The compiled Avro decoder (cutover.avro_decode) reads exactly what fastavro reads."""

from __future__ import annotations

import io
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from cutover import avro_decode, codec
from cutover.codec import ColumnSpec, SchemaStore
from cutover.errors import DecodeError

MONEY = (14 << 16 | 2) + 4
COLUMNS = [
    ColumnSpec(name, oid, typmod)
    for name, oid, typmod in (
        ("id", 20, -1), ("n", 23, -1), ("price", 1700, MONEY), ("at", 1184, -1),
        ("day", 1082, -1), ("ok", 16, -1), ("text", 25, -1), ("local", 1114, -1),
        ("f", 701, -1), ("raw", 17, -1), ("u", 2950, -1), ("big", 1700, (38 << 16 | 9) + 4),
        ("free", 1700, -1),
    )
]  # fmt: skip

# Every construct the generator handles, and the logical types it hands to fastavro.
KITCHEN_SINK: dict[str, Any] = {
    "type": "record",
    "name": "Sink",
    "namespace": "t",
    "fields": [
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a", "b", "c"]}},
        {"name": "e2", "type": ["null", "E"]},
        {"name": "fx", "type": {"type": "fixed", "name": "F", "size": 3}},
        {"name": "fdec", "type": {"type": "fixed", "name": "FD", "size": 8,
                                  "logicalType": "decimal", "precision": 18, "scale": 3}},
        {"name": "m", "type": {"type": "map", "values": ["null", "long", "string"]}},
        {"name": "a", "type": {"type": "array", "items": {"type": "array", "items": "int"}}},
        {"name": "fl", "type": "float"},
        {"name": "u3", "type": ["string", "null", "double", "boolean"]},
        {"name": "tm", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "tu", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "tsm", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ltm", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "odd", "type": {"type": "string", "logicalType": "no-such-type"}},
        {"name": "nested", "type": {"type": "record", "name": "N", "fields": [
            {"name": "x", "type": "long"}, {"name": "again", "type": ["null", "F"]}]}},
        {"name": "nested2", "type": "t.N"},
    ],
}  # fmt: skip


def _value(schema: Any, rng: random.Random, named: dict[str, Any]) -> Any:
    """A random value of ``schema`` (a fastavro-parsed schema)."""
    if isinstance(schema, list):
        return _value(rng.choice(schema), rng, named)
    if isinstance(schema, str) and schema in named:
        return _value(named[schema], rng, named)
    if isinstance(schema, dict):
        kind, logical = schema["type"], schema.get("logicalType")
        if kind == "record":
            named[schema["name"]] = schema
            return {f["name"]: _value(f["type"], rng, named) for f in schema["fields"]}
        if kind == "enum":
            named[schema["name"]] = schema
            return rng.choice(schema["symbols"])
        if kind == "fixed":
            named[schema["name"]] = schema
            if logical == "decimal":
                return Decimal(f"{rng.randrange(-(10**15), 10**15)}e-3")
            return rng.randbytes(schema["size"])
        if kind == "array":
            return [_value(schema["items"], rng, named) for _ in range(rng.randrange(0, 4))]
        if kind == "map":
            return {f"k{i}": _value(schema["values"], rng, named) for i in range(rng.randrange(3))}
        if logical == "decimal":
            digits = schema["precision"]
            unscaled = rng.choice([0, -1, rng.randrange(-(10**digits), 10**digits)])
            return Decimal(f"{unscaled}e-{schema.get('scale', 0)}")  # exact, all digits
        if logical in ("timestamp-micros", "timestamp-millis"):
            ms = logical == "timestamp-millis"
            delta = (
                timedelta(milliseconds=rng.randrange(10**12))
                if ms
                else timedelta(microseconds=rng.randrange(-(10**16), 10**16))
            )
            return datetime(1970, 1, 1, tzinfo=UTC) + delta
        if logical in ("local-timestamp-micros", "local-timestamp-millis"):
            return datetime(1990, 1, 1) + timedelta(milliseconds=rng.randrange(10**12))
        if logical == "date":
            return date(2020, 1, 1) + timedelta(days=rng.randrange(-5000, 5000))
        if logical == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128)))
        if logical in ("time-millis", "time-micros"):
            return time(rng.randrange(24), rng.randrange(60), rng.randrange(60), 1000 * 7)
        return _value(kind, rng, named)
    makers: dict[str, Callable[[], Any]] = {
        "null": lambda: None,
        "boolean": lambda: rng.random() < 0.5,
        "int": lambda: rng.choice([0, -1, 63, 64, -65, 2**31 - 1, -(2**31)]),
        "long": lambda: rng.choice([0, 1, -64, 2**63 - 1, -(2**63), rng.getrandbits(40)]),
        "float": lambda: rng.choice([0.0, -1.5, 0.25]),
        "double": lambda: rng.choice([0.0, -1.5, 1e300, rng.random()]),
        "bytes": lambda: rng.randbytes(rng.randrange(0, 200)),
        "string": lambda: "".join(rng.choice("aé€😀 x\n") for _ in range(rng.randrange(0, 80))),
    }
    return makers[schema]()


def _cases(schema: dict[str, Any], n: int, seed: int) -> list[bytes]:
    named: dict[str, Any] = {}
    parsed = parse_schema(schema, named)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO(b"head")  # decoders start at an offset
        buf.seek(4)
        schemaless_writer(buf, parsed, _value(parsed, rng, named))
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize(
    "schema",
    [
        codec.envelope_schema("shop", "t", COLUMNS),
        codec.truncate_schema(),
        codec.heartbeat_schema(),
        KITCHEN_SINK,
    ],
    ids=["envelope", "truncate", "heartbeat", "kitchen-sink"],
)
def test_compiled_decoder_reads_what_fastavro_reads(schema: dict[str, Any]) -> None:
    text = json.dumps(schema)
    fast = avro_decode.decoder_for(text, parse_schema(schema), "x")
    assert fast.__code__.co_filename.startswith("<avro decoder")  # not the fallback
    reference = avro_decode.fastavro_decoder(text)
    for data in _cases(schema, 400, seed=11):
        got, want = fast(data, 4), reference(data, 4)
        assert got == want
        assert [type(v) for v in got.values()] == [type(v) for v in want.values()]
        assert list(got) == list(want)  # same key order


def test_unsupported_schemas_fall_back_to_fastavro() -> None:
    recursive = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "v", "type": "long"}, {"name": "next", "type": ["null", "Node"]}],
    }
    decode = avro_decode.decoder_for(json.dumps(recursive), parse_schema(recursive), "Node")
    assert not decode.__code__.co_filename.startswith("<avro decoder")
    data = _cases(recursive, 1, seed=1)[0]
    assert decode(data, 4) == avro_decode.fastavro_decoder(json.dumps(recursive))(data, 4)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"\x04", "union branch"),  # branch 2 of ["null", Value]
        # before, after null; then source.version:
        (b"\x00\x00\x7f", "length"),  # a string of -64 bytes
        (b"\x00\x00\x40a", "length"),  # a 32-byte string in 1 byte
        (b"\x00\x00\x02a", "IndexError"),  # runs past the end
    ],
)
def test_damaged_bodies_are_decode_errors(body: bytes, needle: str) -> None:
    ws = codec.writer_schema(codec.envelope_schema("shop", "t", COLUMNS))
    store = SchemaStore()
    store.add(ws)
    with pytest.raises(DecodeError, match=f"corrupt Avro body.*{needle}"):
        store.decode(ws.header + body)


def test_long_varints_decode_like_fastavro() -> None:
    schema = codec.heartbeat_schema()
    parsed = parse_schema(schema)
    decode = avro_decode.decoder_for(json.dumps(schema), parsed, "hb")
    for n in (0, 63, 64, -65, 2**31, 2**63 - 1, -(2**63)):
        buf = io.BytesIO()
        schemaless_writer(buf, parsed, {"ts_ms": n, "lsn": -n // 2, "producer": "p" * 70})
        assert decode(buf.getvalue(), 0) == {"ts_ms": n, "lsn": -n // 2, "producer": "p" * 70}
    with pytest.raises(avro_decode.Corrupt, match="10 bytes"):
        decode(b"\xff" * 11, 0)
