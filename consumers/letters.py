"""Dead letters: what a poison message becomes, and what the apply engine does with them.

A poison message is one the apply path cannot apply: undecodable bytes, an Avro fingerprint
still unknown after re-reading the schemas topic, a row the mapping cannot map
(:class:`~cutover.errors.UnmappableRow`), or data the commerce database refuses (a constraint
violation, isolated from the good rows of its batch by :class:`consumers.sink.Sink`). It is never
skipped silently. :class:`RecordLetters` is the policy of ``cutover apply`` and ``replay play
--to-target``:

* ``dlq_policy = "halt"``: stop with :class:`PoisonHalt` (exit 3) naming topic, partition,
  offset and reason, without storing offsets past it;
* otherwise a row goes into ``cutover.dead_letters`` (with the payload) in the same database
  transaction as the batch, so the offsets never move past a poison message that was not
  recorded; and, with a :class:`DlqPublisher`, the original message goes to the dead-letter topic:
  same key, same value bytes, and headers ``cutover.source_topic``, ``cutover.source_partition``,
  ``cutover.source_offset``, ``cutover.error_class``, ``cutover.error``.

``cutover dlq retry`` has a policy of its own (:mod:`consumers.dlq`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import KafkaException
from structlog.typing import FilteringBoundLogger

from consumers.sink import Sink
from cutover import kafka, metrics
from cutover.config import Settings
from cutover.errors import CutoverError, KafkaError, RuntimeFailure
from cutover.kafka import translate as kafka_error
from cutover.logging import get_logger


def log() -> FilteringBoundLogger:
    # Looked up at each use: a logger bound before cutover.logging.configure() keeps defaults.
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
        self._producer = kafka.producer(settings.kafka, "dlq")
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


class LetterPolicy(Protocol):
    """What the engine does with the poison messages of a batch (inside its transaction)."""

    def handle(self, sink: Sink, letters: Sequence[DeadLetter]) -> None: ...

    def flush(self) -> None:
        """Before COMMIT: whatever left the process (a topic) must be acknowledged."""

    def close(self) -> None: ...


class RecordLetters:
    """Halt, or record the letters in ``cutover.dead_letters`` under ``group`` and, with a
    publisher, send them to the dead-letter topic (see the module docstring)."""

    def __init__(
        self,
        group: str,
        *,
        halt: bool,
        publisher: Callable[[], DlqPublisher] | None = None,
    ) -> None:
        self.group = group
        self.halt = halt
        #: Made at the first letter: most runs never need a producer.
        self._make_publisher = publisher
        self.publisher: DlqPublisher | None = None
        self._sent = False

    def handle(self, sink: Sink, letters: Sequence[DeadLetter]) -> None:
        if self.halt:
            first = letters[0]
            log().error(
                "dlq.halt",
                topic=first.topic,
                partition=first.partition,
                offset=first.offset,
                error_class=first.error_class,
                error=first.error.message,
            )
            raise PoisonHalt(first.topic, first.partition, first.offset, first.error)
        sink.record_dead_letters([letter.db_row(self.group) for letter in letters])
        if self._make_publisher is not None:
            for letter in letters:
                metrics.dead_letter(letter.topic.rsplit(".", 1)[-1], letter.error_class)
            if self.publisher is None:
                self.publisher = self._make_publisher()
            self.publisher.send(letters)
            self._sent = True

    def flush(self) -> None:
        if self._sent and self.publisher is not None:
            self.publisher.flush()
        self._sent = False

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
