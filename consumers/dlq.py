"""Dead letters: poison messages to ``<prefix>.dlq`` and ``cutover.dead_letters``; list, retry.

A poison message is one the apply path cannot apply: undecodable bytes, an Avro fingerprint
still unknown after re-reading the schemas topic, a row the mapping cannot map
(:class:`~cutover.errors.UnmappableRow`), or data the commerce database refuses (a constraint
violation, isolated from the good rows of its batch by :class:`consumers.sink.Sink`). It is never
skipped silently:

* the original message goes to the dead-letter topic: same key, same value bytes, and headers
  ``cutover.source_topic``, ``cutover.source_partition``, ``cutover.source_offset``,
  ``cutover.error_class``, ``cutover.error``;
* a row goes into ``cutover.dead_letters`` (with the payload) in the same database transaction
  as the batch, so the offsets never move past a poison message that was not recorded.

With ``apply.dlq_policy = "halt"`` the consumer instead stops with :class:`PoisonHalt` (exit 3)
naming topic, partition, offset and reason, without storing offsets past it.

``cutover dlq retry`` re-decodes the stored payloads with the current schemas and mapping and
applies them through the same sink (position guards included): an event older than what the
commerce row holds is a successful no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from confluent_kafka import KafkaException, Producer
from structlog.typing import FilteringBoundLogger

from consumers import sql as q
from consumers.events import Change, from_record
from consumers.schemas import SchemaReader, kafka_error
from consumers.sink import Sink, translate
from cutover.config import Settings
from cutover.errors import CutoverError, DecodeError, KafkaError, RuntimeFailure
from cutover.logging import get_logger
from cutover.mapping import load_mapping


def log() -> FilteringBoundLogger:
    # Looked up at each use, not at import: a logger bound before cutover.logging.configure()
    # runs would keep structlog's defaults (console renderer on stdout).
    return get_logger(__name__)


HEADER_MAX = 2000  # header values are for people and tools; the table keeps the full text


class PoisonHalt(RuntimeFailure):
    """``dlq_policy = "halt"`` met a poison message (exit 3); offsets stay before it."""

    def __init__(self, topic: str, partition: int, offset: int, error: CutoverError) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.error = error
        super().__init__(
            f"poison message at {topic} [{partition}] offset {offset} "
            f"({type(error).__name__}): {error.message}; dlq_policy is 'halt', so the consumer "
            "stopped without storing offsets past it. Fix the mapping or the data, or set "
            '[apply] dlq_policy = "dlq" to route such messages to the dead-letter topic'
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One poison message and why."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: CutoverError
    domain: str | None = None
    source_table: str | None = None

    @property
    def error_class(self) -> str:
        return type(self.error).__name__

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [
            ("cutover.source_topic", self.topic.encode()),
            ("cutover.source_partition", str(self.partition).encode()),
            ("cutover.source_offset", str(self.offset).encode()),
            ("cutover.error_class", self.error_class.encode()),
            ("cutover.error", self.error.message[:HEADER_MAX].encode()),
        ]

    def db_row(self, group_id: str) -> tuple[object, ...]:
        """The ``cutover.dead_letters`` row, in :data:`consumers.sql.DEAD_LETTER_COLUMNS` order."""
        return (
            group_id,
            self.domain,
            self.topic,
            self.partition,
            self.offset,
            self.key,
            self.value,
            self.error_class,
            self.error.message,
            self.source_table,
        )


class DlqPublisher:
    """Produces dead letters (idempotent producer, acks=all); :meth:`flush` waits for Kafka."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.kafka.dlq_topic
        conf: dict[str, Any] = {
            "bootstrap.servers": settings.kafka.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            **settings.kafka.producer,
        }
        self._producer = Producer(conf)
        self._failures: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._failures.append(f"{err.str()} ({err.name()})")

    def send(self, letters: Sequence[DeadLetter]) -> None:
        for letter in letters:
            try:
                self._producer.produce(
                    self.topic,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.headers(),
                    on_delivery=self._on_delivery,
                )
            except BufferError:
                self._producer.flush(10)
                self._producer.produce(
                    self.topic,
                    value=letter.value,
                    key=letter.key,
                    headers=letter.headers(),
                    on_delivery=self._on_delivery,
                )
            except KafkaException as exc:
                raise kafka_error(exc, f"producing to {self.topic}") from None
            log().warning(
                "dlq.sent",
                topic=letter.topic,
                partition=letter.partition,
                offset=letter.offset,
                error_class=letter.error_class,
                error=letter.error.message,
                dlq_topic=self.topic,
            )

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until Kafka acknowledged every dead letter sent; KafkaError otherwise."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise KafkaError(f"{remaining} dead letters not acknowledged by {self.topic} in time")
        if self._failures:
            failures, self._failures = self._failures, []
            raise KafkaError(f"dead letters not delivered to {self.topic}: {failures[0]}")

    def close(self) -> None:
        self._producer.flush(10)


# ------------------------------------------------------------------------- cutover dlq list


@dataclass(frozen=True, slots=True)
class LetterRow:
    id: int
    group_id: str
    domain: str | None
    topic: str
    partition: int
    offset: int
    source_table: str | None
    error_class: str
    error_message: str
    status: str
    created_at: datetime
    resolved_at: datetime | None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "group_id": self.group_id,
            "domain": self.domain,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "source_table": self.source_table,
            "error_class": self.error_class,
            "error": self.error_message,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
        }


def list_dead_letters(settings: Settings, status: str | None) -> list[LetterRow]:
    control = settings.target.control_schema
    try:
        with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
            rows = conn.execute(
                q.list_dead_letters(control, status=status is not None), {"status": status}
            ).fetchall()
    except psycopg.Error as exc:
        raise translate(exc, "listing dead letters") from exc
    return [LetterRow(*row) for row in rows]


# ------------------------------------------------------------------------- cutover dlq retry


@dataclass(slots=True)
class RetryReport:
    retried: list[int] = field(default_factory=list)
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # id, class, message

    def as_json(self) -> dict[str, object]:
        return {
            "retried": self.retried,
            "failed": [{"id": i, "error_class": c, "error": m} for i, c, m in self.failed],
        }


def retry_dead_letters(settings: Settings, letter_id: int | None) -> RetryReport:
    """Re-drive open dead letters (one by id, or all) through decode, mapping and the sink.

    One database transaction: each letter that applies is marked 'retried'; one that fails again
    stays 'open' with its new error. Offsets are not touched (the consumers moved on long ago).
    """
    mapping = load_mapping(settings.mapping_path)
    reader = SchemaReader(settings.kafka, settings.apply.group_id)
    try:
        reader.refresh()
    finally:
        reader.close()
    control = settings.target.control_schema
    report = RetryReport()
    try:
        conn = psycopg.connect(settings.target.dsn, autocommit=True)
    except psycopg.Error as exc:
        raise translate(exc, "connecting") from exc
    with conn:
        sink = Sink(conn, mapping, control)
        sink.begin()
        try:
            letters = sink.execute(
                q.open_dead_letters(control, by_id=letter_id is not None), {"id": letter_id}
            ).fetchall()
            for lid, topic, partition, offset, _key, payload in letters:
                error = _retry_one(sink, reader, payload if isinstance(payload, bytes) else None)
                if error is None:
                    sink.execute(q.mark_retried(control), {"id": lid})
                    report.retried.append(int(lid))  # type: ignore[call-overload]
                    log().info(
                        "dlq.retried", id=lid, topic=topic, partition=partition, offset=offset
                    )
                else:
                    sink.execute(
                        q.note_retry_failure(control),
                        {
                            "id": lid,
                            "error_class": type(error).__name__,
                            "error_message": error.message,
                        },
                    )
                    report.failed.append((int(lid), type(error).__name__, error.message))  # type: ignore[call-overload]
                    log().warning(
                        "dlq.retry_failed",
                        id=lid,
                        error_class=type(error).__name__,
                        error=error.message,
                    )
            sink.commit()
        except BaseException:
            sink.rollback()
            raise
    return report


def _retry_one(sink: Sink, reader: SchemaReader, payload: bytes | None) -> CutoverError | None:
    if payload is None:
        return DecodeError("the dead letter has no payload (a null message value)")
    try:
        ws, record = reader.store.decode(payload)
        event = from_record(ws.name, record)
    except DecodeError as exc:
        return exc
    if not isinstance(event, Change):
        return None  # a heartbeat has nothing to apply
    _stats, failures = sink.apply([event])
    return failures[0][1] if failures else None
