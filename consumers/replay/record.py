"""`cutover replay record`: a topic range to a replay file."""

from __future__ import annotations

import dataclasses
import io
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, TopicPartition
from fastavro import schemaless_reader
from structlog.typing import FilteringBoundLogger

from consumers.replay.avro import REPLAY_GROUP
from consumers.replay.filters import Filters, ProgressFn, plan_ranges
from consumers.replay.writer import Branch, ReplayWriter
from consumers.schemas import SchemaReader
from cutover import kafka as kafka_clients
from cutover.codec import HEADER_SIZE, MAGIC
from cutover.config import KafkaSettings
from cutover.errors import (
    KafkaError,
    UsageError,
)
from cutover.kafka import translate as kafka_error
from cutover.logging import get_logger


def log() -> FilteringBoundLogger:
    # Looked up at each use: a logger bound before cutover.logging.configure() keeps defaults.
    return get_logger(__name__)


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


def replay_consumer(kafka: KafkaSettings) -> Any:
    """An assign-only consumer (cutover.kafka purpose "replay": never commits, EOF events)."""
    # Required by the client; nothing is committed under the group (assign, no auto commit).
    return kafka_clients.consumer(
        kafka, "replay", group_id=f"cutover-replay-{uuid.uuid4().hex[:12]}"
    )


def topic_partitions(consumer: Any, topic: str, bootstrap: str) -> list[int]:
    try:
        meta = consumer.list_topics(topic, timeout=10)
    except KafkaException as exc:
        raise kafka_error(exc, f"reading the metadata of {topic}") from None
    tmeta = meta.topics.get(topic)
    if tmeta is None or tmeta.error is not None or not tmeta.partitions:
        raise UsageError(f"topic {topic} does not exist on {bootstrap}")
    return sorted(tmeta.partitions)


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
    consumer = replay_consumer(kafka)
    try:
        ranges = _ranges(consumer, kafka, topic, filters)
        total = sum(end - start for start, end in ranges.values())
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


def _ranges(
    consumer: Any, kafka: KafkaSettings, topic: str, filters: Filters
) -> dict[int, tuple[int, int]]:
    """The offsets to read per partition; UsageError for an unknown partition or no message."""
    partitions = topic_partitions(consumer, topic, kafka.bootstrap)
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
    if not any(end > start for start, end in ranges.values()):
        shown = ", ".join(f"[{p}] {a}-{b}" for p, (a, b) in sorted(ranges.items()))
        raise UsageError(
            f"the range holds no messages in {topic} (offsets per partition: "
            f"{shown or 'none'}): nothing recorded"
        )
    return ranges


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
        self.by_time = filters.from_time_ms is not None or filters.to_time_ms is not None
        #: Branch per fingerprint; None: unknown even after re-reading the schemas topic.
        self.by_fp: dict[int, Branch | None] = {}

    def branch(self, value: bytes | None) -> Branch | None:
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
        topic, consumer = self.topic, self.consumer
        pending = dict(ranges)
        #: Next offset expected per partition: what is left bounds the batch asked for, since
        #: consume() waits for a full batch (or its timeout) before it returns.
        nxt = {p: start for p, (start, _e) in pending.items()}
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _e) in pending.items()])
        eof = RdKafkaError._PARTITION_EOF
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
                self._write(msg, partition, offset)
            if done:
                consumer.pause([TopicPartition(topic, p) for p in done])
            if self.progress is not None and scanned - reported >= 2000:
                self.progress(scanned, self.total)
                reported = scanned
        summary.scanned = scanned
        if self.progress is not None:
            self.progress(scanned, self.total)

    def _write(self, msg: Any, partition: int, offset: int) -> None:
        """Write one message of the range, unless the time or content filters drop it."""
        filters = self.filters
        ts = msg.timestamp()[1]
        # Offsets come from the times, but a message may carry an earlier timestamp than its
        # predecessor (producer clocks): filter on the time exactly too.
        if self.by_time and not filters.position(partition, offset, ts):
            return
        value = msg.value()
        branch = self.branch(value)
        key = msg.key()
        if filters.by_content and not filters.content(key, branch.table if branch else None):
            return
        self.writer.write(
            self.topic,
            partition,
            offset=offset,
            timestamp_ms=ts,
            key=key,
            headers=msg.headers(),
            value=value,
            branch=branch,
        )


def _valid_body(branch: Branch, value: bytes) -> bool:
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
