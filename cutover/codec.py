"""Avro change events: schemas generated from source tables, single-object encoding, decoding.

Every Kafka message value kafka-cutover writes is Avro **single-object encoded**: the magic bytes
``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's parsing
canonical form, then the Avro binary body. Every writer schema is also published to the compacted
schemas topic (key = fingerprint in hex, value = the schema JSON), so any consumer can decode any
message it finds (:class:`SchemaStore`).

With a schema registry configured (``[kafka] schema_registry_url``, :mod:`cutover.registry`) the
values are in the **Confluent wire format** instead: the byte ``00``, the 4-byte big-endian schema
id the registry gave the writer schema, then the same Avro binary body. Readers tell the two apart
by the first bytes (:func:`framing`: ``C3 01`` single-object, ``00`` Confluent), so a topic may
change format without being rewritten; :class:`SchemaStore` resolves Confluent ids through the
registry (each id once).

Per source table the codec builds a Debezium-shaped envelope (template ``schemas/envelope.avsc``,
fields described in :mod:`cutover.envelope`)
whose ``Value`` record has one nullable field per published column. Column types map to Avro as:

=====================  ==========================================================
PostgreSQL             Avro
=====================  ==========================================================
int8                   long
int2, int4             int
numeric(p, s)          bytes, logicalType decimal (precision p, scale s): exact
numeric (no typmod)    string (exact decimal text)
timestamptz            long, logicalType timestamp-micros (UTC)
timestamp              long, logicalType local-timestamp-micros
date                   int, logicalType date
bool                   boolean
uuid                   string, logicalType uuid
bytea                  bytes
float4, float8         double
json, jsonb, text, …   string
=====================  ==========================================================

Schema evolution: a table's new column list (``ALTER TABLE ... ADD COLUMN`` shows up as a new
pgoutput Relation message) yields a new schema version; :func:`check_evolution` accepts added and
dropped columns (every field is nullable with a null default, so readers of either version can
read the other) and refuses a changed type with :class:`~cutover.errors.SchemaIncompatible`.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

import schemas
from cutover import envelope as env
from cutover.avro_decode import Decoder, decoder_for
from cutover.errors import (
    ConfigError,
    DecodeError,
    SchemaIncompatible,
    SchemaRegistryError,
    UnknownSchema,
)

MAGIC: Final = b"\xc3\x01"
HEADER_SIZE: Final = 10
_FP = struct.Struct("<Q")
CONFLUENT_MAGIC: Final = b"\x00"
CONFLUENT_HEADER_SIZE: Final = 5
_ID = struct.Struct(">I")
Framing = Literal["single-object", "confluent"]

# PostgreSQL type OIDs (pg_type.h) the codec knows how to carry exactly.
_AVRO_BY_OID: Final[dict[int, Any]] = {
    20: "long",
    21: "int",
    23: "int",
    26: "long",
    16: "boolean",
    700: "double",
    701: "double",
    17: "bytes",
    1184: {"type": "long", "logicalType": "timestamp-micros"},
    1114: {"type": "long", "logicalType": "local-timestamp-micros"},
    1082: {"type": "int", "logicalType": "date"},
    2950: {"type": "string", "logicalType": "uuid"},
}
NUMERIC_OID: Final = 1700


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """A published source column as the codec needs it."""

    name: str
    type_oid: int
    type_modifier: int


def avro_type(type_oid: int, type_modifier: int) -> Any:
    """The Avro type carrying values of a PostgreSQL type exactly (see the module table)."""
    if type_oid == NUMERIC_OID:
        if type_modifier >= 4:
            packed = type_modifier - 4
            precision, scale = (packed >> 16) & 0xFFFF, packed & 0xFFFF
            return {"type": "bytes", "logicalType": "decimal", "precision": precision,
                    "scale": scale}  # fmt: skip
        return "string"
    return _AVRO_BY_OID.get(type_oid, "string")


def _avro_name(name: str) -> str:
    """Avro names allow [A-Za-z0-9_]; PostgreSQL identifiers allow more."""
    cleaned = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"_{cleaned}"


def envelope_schema(db_schema: str, table: str, columns: Iterable[ColumnSpec]) -> dict[str, Any]:
    """The change-event envelope schema of one source table with the given published columns."""
    namespace = f"cutover.{_avro_name(db_schema)}.{_avro_name(table)}"
    value = {
        "type": "record",
        "name": "Value",
        "namespace": namespace,
        "fields": [
            {
                "name": col.name,
                "type": ["null", avro_type(col.type_oid, col.type_modifier)],
                "default": None,
            }
            for col in columns
        ],
    }
    envelope = schemas.load("envelope")
    envelope["namespace"] = namespace
    envelope["doc"] = f"Change event of {db_schema}.{table}"
    fields = {f["name"]: f for f in envelope["fields"]}
    # Inline the named types at their first use (schema order: before comes first); later uses
    # refer to them by name.
    fields[env.BEFORE]["type"] = ["null", value]
    fields[env.SOURCE]["type"] = schemas.load("source")
    fields[env.TRANSACTION]["type"] = ["null", schemas.load("transaction")]
    return envelope


def heartbeat_schema() -> dict[str, Any]:
    return schemas.load("heartbeat")


def truncate_schema() -> dict[str, Any]:
    """The schema of a truncate event (``cutover.Truncate``, one for every table)."""
    schema = schemas.load("truncate")
    fields = {f["name"]: f for f in schema["fields"]}
    fields[env.SOURCE]["type"] = schemas.load("source")
    fields[env.TRANSACTION]["type"] = ["null", schemas.load("transaction")]
    return schema


def check_evolution(table: str, old: Iterable[ColumnSpec], new: Iterable[ColumnSpec]) -> list[str]:
    """Describe the compatible changes from ``old`` to ``new`` columns; raise on a type change."""
    before = {c.name: c for c in old}
    after = {c.name: c for c in new}
    changes = []
    for name, col in after.items():
        prev = before.get(name)
        if prev is None:
            changes.append(f"added {name}")
        elif avro_type(prev.type_oid, prev.type_modifier) != avro_type(
            col.type_oid, col.type_modifier
        ):
            raise SchemaIncompatible(
                table,
                f"column {name} changed type (oid {prev.type_oid} typmod {prev.type_modifier} "
                f"-> oid {col.type_oid} typmod {col.type_modifier}); consumers could not read "
                "old and new events alike. Revert the change, or re-snapshot the table under a "
                "new topic prefix",
            )
    changes.extend(f"dropped {name}" for name in before if name not in after)
    return changes


@dataclass(frozen=True, slots=True)
class WriterSchema:
    """A parsed schema with its fingerprint and the 10-byte single-object header."""

    name: str
    fingerprint: int
    header: bytes
    parsed: Any
    canonical: str
    # The full schema JSON (logical types, defaults, docs): what the schemas topic carries. The
    # canonical form alone would lose logical types (decimals would read back as bytes).
    json: str

    @property
    def fingerprint_hex(self) -> str:
        return f"{self.fingerprint:016x}"


def writer_schema(schema: Mapping[str, Any]) -> WriterSchema:
    text = json.dumps(schema, separators=(",", ":"), sort_keys=True)
    # With fastavro's "parsed" marker: schemaless_reader/_writer parse an unmarked schema again
    # on every call, which was two thirds of an applier's decoding time (106 against 40 µs of
    # CPU per shop event). The canonical form, hence the fingerprint, is the same either way.
    parsed = parse_schema(json.loads(text))
    canonical = to_parsing_canonical_form(parsed)
    fp = int(fingerprint(canonical, "CRC-64-AVRO"), 16)
    name = str(parsed["name"]) if isinstance(parsed, dict) else str(parsed)
    return WriterSchema(name, fp, MAGIC + _FP.pack(fp), parsed, canonical, text)


def encode(schema: WriterSchema, record: Mapping[str, Any]) -> bytes:
    """Single-object encoding of ``record`` with ``schema``."""
    out = io.BytesIO()
    out.write(schema.header)
    schemaless_writer(out, schema.parsed, record)
    return out.getvalue()


def confluent_header(schema_id: int) -> bytes:
    """The 5-byte Confluent wire-format header of a registry schema id."""
    return CONFLUENT_MAGIC + _ID.pack(schema_id)


def framing(data: bytes) -> Framing:
    """Which framing a message value uses, by its first bytes; DecodeError if neither."""
    if len(data) >= HEADER_SIZE and data[:2] == MAGIC:
        return "single-object"
    if len(data) >= CONFLUENT_HEADER_SIZE and data[:1] == CONFLUENT_MAGIC:
        return "confluent"
    head = data[:2].hex() or "nothing"
    raise DecodeError(
        f"not an Avro message: expected magic c301 (single-object) or 00 (Confluent), "
        f"found {head} ({len(data)} bytes)"
    )


def read_schema_id(data: bytes) -> int:
    """The registry schema id of a Confluent-framed message."""
    if len(data) < CONFLUENT_HEADER_SIZE or data[:1] != CONFLUENT_MAGIC:
        raise DecodeError(f"not a Confluent-framed message ({len(data)} bytes)")
    schema_id: int = _ID.unpack_from(data, 1)[0]
    return schema_id


def read_fingerprint(data: bytes) -> int:
    """The writer fingerprint of a single-object encoded message; DecodeError if it is not one."""
    if len(data) < HEADER_SIZE or data[:2] != MAGIC:
        head = data[:2].hex() or "nothing"
        raise DecodeError(
            f"not an Avro single-object message: expected magic c301, found {head} "
            f"({len(data)} bytes)"
        )
    fp: int = _FP.unpack_from(data, 2)[0]
    return fp


class SchemaStore:
    """Writer schemas by fingerprint (what was registered here or read from the schemas topic)
    and by registry id (resolved on first sight through ``resolve``: id -> schema JSON)."""

    def __init__(self, resolve: Callable[[int], str] | None = None) -> None:
        self._by_fp: dict[int, WriterSchema] = {}
        self._by_id: dict[int, WriterSchema] = {}
        # The compiled reader of each writer schema (cutover.avro_decode), made on first use.
        self._decoders: dict[int, Decoder] = {}
        self.resolve = resolve

    def add(self, schema: Mapping[str, Any] | WriterSchema) -> WriterSchema:
        ws = schema if isinstance(schema, WriterSchema) else writer_schema(schema)
        self._by_fp.setdefault(ws.fingerprint, ws)
        return self._by_fp[ws.fingerprint]

    def add_json(self, text: str | bytes) -> WriterSchema:
        try:
            return self.add(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            raise DecodeError(f"schemas topic holds an invalid schema: {exc}") from None

    def get(self, fp: int) -> WriterSchema | None:
        return self._by_fp.get(fp)

    def __contains__(self, fp: int) -> bool:
        return fp in self._by_fp

    def __len__(self) -> int:
        return len(self._by_fp)

    def by_id(self, schema_id: int) -> WriterSchema:
        """The writer schema of a registry id, asked of the registry once."""
        ws = self._by_id.get(schema_id)
        if ws is None:
            if self.resolve is None:
                # Not a poison message: this reader lacks the registry's address. Stop (exit 2).
                raise ConfigError(
                    f"a Confluent-framed message (schema id {schema_id}) needs the schema "
                    "registry: set [kafka] schema_registry_url or CUTOVER_SCHEMA_REGISTRY_URL"
                )
            try:
                text = self.resolve(schema_id)
            except SchemaRegistryError as exc:
                if exc.status != 404:
                    raise  # unreachable or failing: not this message's fault, stop
                raise UnknownSchema(schema_id=schema_id, reason=exc.reason or "") from None
            ws = self.add_json(text)
            self._by_id[schema_id] = ws
        return ws

    def decode(self, data: bytes) -> tuple[WriterSchema, dict[str, Any]]:
        """Decode a message of either framing (:func:`framing`); UnknownSchema if its
        single-object fingerprint is not known."""
        if data[:2] == MAGIC and len(data) >= HEADER_SIZE:  # the usual case, checked first
            fp: int = _FP.unpack_from(data, 2)[0]
            found = self._by_fp.get(fp)
            if found is None:
                raise UnknownSchema(fp)
            ws, offset = found, HEADER_SIZE
        else:
            framing(data)  # DecodeError unless Confluent-framed
            ws, offset = self.by_id(read_schema_id(data)), CONFLUENT_HEADER_SIZE
        decode = self._decoders.get(ws.fingerprint)
        if decode is None:
            decode = self._decoders[ws.fingerprint] = decoder_for(ws.json, ws.parsed, ws.name)
        try:
            record = decode(data, offset)
        except Exception as exc:  # damaged bodies raise many kinds (see cutover.avro_decode)
            raise DecodeError(
                f"corrupt Avro body for schema {ws.name} ({ws.fingerprint_hex}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(record, dict):
            raise DecodeError(f"schema {ws.name} does not describe a record")
        return ws, record
