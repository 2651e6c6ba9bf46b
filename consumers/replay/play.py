"""`cutover replay play`: a replay file into a topic or a sandbox commerce database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from structlog.typing import FilteringBoundLogger

from consumers.replay.filters import Filters, Pacer, ProgressFn, Rate, table_of_schema
from consumers.replay.reader import Recorded, ReplayFile
from consumers.replay.record import replay_consumer, schemas_topic_for, topic_partitions
from cutover import kafka as kafka_clients
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


def selected(replay: ReplayFile, filters: Filters, summary: PlaySummary) -> Iterator[Recorded]:
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
        schemas = schemas_topic or schemas_topic_for(topic, kafka)
        has_schemas = _check_topics(kafka, replay, topic, schemas)
        out = _Publisher(kafka, topic)
        if has_schemas:
            # What the producer does: every writer schema on the compacted schemas topic, so a
            # consumer of `topic` can decode what we play.
            for fp, text in replay.writer_schemas.items():
                out.producer.produce(schemas, key=fp.encode(), value=text.encode())
        else:
            log().warning("replay.schemas_not_published", schemas_topic=schemas)
        total = replay.events or 0
        pacer = Pacer(rate)
        for rec in selected(replay, filters, summary):
            wait = pacer.delay(summary.played, rec.timestamp_ms)
            if wait > 0:
                out.producer.poll(0)
                time.sleep(wait)
            out.send(rec)
            summary.played += 1
            if summary.played % 5000 == 0:
                out.producer.poll(0)
                if out.failures:
                    break
                if progress is not None:
                    progress(summary.played + summary.skipped, total)
        out.finish(timeout_s)
        if progress is not None:
            progress(summary.played + summary.skipped, total)
    summary.seconds = time.monotonic() - started
    log().info("replay.played", **summary.as_json())
    return summary


def _check_topics(kafka: KafkaSettings, replay: ReplayFile, topic: str, schemas: str) -> bool:
    """UsageError unless ``topic`` has the file's partitions; whether ``schemas`` exists."""
    needed = [int(p) for p in replay.recording.get("partitions", {})]
    probe = replay_consumer(kafka)
    try:
        have = topic_partitions(probe, topic, kafka.bootstrap)
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
    return has_schemas


class _Publisher:
    """The producer of ``play --to-topic``: idempotent, records the first delivery failures."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.topic = topic
        # Order per partition survives retries only with idempotence (mandatory in cutover.kafka).
        self.producer = kafka_clients.producer(kafka, "replay")
        self.failures: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None and len(self.failures) < 10:
            self.failures.append(f"{err.str()} ({err.name()})")

    def send(self, rec: Recorded) -> None:
        kwargs: dict[str, Any] = {
            "value": rec.value,
            "key": rec.key,
            "partition": rec.partition,
            "on_delivery": self._on_delivery,
        }
        if rec.headers:
            kwargs["headers"] = list(rec.headers)
        while True:
            try:
                self.producer.produce(self.topic, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise kafka_error(exc, f"producing to {self.topic}") from None

    def finish(self, timeout_s: float) -> None:
        """Wait for every acknowledgement; KafkaError on a failed or missing one."""
        remaining = self.producer.flush(timeout_s)
        if self.failures:
            raise KafkaError(f"messages not delivered to {self.topic}: {self.failures[0]}")
        if remaining:
            raise KafkaError(
                f"{remaining} messages not acknowledged by {self.topic} in {timeout_s}s"
            )
