"""Record a range of a topic to an Avro object container file, and play such a file back.

``cutover replay record`` reads a topic range (offsets or times, optionally filtered by
partition, message key or source table) and writes every message to a **standard Avro object
container file**: any Avro reader (fastavro, avro-tools, Spark, DuckDB) reads it with the schema
embedded in the file. ``cutover replay play`` re-publishes a file to a topic (same partitions,
keys, headers and per-partition order; the value bytes are the original ones) or applies it to a
sandbox commerce database through the apply path of ``cutover apply``
(:class:`consumers.sink.Sink`: mapping, position guards, dead letters).

File layout (documented for users in docs/OPERATIONS.md, "Replay files"):

* one record ``consumers.replay.Message`` per Kafka message: ``topic``, ``partition``, ``offset``,
  ``timestamp_ms`` (the Kafka timestamp), ``key`` (bytes or null), ``headers`` (array of
  ``{key, value}``), ``value_schema`` (writer fingerprint, hex; null when the value is not Avro
  single-object encoded) and ``value``: a union of ``null``, ``bytes`` (a value that could not be
  decoded, kept as is: poison messages replay too) and **every writer schema met in the range**
  (change envelopes of each table, heartbeats), so the value is stored decoded, typed, with its
  logical types (decimals, timestamps);
* metadata: ``cutover.format`` (``cutover-replay/1``), ``cutover.writer_schemas`` (JSON object
  fingerprint hex → the writer schema JSON exactly as the schemas topic carries it) and
  ``cutover.recording`` (JSON: topic, partition ranges, filters, counts, time);
* codec ``null`` and one record per block. This is legal Avro, and it lets this module find each
  record's end without decoding it: a union value is its branch index followed by the writer's
  own binary encoding, so the single-object bytes of the original message are the 10-byte header
  plus the rest of the block. Recording therefore never re-encodes and playing to a topic never
  decodes, which is what makes both fast (bench/replay_throughput.py). Files written otherwise
  (several records per block, deflate) by other tools are still read, through fastavro.

Named Avro types must be unique in a schema, but two versions of one table's envelope (after an
``ALTER TABLE ... ADD COLUMN``) share their names: :func:`union_branches` defines every named type
once and renames a conflicting later version to ``<name>_<fingerprint>``. Renaming does not change
the binary encoding.

Ranges are half-open: ``--from-offset``/``--from-time`` are inclusive, ``--to-offset``/``--to-time``
exclusive. An open end is the high watermark when recording starts: recording stops by itself.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import mmap
import os
import re
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Final, Literal

import psycopg
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka import KafkaError as RdKafkaError
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from structlog.typing import FilteringBoundLogger

from consumers.dlq import DeadLetter
from consumers.events import Change, from_record
from consumers.schemas import SchemaReader, kafka_error
from consumers.sink import Sink, translate
from cutover.codec import HEADER_SIZE, MAGIC, SchemaStore, WriterSchema, heartbeat_schema
from cutover.config import KafkaSettings, Settings
from cutover.errors import (
    CutoverError,
    DatabaseError,
    DecodeError,
    KafkaError,
    UsageError,
    redact_dsn,
)
from cutover.logging import get_logger
from cutover.mapping import load_mapping

FORMAT: Final = "cutover-replay/1"
OCF_MAGIC: Final = b"Obj\x01"
SYNC_SIZE: Final = 16
#: Dead letters of ``play --to-target`` are recorded under this consumer group name.
REPLAY_GROUP: Final = "cutover-replay"
_PRIMITIVES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
_NAMED: Final = frozenset({"record", "error", "enum", "fixed"})
#: Union branches before the writer schemas: null, then the raw bytes of undecodable values.
BRANCH_NULL: Final = 0
BRANCH_RAW: Final = 1
FIRST_SCHEMA_BRANCH: Final = 2

ProgressFn = Callable[[int, int], None]


def log() -> FilteringBoundLogger:
    # Looked up at each use: a logger bound before cutover.logging.configure() keeps defaults.
    return get_logger(__name__)


# ====================================================================== Avro binary primitives


_SMALL: Final = [bytes([(n << 1) & 0xFF]) for n in range(64)]


def encode_long(n: int) -> bytes:
    """Avro ``long``: zig-zag, then base-128 varint."""
    if 0 <= n < 64:
        return _SMALL[n]
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode_bytes(data: bytes) -> bytes:
    return encode_long(len(data)) + data


def read_long(buf: Any, pos: int) -> tuple[int, int]:
    """Decode an Avro ``long`` at ``pos`` of ``buf``; returns (value, next position)."""
    b = buf[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


# ====================================================================== file schema (pure)

_HEADER_SCHEMA: Final[dict[str, Any]] = {
    "type": "record",
    "name": "Header",
    "namespace": "cutover.replay",
    "fields": [
        {"name": "key", "type": "string"},
        {"name": "value", "type": ["null", "bytes"]},
    ],
}


def union_branches(schemas: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Any]:
    """The writer schemas ``(fingerprint hex, schema JSON)`` as branches of one Avro union.

    Every named type is defined once: an identical later definition becomes a reference to the
    first; a different one with the same full name (a newer version of a table's envelope) is
    renamed ``<fullname>_<fingerprint>``, and the references to it in the same schema follow.
    """
    defined: dict[str, str] = {}
    return [_rewrite(copy.deepcopy(dict(s)), "", defined, {}, fp) for fp, s in schemas]


def _fullname(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _rewrite(
    node: Any, namespace: str, defined: dict[str, str], renames: dict[str, str], fp: str
) -> Any:
    if isinstance(node, str):
        if node in _PRIMITIVES:
            return node
        full = _fullname(node, namespace)
        return renames.get(full, full)
    if isinstance(node, list):
        return [_rewrite(n, namespace, defined, renames, fp) for n in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind in ("array", "map"):
        attr = "items" if kind == "array" else "values"
        node[attr] = _rewrite(node[attr], namespace, defined, renames, fp)
        return node
    if kind not in _NAMED:
        # A primitive with attributes (logical types), or {"type": <reference or schema>}.
        node["type"] = _rewrite(kind, namespace, defined, renames, fp)
        return node
    full = _fullname(str(node["name"]), str(node.get("namespace", namespace)))
    child_ns = full.rpartition(".")[0]
    # The definition as written decides identity (the schemas are self-contained).
    identity = json.dumps(node, sort_keys=True)
    if full in defined:
        if defined[full] == identity:
            return full
        renamed = f"{full}_{fp}"
        renames[full] = renamed
        full = renamed
    defined[full] = identity
    node["name"] = full
    node.pop("namespace", None)
    if kind in ("record", "error"):
        for fld in node.get("fields", []):
            fld["type"] = _rewrite(fld["type"], child_ns, defined, renames, fp)
    return node


def file_schema(branches: Sequence[Any]) -> dict[str, Any]:
    """The schema of a replay file whose value union holds ``branches`` (see the module doc)."""
    return {
        "type": "record",
        "name": "Message",
        "namespace": "cutover.replay",
        "doc": "One Kafka message recorded by `cutover replay record` (docs/OPERATIONS.md).",
        "fields": [
            {"name": "topic", "type": "string"},
            {"name": "partition", "type": "int"},
            {"name": "offset", "type": "long"},
            {"name": "timestamp_ms", "type": "long", "doc": "Kafka message timestamp"},
            {"name": "key", "type": ["null", "bytes"]},
            {"name": "headers", "type": {"type": "array", "items": _HEADER_SCHEMA}},
            {
                "name": "value_schema",
                "type": ["null", "string"],
                "doc": "CRC-64-AVRO fingerprint (hex) of the value's writer schema",
            },
            {
                "name": "value",
                "type": ["null", "bytes", *branches],
                "doc": "the decoded value; bytes: a value that could not be decoded, as consumed",
            },
        ],
    }


# ====================================================================== filters and ranges (pure)

_AVRO_NAME = re.compile(r"[^A-Za-z0-9_]")


def _avro_name(name: str) -> str:
    # As cutover.codec names a table's namespace: [A-Za-z0-9_] only.
    cleaned = _AVRO_NAME.sub("_", name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"_{cleaned}"


def table_of_schema(schema_name: str) -> tuple[str, str] | None:
    """(schema, table) of a change envelope named ``cutover.<schema>.<table>.Envelope``."""
    parts = schema_name.split(".")
    if len(parts) == 4 and parts[0] == "cutover" and parts[3] == "Envelope":
        return parts[1], parts[2]
    return None


@dataclass(frozen=True, slots=True)
class Filters:
    """What to keep of a topic range or a file. ``None`` means no restriction."""

    partitions: frozenset[int] | None = None
    from_offset: int | None = None
    to_offset: int | None = None  # exclusive
    from_time_ms: int | None = None
    to_time_ms: int | None = None  # exclusive
    keys: frozenset[bytes] | None = None
    tables: frozenset[str] | None = None  # "table" or "schema.table"

    def __post_init__(self) -> None:
        if self.from_offset is not None and self.from_offset < 0:
            raise UsageError("--from-offset must be 0 or more")
        if self.to_offset is not None and self.to_offset < 0:
            raise UsageError("--to-offset must be 0 or more")
        if (
            self.from_offset is not None
            and self.to_offset is not None
            and self.to_offset <= self.from_offset
        ):
            raise UsageError(
                f"--to-offset {self.to_offset} must be greater than --from-offset "
                f"{self.from_offset} (the range is [from, to): from inclusive, to exclusive)"
            )
        if (
            self.from_time_ms is not None
            and self.to_time_ms is not None
            and self.to_time_ms <= self.from_time_ms
        ):
            raise UsageError("--to-time must be later than --from-time")

    def position(self, partition: int, offset: int, timestamp_ms: int) -> bool:
        """Whether a message at this position is in the range."""
        if self.partitions is not None and partition not in self.partitions:
            return False
        if self.from_offset is not None and offset < self.from_offset:
            return False
        if self.to_offset is not None and offset >= self.to_offset:
            return False
        if self.from_time_ms is not None and timestamp_ms < self.from_time_ms:
            return False
        return self.to_time_ms is None or timestamp_ms < self.to_time_ms

    def content(self, key: bytes | None, table: tuple[str, str] | None) -> bool:
        """Whether a message with this key and source table (None: not a change) is kept."""
        if self.keys is not None and key not in self.keys:
            return False
        if self.tables is not None:
            if table is None:
                return False
            schema, name = table
            return name in self.tables or f"{schema}.{name}" in self.tables
        return True

    @property
    def by_content(self) -> bool:
        return self.keys is not None or self.tables is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "partitions": sorted(self.partitions) if self.partitions is not None else None,
            "from_offset": self.from_offset,
            "to_offset": self.to_offset,
            "from_time_ms": self.from_time_ms,
            "to_time_ms": self.to_time_ms,
            "keys": sorted(k.decode("utf-8", "replace") for k in self.keys)
            if self.keys is not None
            else None,
            "tables": sorted(self.tables) if self.tables is not None else None,
        }


def make_filters(
    *,
    partitions: Sequence[int] | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    from_time: str | None = None,
    to_time: str | None = None,
    keys: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
) -> Filters:
    """Filters from command-line values (times as ISO 8601; without an offset: UTC)."""
    if from_offset is not None and from_time is not None:
        raise UsageError("give --from-offset or --from-time, not both")
    if to_offset is not None and to_time is not None:
        raise UsageError("give --to-offset or --to-time, not both")
    if partitions is not None and any(p < 0 for p in partitions):
        raise UsageError("--partition must be 0 or more")
    return Filters(
        partitions=frozenset(partitions) if partitions else None,
        from_offset=from_offset,
        to_offset=to_offset,
        from_time_ms=parse_time(from_time, "--from-time") if from_time else None,
        to_time_ms=parse_time(to_time, "--to-time") if to_time else None,
        keys=frozenset(k.encode() for k in keys) if keys else None,
        tables=frozenset(_normalise_table(t) for t in tables) if tables else None,
    )


def _normalise_table(text: str) -> str:
    schema, dot, table = text.rpartition(".")
    if not table:
        raise UsageError(f"--table {text!r}: name a table, e.g. orders or shop.orders")
    return f"{_avro_name(schema)}.{_avro_name(table)}" if dot else _avro_name(table)


def parse_time(text: str, flag: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 time; a time without an offset is UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Rate:
    """Pacing of ``play``: as fast as possible, N events/s, or a multiple of recorded time."""

    kind: Literal["max", "events", "realtime"] = "max"
    value: float = 0.0

    def describe(self) -> str:
        if self.kind == "max":
            return "as fast as possible"
        if self.kind == "events":
            return f"{self.value:g} events/s"
        return f"{self.value:g}x recorded time"


def parse_rate(text: str | None) -> Rate:
    """``None``/``max`` → as fast as possible; ``N`` → N events/s; ``Nx`` → N × recorded time."""
    if text is None or text.strip().lower() in ("", "max"):
        return Rate()
    raw = text.strip().lower()
    kind: Literal["events", "realtime"] = "realtime" if raw.endswith("x") else "events"
    try:
        value = float(raw[:-1] if kind == "realtime" else raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):  # also refuses NaN
        raise UsageError(
            f"--rate {text!r}: use max (default), N events per second (e.g. 5000), or Nx "
            "a multiple of the recorded real time (e.g. 1x, 10x, 0.5x)"
        )
    return Rate(kind, value)


class Pacer:
    """When each played event is due; sleeps the caller until then (pure schedule + sleep)."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.start: float | None = None
        self.first_ts: int | None = None

    def due(self, index: int, timestamp_ms: int) -> float:
        """Seconds after the start at which event ``index`` (0-based) may be played."""
        if self.rate.kind == "events":
            return index / self.rate.value
        if self.rate.kind == "realtime":
            if self.first_ts is None:
                self.first_ts = timestamp_ms
            # Another partition's earlier message plays at once, never before the start.
            return max(0.0, (timestamp_ms - self.first_ts) / 1000.0 / self.rate.value)
        return 0.0

    def delay(self, index: int, timestamp_ms: int) -> float:
        """How long to wait before playing event ``index`` (0 when it is due)."""
        if self.rate.kind == "max":
            return 0.0
        now = self.clock()
        if self.start is None:
            self.start = now
        return max(0.0, self.start + self.due(index, timestamp_ms) - now)


# ====================================================================== writing files


@dataclass(slots=True)
class _Branch:
    index: int
    schema: WriterSchema
    #: Writer schema without logical types, and an empty reader schema of the same name:
    #: validating a body by skipping every field costs a third of decoding it.
    plain: Any
    skipper: Any
    table: tuple[str, str] | None
    #: The encoded ``value_schema`` field and union index, written with every record.
    tail: bytes


def _encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    parts = [encode_long(len(headers))]
    for hkey, hvalue in headers:
        parts.append(encode_bytes(hkey.encode()))
        parts.append(b"\x00" if hvalue is None else b"\x02" + encode_bytes(hvalue))
    parts.append(b"\x00")
    return b"".join(parts)


def file_header(metadata: Mapping[str, bytes], sync: bytes) -> bytes:
    """The object container file header: magic, metadata map, sync marker."""
    out = [OCF_MAGIC, encode_long(len(metadata))]
    for key, value in metadata.items():
        out.append(encode_bytes(key.encode()))
        out.append(encode_bytes(value))
    out.append(b"\x00")
    out.append(sync)
    return b"".join(out)


class ReplayWriter:
    """Writes a replay file: records are spooled, the header (which needs every writer schema
    met) is written when the file is finished; the file appears atomically (rename)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: folder {out.parent} does not exist")
        self.sync = os.urandom(SYNC_SIZE)
        self._one = encode_long(1)
        fd, spool = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".spool", dir=out.parent)
        self._spool_path = Path(spool)
        self._spool: BinaryIO = os.fdopen(fd, "wb", buffering=1 << 20)
        self.branches: list[_Branch] = []
        self._by_fp: dict[int, _Branch] = {}
        self._heads: dict[tuple[str, int], bytes] = {}
        self._headers: dict[tuple[tuple[str, bytes | None], ...], bytes] = {}
        self._last_ts: int | None = None
        self._last_ts_enc = b""
        self.records = 0
        self.raw = 0

    def branch_for(self, schema: WriterSchema) -> _Branch:
        """The union branch of ``schema``, assigned at first use (file order = union order)."""
        branch = self._by_fp.get(schema.fingerprint)
        if branch is None:
            index = FIRST_SCHEMA_BRANCH + len(self.branches)
            branch = _Branch(
                index,
                schema,
                parse_schema(json.loads(schema.canonical)),
                parse_schema({"type": "record", "name": schema.name, "fields": []}),
                table_of_schema(schema.name),
                b"\x02" + encode_bytes(schema.fingerprint_hex.encode()) + encode_long(index),
            )
            self.branches.append(branch)
            self._by_fp[schema.fingerprint] = branch
        return branch

    def write(
        self,
        topic: str,
        partition: int,
        *,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None,
        value: bytes | None,
        branch: _Branch | None,
    ) -> None:
        """Write one message; ``branch`` None stores the value as raw bytes.

        The hot path of recording: fields that repeat (topic and partition, headers, the last
        timestamp, the schema fields) are encoded once and cached.
        """
        head = self._heads.get((topic, partition))
        if head is None:
            head = self._heads[(topic, partition)] = encode_bytes(topic.encode()) + encode_long(
                partition
            )
        if timestamp_ms != self._last_ts:
            self._last_ts = timestamp_ms
            self._last_ts_enc = encode_long(timestamp_ms)
        if headers:
            hkey = tuple(headers)
            hdr = self._headers.get(hkey)
            if hdr is None:
                hdr = _encode_headers(headers)
                if len(self._headers) < 1000:  # headers that vary (e.g. DLQ reasons): no cache
                    self._headers[hkey] = hdr
        else:
            hdr = b"\x00"
        body: bytes | memoryview
        if branch is not None and value is not None:
            tail = branch.tail
            body = memoryview(value)[HEADER_SIZE:]
        elif value is None:
            tail, body = b"\x00" + encode_long(BRANCH_NULL), b""
        else:
            self.raw += 1
            fp = b"\x00"
            if len(value) >= HEADER_SIZE and value[:2] == MAGIC:
                fp = b"\x02" + encode_bytes(value[2:HEADER_SIZE][::-1].hex().encode())
            tail, body = fp + encode_long(BRANCH_RAW), encode_bytes(value)
        parts = [
            head,
            encode_long(offset),
            self._last_ts_enc,
            b"\x00" if key is None else b"\x02" + encode_bytes(key),
            hdr,
            tail,
            body,
        ]
        size = sum(map(len, parts))
        # One record per block: count 1, size, the record, the sync marker (module doc).
        self._spool.write(b"".join([self._one, encode_long(size), *parts, self.sync]))
        self.records += 1

    def finish(self, recording: Mapping[str, Any]) -> int:
        """Write the header and the records to ``out``; returns the file size in bytes."""
        self._spool.close()
        schema = file_schema(
            union_branches(
                [(f"{b.schema.fingerprint:016x}", json.loads(b.schema.json)) for b in self.branches]
            )
        )
        metadata = {
            "avro.schema": json.dumps(schema, separators=(",", ":")).encode(),
            "avro.codec": b"null",
            "cutover.format": FORMAT.encode(),
            "cutover.writer_schemas": json.dumps(
                {f"{b.schema.fingerprint:016x}": b.schema.json for b in self.branches}
            ).encode(),
            "cutover.recording": json.dumps(recording, sort_keys=True).encode(),
        }
        partial = self.out.with_name(f".{self.out.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            with partial.open("wb") as fh, self._spool_path.open("rb") as spool:
                fh.write(file_header(metadata, self.sync))
                while chunk := spool.read(1 << 22):
                    fh.write(chunk)
            os.replace(partial, self.out)
        finally:
            partial.unlink(missing_ok=True)
            self._spool_path.unlink(missing_ok=True)
        return self.out.stat().st_size

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)


# ====================================================================== reading files


@dataclass(frozen=True, slots=True)
class Recorded:
    """One recorded message; ``value`` holds the original message value bytes."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    fingerprint: str | None
    value: bytes | None


class ReplayFile:
    """A replay file opened for reading (a context manager); iterate for :class:`Recorded`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = path.open("rb")
        except FileNotFoundError:
            raise UsageError(f"{path}: no such replay file") from None
        except IsADirectoryError:
            raise UsageError(f"{path} is a folder, not a replay file") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if size < len(OCF_MAGIC) + SYNC_SIZE + 2:
                raise self._corrupt("too short to be an Avro object container file")
            self._buf = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse_header()
        except BaseException:
            self._fh.close()
            raise

    def _corrupt(self, problem: str) -> DecodeError:
        return DecodeError(f"{self.path}: not a valid cutover replay file: {problem}")

    def _parse_header(self) -> None:
        buf = self._buf
        if buf[:4] != OCF_MAGIC:
            raise self._corrupt(
                f"expected the Avro magic 4f626a01, found {bytes(buf[:4]).hex() or 'nothing'}"
            )
        meta: dict[str, bytes] = {}
        try:
            pos = 4
            while True:
                count, pos = read_long(buf, pos)
                if count == 0:
                    break
                if count < 0:  # a negative count is followed by the block's size in bytes
                    count = -count
                    _size, pos = read_long(buf, pos)
                for _ in range(count):
                    klen, pos = read_long(buf, pos)
                    key = bytes(buf[pos : pos + klen]).decode()
                    pos += klen
                    vlen, pos = read_long(buf, pos)
                    meta[key] = bytes(buf[pos : pos + vlen])
                    pos += vlen
            self.sync = bytes(buf[pos : pos + SYNC_SIZE])
            self._data_start = pos + SYNC_SIZE
        except (IndexError, UnicodeDecodeError):
            raise self._corrupt("truncated or damaged header") from None
        if len(self.sync) != SYNC_SIZE:
            raise self._corrupt("truncated header")
        self.metadata = meta
        if meta.get("cutover.format", b"").decode(errors="replace") != FORMAT:
            raise self._corrupt(
                f"an Avro file, but without cutover.format = {FORMAT} metadata: "
                "not written by `cutover replay record`"
            )
        try:
            self.schema: dict[str, Any] = json.loads(meta["avro.schema"])
            self.writer_schemas: dict[str, str] = json.loads(meta["cutover.writer_schemas"])
            self.recording: dict[str, Any] = json.loads(meta.get("cutover.recording", b"{}"))
        except (KeyError, ValueError) as exc:
            raise self._corrupt(f"bad metadata: {exc}") from None
        self.codec = meta.get("avro.codec", b"null").decode()
        if self.codec not in ("null", "deflate"):
            raise self._corrupt(f"codec {self.codec} is not supported (null or deflate)")
        self._store: SchemaStore | None = None
        self._parsed: Any = None

    @property
    def events(self) -> int | None:
        """How many messages the file holds, as recorded in its metadata."""
        value = self.recording.get("events")
        return int(value) if isinstance(value, int) else None

    def schema_store(self) -> SchemaStore:
        """Every writer schema of the file (and the heartbeat schema)."""
        if self._store is None:
            store = SchemaStore()
            store.add(heartbeat_schema())
            for fp, text in self.writer_schemas.items():
                ws = store.add_json(text)
                if ws.fingerprint_hex != fp:
                    raise self._corrupt(f"writer schema {fp} has fingerprint {ws.fingerprint_hex}")
            self._store = store
        return self._store

    def __enter__(self) -> ReplayFile:
        return self

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf is not None:
            buf.close()
        self._fh.close()

    def __iter__(self) -> Iterator[Recorded]:
        buf = self._buf
        end = len(buf)
        pos = self._data_start
        sync = self.sync
        fast = self.codec == "null"
        block = 0
        while pos < end:
            try:
                count, pos = read_long(buf, pos)
                size, pos = read_long(buf, pos)
            except IndexError:
                raise self._corrupt(f"truncated block header at byte {pos}") from None
            stop = pos + size
            if count < 0 or size < 0 or stop + SYNC_SIZE > end:
                raise self._corrupt(f"block {block} at byte {pos} runs past the end of the file")
            if buf[stop : stop + SYNC_SIZE] != sync:
                raise self._corrupt(f"block {block} at byte {pos} is damaged (sync marker)")
            if fast and count == 1:
                yield self._fast(buf, pos, stop, block)
            else:
                yield from self._generic(bytes(buf[pos:stop]), count, block)
            pos = stop + SYNC_SIZE
            block += 1

    def _fast(self, buf: Any, pos: int, stop: int, block: int) -> Recorded:
        """Parse one record whose value is the rest of its block (the module doc says why)."""
        try:
            n, pos = read_long(buf, pos)
            topic = bytes(buf[pos : pos + n]).decode()
            pos += n
            partition, pos = read_long(buf, pos)
            offset, pos = read_long(buf, pos)
            timestamp_ms, pos = read_long(buf, pos)
            has_key, pos = read_long(buf, pos)
            key: bytes | None = None
            if has_key:
                n, pos = read_long(buf, pos)
                key = bytes(buf[pos : pos + n])
                pos += n
            headers: list[tuple[str, bytes | None]] = []
            while True:
                count, pos = read_long(buf, pos)
                if count == 0:
                    break
                if count < 0:
                    count = -count
                    _size, pos = read_long(buf, pos)
                for _ in range(count):
                    n, pos = read_long(buf, pos)
                    hkey = bytes(buf[pos : pos + n]).decode()
                    pos += n
                    has_value, pos = read_long(buf, pos)
                    hvalue: bytes | None = None
                    if has_value:
                        n, pos = read_long(buf, pos)
                        hvalue = bytes(buf[pos : pos + n])
                        pos += n
                    headers.append((hkey, hvalue))
            has_fp, pos = read_long(buf, pos)
            fingerprint: str | None = None
            if has_fp:
                n, pos = read_long(buf, pos)
                fingerprint = bytes(buf[pos : pos + n]).decode()
                pos += n
            branch, pos = read_long(buf, pos)
            value: bytes | None
            if branch == BRANCH_NULL:
                value = None
            elif branch == BRANCH_RAW:
                n, pos = read_long(buf, pos)
                value = bytes(buf[pos : pos + n])
            elif fingerprint is not None and len(fingerprint) == 16:
                value = MAGIC + bytes.fromhex(fingerprint)[::-1] + bytes(buf[pos:stop])
            else:
                raise ValueError("a decoded value without its writer fingerprint")
        except (IndexError, ValueError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"record in block {block} is damaged ({exc})") from None
        return Recorded(
            topic, partition, offset, timestamp_ms, key, tuple(headers), fingerprint, value
        )

    def _generic(self, data: bytes, count: int, block: int) -> Iterator[Recorded]:
        """Blocks written by other tools: decode with fastavro, re-encode the value."""
        if self.codec == "deflate":
            try:
                data = zlib.decompress(data, -15)
            except zlib.error:
                raise self._corrupt(f"block {block} does not inflate") from None
        if self._parsed is None:
            self._parsed = parse_schema(self.schema)
        store = self.schema_store()
        stream = io.BytesIO(data)
        for _ in range(count):
            try:
                rec: dict[str, Any] = schemaless_reader(stream, self._parsed, None)  # type: ignore[assignment]
            except Exception as exc:  # fastavro raises many kinds for damaged data
                raise self._corrupt(f"record in block {block} is damaged ({exc})") from None
            fingerprint = rec.get("value_schema")
            value = rec.get("value")
            raw: bytes | None
            if value is None or isinstance(value, bytes):
                raw = value
            else:
                ws = store.get(int(fingerprint, 16)) if fingerprint else None
                if ws is None:
                    raise self._corrupt(f"a value of unknown writer schema {fingerprint}")
                out = io.BytesIO()
                out.write(ws.header)
                schemaless_writer(out, ws.parsed, value)
                raw = out.getvalue()
            yield Recorded(
                rec["topic"],
                rec["partition"],
                rec["offset"],
                rec["timestamp_ms"],
                rec["key"],
                tuple((h["key"], h["value"]) for h in rec["headers"]),
                fingerprint,
                raw,
            )


# ====================================================================== record


@dataclass(slots=True)
class RecordSummary:
    """What ``replay record`` wrote."""

    out: str
    topic: str
    partitions: dict[int, tuple[int, int]]
    scanned: int = 0
    events: int = 0
    raw_values: int = 0
    schemas: int = 0
    bytes: int = 0
    seconds: float = 0.0
    filters: dict[str, Any] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.scanned / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "topic": self.topic,
            "partitions": {str(p): {"from": a, "to": b} for p, (a, b) in self.partitions.items()},
            "scanned": self.scanned,
            "events": self.events,
            "raw_values": self.raw_values,
            "schemas": self.schemas,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s),
            "filters": self.filters,
        }


def schemas_topic_for(topic: str, kafka: KafkaSettings) -> str:
    """The schemas topic that goes with ``topic``: ``<prefix>.schemas`` for ``<prefix>.<x>``."""
    prefix, dot, _ = topic.rpartition(".")
    return f"{prefix}.schemas" if dot else kafka.schemas_topic


def _consumer_conf(kafka: KafkaSettings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        k: v
        for k, v in kafka.consumer.items()
        if k not in ("group.id", "group.instance.id", "partition.assignment.strategy")
    }
    conf.update(
        {
            "bootstrap.servers": kafka.bootstrap,
            # Required by the client; nothing is committed under it (assign, no auto commit).
            "group.id": f"cutover-replay-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            # Retention deleted the start of the range meanwhile: read what is left.
            "auto.offset.reset": "earliest",
        }
    )
    return conf


def _topic_partitions(consumer: Any, topic: str, bootstrap: str) -> list[int]:
    try:
        meta = consumer.list_topics(topic, timeout=10)
    except KafkaException as exc:
        raise kafka_error(exc, f"reading the metadata of {topic}") from None
    tmeta = meta.topics.get(topic)
    if tmeta is None or tmeta.error is not None or not tmeta.partitions:
        raise UsageError(f"topic {topic} does not exist on {bootstrap}")
    return sorted(tmeta.partitions)


def plan_ranges(
    partitions: Sequence[int],
    watermarks: Mapping[int, tuple[int, int]],
    filters: Filters,
    time_starts: Mapping[int, int] | None = None,
    time_ends: Mapping[int, int] | None = None,
) -> dict[int, tuple[int, int]]:
    """Per partition the offsets [start, end) to read (pure).

    ``watermarks`` are (low, high) at start; ``time_starts``/``time_ends`` are the offsets Kafka
    gave for the from/to times (-1: no message at or after that time).
    """
    out: dict[int, tuple[int, int]] = {}
    for p in partitions:
        if filters.partitions is not None and p not in filters.partitions:
            continue
        low, high = watermarks[p]
        start, end = low, high
        if filters.from_offset is not None:
            start = max(low, filters.from_offset)
        if time_starts is not None and p in time_starts:
            start = high if time_starts[p] < 0 else max(low, time_starts[p])
        start = min(start, high)
        if filters.to_offset is not None:
            end = min(high, filters.to_offset)
        if time_ends is not None and p in time_ends and time_ends[p] >= 0:
            end = min(high, time_ends[p])
        out[p] = (start, max(start, end))
    return out


def _schema_reader(kafka: KafkaSettings, topic: str, schemas_topic: str | None) -> SchemaReader:
    name = schemas_topic or schemas_topic_for(topic, kafka)
    if not name.endswith(".schemas"):
        raise UsageError(f"--schemas-topic {name}: schemas topics are named <prefix>.schemas")
    # SchemaReader reads <topic_prefix>.schemas.
    sub = dataclasses.replace(kafka, topic_prefix=name.removesuffix(".schemas"))
    return SchemaReader(sub, REPLAY_GROUP)


def record(
    kafka: KafkaSettings,
    topic: str,
    out: Path,
    filters: Filters,
    *,
    schemas_topic: str | None = None,
    progress: ProgressFn | None = None,
    idle_timeout_s: float = 30.0,
) -> RecordSummary:
    """Record ``topic`` (the range and filters of ``filters``) to the replay file ``out``.

    Raises UsageError for an unknown topic or partition, an empty range, or a range in which no
    message passed the content filters (no file is written then).
    """
    started = time.monotonic()
    consumer = Consumer(_consumer_conf(kafka))
    try:
        partitions = _topic_partitions(consumer, topic, kafka.bootstrap)
        missing = sorted((filters.partitions or frozenset()) - set(partitions))
        if missing:
            raise UsageError(
                f"topic {topic} has partitions 0-{max(partitions)}; no partition {missing[0]}"
            )
        try:
            marks = {
                p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in partitions
            }
            time_starts = _offsets_for_time(consumer, topic, partitions, filters.from_time_ms)
            time_ends = _offsets_for_time(consumer, topic, partitions, filters.to_time_ms)
        except KafkaException as exc:
            raise kafka_error(exc, f"reading the offsets of {topic}") from None
        ranges = plan_ranges(partitions, marks, filters, time_starts, time_ends)
        total = sum(end - start for start, end in ranges.values())
        if total == 0:
            shown = ", ".join(f"[{p}] {a}-{b}" for p, (a, b) in sorted(ranges.items()))
            raise UsageError(
                f"the range holds no messages in {topic} (offsets per partition: "
                f"{shown or 'none'}): nothing recorded"
            )
        ranges = {p: r for p, r in ranges.items() if r[1] > r[0]}
        summary = RecordSummary(str(out), topic, ranges, filters=filters.as_json())
        reader = _schema_reader(kafka, topic, schemas_topic)
        try:
            writer = ReplayWriter(out)
            try:
                reader.refresh()
                _Recorder(
                    consumer,
                    topic,
                    filters=filters,
                    reader=reader,
                    writer=writer,
                    progress=progress,
                    total=total,
                ).run(ranges, idle_timeout_s, summary)
                if writer.records == 0:
                    raise UsageError(
                        f"no message of the range matched the filters ({summary.scanned} "
                        "scanned): nothing recorded"
                    )
                summary.events = writer.records
                summary.raw_values = writer.raw
                summary.schemas = len(writer.branches)
                summary.bytes = writer.finish(
                    {
                        "topic": topic,
                        "partitions": {str(p): [a, b] for p, (a, b) in ranges.items()},
                        "filters": filters.as_json(),
                        "events": writer.records,
                        "raw_values": writer.raw,
                        "recorded_at": datetime.now(UTC).isoformat(),
                        "schemas_topic": reader.topic,
                    }
                )
            except BaseException:
                writer.abort()
                raise
        finally:
            reader.close()
    finally:
        consumer.close()
    summary.seconds = time.monotonic() - started
    log().info("replay.recorded", **{k: v for k, v in summary.as_json().items() if k != "filters"})
    return summary


def _offsets_for_time(
    consumer: Any, topic: str, partitions: Sequence[int], when_ms: int | None
) -> dict[int, int] | None:
    if when_ms is None:
        return None
    found = consumer.offsets_for_times(
        [TopicPartition(topic, p, when_ms) for p in partitions], timeout=10
    )
    return {tp.partition: tp.offset for tp in found}


class _Recorder:
    """The record loop: read every partition from its start to its end, write what passes."""

    def __init__(
        self,
        consumer: Any,
        topic: str,
        *,
        filters: Filters,
        reader: SchemaReader,
        writer: ReplayWriter,
        progress: ProgressFn | None,
        total: int,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.filters = filters
        self.reader = reader
        self.writer = writer
        self.progress = progress
        self.total = total
        #: Branch per fingerprint; None: unknown even after re-reading the schemas topic.
        self.by_fp: dict[int, _Branch | None] = {}

    def branch(self, value: bytes | None) -> _Branch | None:
        """The union branch that stores ``value`` decoded, or None (stored as raw bytes)."""
        if value is None or len(value) < HEADER_SIZE or value[:2] != MAGIC:
            return None
        fp = int.from_bytes(value[2:HEADER_SIZE], "little")
        if fp in self.by_fp:
            branch = self.by_fp[fp]
        else:
            ws = self.reader.store.get(fp)
            if ws is None:
                self.reader.refresh()  # a schema published after the recording started
                ws = self.reader.store.get(fp)
            branch = self.by_fp[fp] = self.writer.branch_for(ws) if ws is not None else None
        if branch is not None and not _valid_body(branch, value):
            return None
        return branch

    def run(
        self, ranges: Mapping[int, tuple[int, int]], idle_timeout_s: float, summary: RecordSummary
    ) -> None:
        topic, filters, writer, consumer = self.topic, self.filters, self.writer, self.consumer
        pending = dict(ranges)
        #: Next offset expected per partition: what is left bounds the batch asked for, since
        #: consume() waits for a full batch (or its timeout) before it returns.
        nxt = {p: start for p, (start, _e) in pending.items()}
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _e) in pending.items()])
        eof = RdKafkaError._PARTITION_EOF
        by_content = filters.by_content
        by_time = filters.from_time_ms is not None or filters.to_time_ms is not None
        scanned = 0
        reported = 0
        last_message = time.monotonic()
        while pending:
            left = sum(end - nxt[p] for p, (_s, end) in pending.items())
            try:
                msgs = consumer.consume(max(1, min(10_000, left)), 0.2)
            except KafkaException as exc:
                raise kafka_error(exc, f"reading {topic}") from None
            if not msgs:
                if time.monotonic() - last_message > idle_timeout_s:
                    raise KafkaError(
                        f"no message from {topic} for {idle_timeout_s:.0f}s while partitions "
                        f"{sorted(pending)} were not read to their end; is the broker up?"
                    )
                continue
            last_message = time.monotonic()
            done: list[int] = []
            for msg in msgs:
                err = msg.error()
                partition = msg.partition()
                if err is not None:
                    if err.code() != eof:
                        raise KafkaError(f"reading {topic}: {err.str()}", code=err.name())
                    # The end of the log, which is at or past the range's end.
                    if pending.pop(partition, None) is not None:
                        done.append(partition)
                    continue
                span = pending.get(partition)
                if span is None:
                    continue
                offset = msg.offset()
                if offset >= span[1]:
                    del pending[partition]
                    done.append(partition)
                    continue
                nxt[partition] = offset + 1
                if offset + 1 >= span[1]:
                    del pending[partition]
                    done.append(partition)
                scanned += 1
                ts = msg.timestamp()[1]
                # Offsets come from the times, but a message may carry an earlier timestamp
                # than its predecessor (producer clocks): filter on the time exactly too.
                if by_time and not filters.position(partition, offset, ts):
                    continue
                value = msg.value()
                branch = self.branch(value)
                key = msg.key()
                if by_content and not filters.content(key, branch.table if branch else None):
                    continue
                writer.write(
                    topic,
                    partition,
                    offset=offset,
                    timestamp_ms=ts,
                    key=key,
                    headers=msg.headers(),
                    value=value,
                    branch=branch,
                )
            if done:
                consumer.pause([TopicPartition(topic, p) for p in done])
            if self.progress is not None and scanned - reported >= 2000:
                self.progress(scanned, self.total)
                reported = scanned
        summary.scanned = scanned
        if self.progress is not None:
            self.progress(scanned, self.total)


def _valid_body(branch: _Branch, value: bytes) -> bool:
    """Whether ``value``'s body is a complete encoding under its writer schema, nothing left
    over: a damaged body stored as a union branch would make the file unreadable. Read with an
    empty reader schema, so fastavro skips every field instead of building objects."""
    stream = io.BytesIO(value)
    stream.seek(HEADER_SIZE)
    try:
        schemaless_reader(stream, branch.plain, branch.skipper)
    except Exception:  # fastavro raises many kinds for damaged data
        return False
    return stream.tell() == len(value)


# ====================================================================== play


@dataclass(slots=True)
class PlaySummary:
    """What ``replay play`` did."""

    source: str
    destination: str
    rate: str
    played: int = 0
    skipped: int = 0
    dead_letters: int = 0
    upserted: int = 0
    deleted: int = 0
    open_units_at_end: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.played / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "destination": self.destination,
            "rate": self.rate,
            "played": self.played,
            "skipped": self.skipped,
            "dead_letters": self.dead_letters,
            "upserted": self.upserted,
            "deleted": self.deleted,
            "open_units_at_end": self.open_units_at_end,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s),
        }


def _selected(replay: ReplayFile, filters: Filters, summary: PlaySummary) -> Iterator[Recorded]:
    """The file's records that pass ``filters`` (``summary.skipped`` counts the others)."""
    store = replay.schema_store() if filters.tables is not None else None
    tables: dict[str | None, tuple[str, str] | None] = {None: None}
    for rec in replay:
        if not filters.position(rec.partition, rec.offset, rec.timestamp_ms):
            summary.skipped += 1
            continue
        if filters.by_content:
            table = None
            if store is not None:
                if rec.fingerprint not in tables:
                    ws = store.get(int(rec.fingerprint, 16)) if rec.fingerprint else None
                    tables[rec.fingerprint] = table_of_schema(ws.name) if ws else None
                table = tables[rec.fingerprint]
            if not filters.content(rec.key, table):
                summary.skipped += 1
                continue
        yield rec


def play_to_topic(
    kafka: KafkaSettings,
    path: Path,
    topic: str,
    filters: Filters,
    rate: Rate,
    *,
    schemas_topic: str | None = None,
    progress: ProgressFn | None = None,
    timeout_s: float = 60.0,
) -> PlaySummary:
    """Re-publish the file's messages to ``topic``: same partition numbers, keys, headers and
    value bytes, in file order (per-partition order kept; idempotent producer)."""
    started = time.monotonic()
    summary = PlaySummary(str(path), topic, rate.describe())
    with ReplayFile(path) as replay:
        needed = [int(p) for p in replay.recording.get("partitions", {})]
        probe = Consumer(_consumer_conf(kafka))
        try:
            have = _topic_partitions(probe, topic, kafka.bootstrap)
            schemas = schemas_topic or schemas_topic_for(topic, kafka)
            try:
                smeta = probe.list_topics(schemas, timeout=10).topics.get(schemas)
            except KafkaException as exc:
                raise kafka_error(exc, f"reading the metadata of {schemas}") from None
            has_schemas = smeta is not None and smeta.error is None and bool(smeta.partitions)
        finally:
            probe.close()
        if needed and max(needed) >= len(have):
            raise UsageError(
                f"topic {topic} has {len(have)} partitions, the file holds partition "
                f"{max(needed)}: partition numbers are kept, so {topic} needs at least "
                f"{max(needed) + 1}"
            )
        conf: dict[str, Any] = {
            "linger.ms": 20,
            "batch.size": 1 << 20,
            **kafka.producer,
            "bootstrap.servers": kafka.bootstrap,
            # Order per partition survives retries only with idempotence.
            "enable.idempotence": True,
            "acks": "all",
        }
        producer = Producer(conf)
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None and len(failures) < 10:
                failures.append(f"{err.str()} ({err.name()})")

        if has_schemas:
            # What the producer does: every writer schema on the compacted schemas topic, so a
            # consumer of `topic` can decode what we play.
            for fp, text in replay.writer_schemas.items():
                producer.produce(schemas, key=fp.encode(), value=text.encode())
        else:
            log().warning("replay.schemas_not_published", schemas_topic=schemas)
        total = replay.events or 0
        pacer = Pacer(rate)
        produce = producer.produce
        played = 0
        for rec in _selected(replay, filters, summary):
            wait = pacer.delay(played, rec.timestamp_ms)
            if wait > 0:
                producer.poll(0)
                time.sleep(wait)
            kwargs: dict[str, Any] = {
                "value": rec.value,
                "key": rec.key,
                "partition": rec.partition,
                "on_delivery": on_delivery,
            }
            if rec.headers:
                kwargs["headers"] = list(rec.headers)
            while True:
                try:
                    produce(topic, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.05)
                except KafkaException as exc:
                    raise kafka_error(exc, f"producing to {topic}") from None
            played += 1
            if played % 5000 == 0:
                producer.poll(0)
                if failures:
                    break
                if progress is not None:
                    progress(played + summary.skipped, total)
        remaining = producer.flush(timeout_s)
        if failures:
            raise KafkaError(f"messages not delivered to {topic}: {failures[0]}")
        if remaining:
            raise KafkaError(f"{remaining} messages not acknowledged by {topic} in {timeout_s}s")
        summary.played = played
        if progress is not None:
            progress(played + summary.skipped, total)
    summary.seconds = time.monotonic() - started
    log().info("replay.played", **summary.as_json())
    return summary


def play_to_target(
    settings: Settings,
    path: Path,
    dsn: str,
    filters: Filters,
    rate: Rate,
    *,
    batch_events: int | None = None,
    progress: ProgressFn | None = None,
) -> PlaySummary:
    """Apply the file's change events to the commerce database ``dsn`` through the apply path
    of ``cutover apply`` (:class:`consumers.sink.Sink`: mapping, position guards, tombstones).

    Commits happen where no partition is inside a source transaction (per-aggregate atomicity
    as in ``cutover apply``); a long one is applied in sub-batches of one database transaction.
    Poison messages are recorded in ``cutover.dead_letters`` (group ``cutover-replay``), not sent
    to a topic. Offsets are not stored: a sandbox has no consumer to resume.
    """
    started = time.monotonic()
    summary = PlaySummary(str(path), f"database {redact_dsn(dsn)}", rate.describe())
    batch_max = batch_events or settings.apply.batch_max_events
    if batch_max <= 0:
        raise UsageError("--batch-events must be positive")
    mapping = load_mapping(settings.mapping_path)
    control = settings.target.control_schema
    domain_of = {settings.kafka.topic(d): d for d in mapping.domains}
    with ReplayFile(path) as replay:
        store = replay.schema_store()
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                                   application_name="cutover-replay")  # fmt: skip
        except psycopg.Error as exc:
            raise translate(exc, "connecting to the sandbox") from None
        with conn:
            sink = Sink(conn, mapping, control)
            _check_sandbox(sink, control, mapping.target_schema)
            total = replay.events or 0
            pacer = Pacer(rate)
            batch: list[Change] = []
            refs: list[Recorded] = []
            letters: list[DeadLetter] = []
            open_parts: set[tuple[str, int]] = set()
            in_tx = False

            def flush(commit: bool) -> None:
                nonlocal in_tx
                if not batch and not letters and not (commit and in_tx):
                    return
                if not in_tx:
                    sink.begin()
                    in_tx = True
                stats, failures = sink.apply(batch)
                summary.upserted += stats.upserted
                summary.deleted += stats.deleted
                for i, error in failures:
                    rec = refs[i]
                    letters.append(_letter(rec, error, domain_of, batch[i].table))
                if letters:
                    sink.record_dead_letters([x.db_row(REPLAY_GROUP) for x in letters])
                    summary.dead_letters += len(letters)
                batch.clear()
                refs.clear()
                letters.clear()
                if commit:
                    sink.commit()
                    in_tx = False

            try:
                for rec in _selected(replay, filters, summary):
                    wait = pacer.delay(summary.played, rec.timestamp_ms)
                    if wait > 0:
                        flush(commit=not open_parts)  # show progress while waiting
                        time.sleep(wait)
                    tp = (rec.topic, rec.partition)
                    summary.played += 1
                    try:
                        if rec.value is None:
                            raise DecodeError("message has no value (null)")
                        ws, value = store.decode(rec.value)
                        event = from_record(ws.name, value)
                    except DecodeError as exc:
                        # Like closed_prefix: an undecodable message closes only at a boundary.
                        letters.append(_letter(rec, exc, domain_of, None))
                        continue
                    if event.closes:
                        open_parts.discard(tp)
                    else:
                        open_parts.add(tp)
                    if isinstance(event, Change):
                        batch.append(event)
                        refs.append(rec)
                    if len(batch) >= batch_max:
                        flush(commit=not open_parts)
                        if progress is not None:
                            progress(summary.played + summary.skipped, total)
                summary.open_units_at_end = len(open_parts)
                if open_parts:
                    log().warning(
                        "replay.open_units_at_end",
                        partitions=sorted(f"{t}[{p}]" for t, p in open_parts),
                    )
                flush(commit=True)
            except BaseException:
                sink.rollback()
                raise
    if progress is not None:
        progress(summary.played + summary.skipped, total)
    summary.seconds = time.monotonic() - started
    log().info("replay.played", **summary.as_json())
    return summary


def _check_sandbox(sink: Sink, control: str, target_schema: str) -> None:
    for name in (f"{control}.tombstones", f"{control}.dead_letters"):
        row = sink.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        if row is None or row[0] is None:
            raise DatabaseError(
                f"the sandbox has no control table {name}: run `cutover init` against it "
                "(or load cutover/control.sql) first",
                side="target",
            )
    row = sink.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (target_schema,)).fetchone()
    if row is None:
        raise DatabaseError(
            f"the sandbox has no schema {target_schema}: load the commerce DDL first "
            "(e.g. `cutover init --target-ddl examples/shop/commerce.sql`)",
            side="target",
        )


def _letter(
    rec: Recorded, error: CutoverError, domain_of: Mapping[str, str], table: str | None
) -> DeadLetter:
    return DeadLetter(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
        value=rec.value,
        error=error,
        domain=domain_of.get(rec.topic),
        source_table=table,
    )


__all__ = [
    "FORMAT",
    "Filters",
    "Pacer",
    "PlaySummary",
    "Rate",
    "RecordSummary",
    "Recorded",
    "ReplayFile",
    "ReplayWriter",
    "file_schema",
    "make_filters",
    "parse_rate",
    "parse_time",
    "plan_ranges",
    "play_to_target",
    "play_to_topic",
    "record",
    "union_branches",
]
