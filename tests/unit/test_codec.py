"""Avro single-object encoding of change events: exact values, fingerprints, evolution."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form

from cutover.codec import (
    MAGIC,
    ColumnSpec,
    SchemaStore,
    avro_type,
    check_evolution,
    encode,
    envelope_schema,
    heartbeat_schema,
    read_fingerprint,
    writer_schema,
)
from cutover.errors import DecodeError, SchemaIncompatible, UnknownSchema

NUMERIC_14_2 = ((14 << 16) | 2) + 4
COLUMNS = [
    ColumnSpec("id", 20, -1),
    ColumnSpec("price_idr", 1700, NUMERIC_14_2),
    ColumnSpec("updated_at", 1184, -1),
    ColumnSpec("description", 25, -1),
    ColumnSpec("stock", 23, -1),
]


def _event(after: dict[str, Any] | None, op: str = "u") -> dict[str, Any]:
    return {
        "before": None,
        "after": after,
        "source": {
            "version": "0.1.0", "connector": "kafka-cutover", "name": "shop", "ts_ms": 1,
            "snapshot": "false", "db": "legacy", "schema": "shop", "table": "products",
            "txId": 7, "lsn": 123456, "seq": 3,
        },
        "op": op,
        "ts_ms": 2,
        "transaction": {"id": "7:123456", "total_order": 4, "data_collection_order": 1,
                        "last_in_partition": True},
        "unchanged_toast": ["description"],
    }  # fmt: skip


def test_round_trip_is_exact() -> None:
    ws = writer_schema(envelope_schema("shop", "products", COLUMNS))
    store = SchemaStore()
    store.add(ws)
    after = {
        "id": 2**62,
        "price_idr": Decimal("123456789012.34"),
        "updated_at": datetime(2026, 11, 27, 23, 54, 5, 123456, tzinfo=UTC),
        "description": None,
        "stock": -5,
    }
    data = encode(ws, _event(after))
    assert data[:2] == MAGIC
    got_schema, record = store.decode(data)
    assert got_schema.fingerprint == ws.fingerprint
    assert record["after"] == after
    assert record["unchanged_toast"] == ["description"]
    assert record["transaction"]["last_in_partition"] is True
    assert record["source"]["lsn"] == 123456


def test_fingerprint_is_crc64_of_canonical_form_little_endian() -> None:
    ws = writer_schema(heartbeat_schema())
    canonical = to_parsing_canonical_form(ws.parsed)
    expected = int(fingerprint(canonical, "CRC-64-AVRO"), 16)
    assert ws.fingerprint == expected
    assert ws.header == MAGIC + expected.to_bytes(8, "little")
    data = encode(ws, {"ts_ms": 1, "lsn": 2, "producer": "p"})
    assert read_fingerprint(data) == expected


def test_decimal_scale_is_enforced_not_rounded() -> None:
    ws = writer_schema(envelope_schema("shop", "products", COLUMNS))
    with pytest.raises(ValueError):
        encode(ws, _event({"id": 1, "price_idr": Decimal("1.005"), "updated_at": None,
                           "description": None, "stock": 1}))  # fmt: skip


def test_numeric_without_typmod_is_exact_text() -> None:
    assert avro_type(1700, -1) == "string"
    assert avro_type(1700, NUMERIC_14_2) == {
        "type": "bytes", "logicalType": "decimal", "precision": 14, "scale": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("data", "error", "needle"),
    [
        (b"", DecodeError, "expected magic c301"),
        # Not 00: a first byte 00 announces the Confluent wire format (test_registry_framing).
        (b"\x01\x01garbage!!", DecodeError, "found 0101"),
        (MAGIC + (42).to_bytes(8, "little") + b"x", UnknownSchema, "000000000000002a"),
    ],
)
def test_bad_bytes_are_named(data: bytes, error: type[Exception], needle: str) -> None:
    store = SchemaStore()
    with pytest.raises(error, match=needle):
        store.decode(data)


def test_corrupt_body_is_a_decode_error() -> None:
    ws = writer_schema(envelope_schema("shop", "products", COLUMNS))
    store = SchemaStore()
    store.add(ws)
    data = encode(ws, _event(None, "d"))
    with pytest.raises(DecodeError, match="corrupt Avro body"):
        store.decode(data[:12])


def test_added_column_is_a_compatible_new_version() -> None:
    old = writer_schema(envelope_schema("shop", "products", COLUMNS))
    grown = [*COLUMNS, ColumnSpec("weight_g", 23, -1)]
    new = writer_schema(envelope_schema("shop", "products", grown))
    assert old.fingerprint != new.fingerprint
    assert check_evolution("shop.products", COLUMNS, grown) == ["added weight_g"]
    assert check_evolution("shop.products", grown, COLUMNS) == ["dropped weight_g"]


def test_type_change_is_refused() -> None:
    changed = [ColumnSpec("id", 25, -1), *COLUMNS[1:]]
    with pytest.raises(SchemaIncompatible, match="column id changed type"):
        check_evolution("shop.products", COLUMNS, changed)


def test_schemas_topic_json_round_trip_keeps_logical_types() -> None:
    ws = writer_schema(envelope_schema("shop", "products", COLUMNS))
    data = encode(ws, _event({"id": 1, "price_idr": Decimal("9.90"), "updated_at": None,
                              "description": "x", "stock": 1}))  # fmt: skip
    store = SchemaStore()
    again = store.add_json(ws.json)
    assert again.fingerprint == ws.fingerprint
    assert store.decode(data)[1]["after"]["price_idr"] == Decimal("9.90")
    with pytest.raises(DecodeError, match="invalid schema"):
        store.add_json("{not json")


def test_schemas_are_handed_to_fastavro_marked_parsed() -> None:
    """fastavro parses an unmarked schema again on every read and write: two thirds of an
    applier's decoding CPU (bench/decode_cost.py). The marked schema reads the same record."""
    ws = writer_schema(heartbeat_schema())
    assert ws.parsed.get("__fastavro_parsed") is True
    store = SchemaStore()
    store.add(ws)
    data = encode(ws, {"ts_ms": 1, "lsn": 2, "producer": "p"})
    assert store.decode(data)[1] == {"ts_ms": 1, "lsn": 2, "producer": "p"}
