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

from consumers.replay.avro import (
    FORMAT,
    REPLAY_GROUP,
    encode_long,
    file_schema,
    read_long,
    union_branches,
)
from consumers.replay.filters import (
    Filters,
    Pacer,
    ProgressFn,
    Rate,
    make_filters,
    parse_rate,
    parse_time,
    plan_ranges,
    table_of_schema,
)
from consumers.replay.play import PlaySummary, play_to_topic
from consumers.replay.reader import Recorded, ReplayFile
from consumers.replay.record import RecordSummary, record
from consumers.replay.target import check_live_target, play_to_target
from consumers.replay.writer import ReplayWriter

__all__ = [
    "FORMAT",
    "REPLAY_GROUP",
    "Filters",
    "Pacer",
    "PlaySummary",
    "ProgressFn",
    "Rate",
    "RecordSummary",
    "Recorded",
    "ReplayFile",
    "ReplayWriter",
    "check_live_target",
    "encode_long",
    "file_schema",
    "make_filters",
    "parse_rate",
    "parse_time",
    "plan_ranges",
    "play_to_target",
    "play_to_topic",
    "read_long",
    "record",
    "table_of_schema",
    "union_branches",
]
