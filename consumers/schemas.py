"""Reads the compacted schemas topic into a :class:`~cutover.codec.SchemaStore`.

Every writer schema the producer uses is published to ``<prefix>.schemas`` (key = fingerprint
hex, value = schema JSON). The consumer reads the topic from the beginning at start, and again
(from where it stopped) when a message names a fingerprint it does not know: only a fingerprint
still unknown after that refresh is a poison message. Confluent-framed messages (a schema
registry is configured) name a registry id instead, resolved through :mod:`cutover.registry`.
"""

from __future__ import annotations

import time

from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
from confluent_kafka import KafkaError as RdKafkaError
from structlog.typing import FilteringBoundLogger

from cutover.codec import SchemaStore, heartbeat_schema, truncate_schema
from cutover.config import KafkaSettings
from cutover.errors import DecodeError, KafkaError
from cutover.kafka import consumer
from cutover.kafka import translate as kafka_error
from cutover.logging import get_logger
from cutover.registry import with_registry


def log() -> FilteringBoundLogger:
    # Looked up at each use, not at import: a logger bound before cutover.logging.configure()
    # runs would keep structlog's defaults (console renderer on stdout).
    return get_logger(__name__)


class SchemaReader:
    """Keeps ``store`` up to date with the schemas topic."""

    def __init__(
        self,
        kafka: KafkaSettings,
        group_id: str,
        store: SchemaStore | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self.topic = kafka.schemas_topic
        self.store = store if store is not None else SchemaStore()
        # The producer publishes these schemas too; knowing them locally costs nothing.
        self.store.add(heartbeat_schema())
        self.store.add(truncate_schema())
        # Confluent-framed messages name registry ids: resolved there (None: no registry).
        with_registry(self.store, kafka)
        self.timeout_s = timeout_s
        self._next: dict[int, int] = {}
        # A group id is required by the client; nothing is ever committed under it.
        self._consumer = consumer(kafka, "schemas", group_id=f"{group_id}.schemas-reader")

    def refresh(self) -> int:
        """Read every schema published since the last refresh; returns how many were new."""
        before = len(self.store)
        try:
            meta = self._consumer.list_topics(self.topic, timeout=self.timeout_s)
            tmeta = meta.topics.get(self.topic)
            if tmeta is None or tmeta.error is not None or not tmeta.partitions:
                log().warning("schemas.topic_missing", topic=self.topic)
                return 0
            for partition in sorted(tmeta.partitions):
                self._read_partition(partition)
        except KafkaException as exc:
            raise kafka_error(exc, f"reading the schemas topic {self.topic}") from None
        added = len(self.store) - before
        log().info("schemas.refreshed", topic=self.topic, known=len(self.store), added=added)
        return added

    def _read_partition(self, partition: int) -> None:
        tp = TopicPartition(self.topic, partition)
        _low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
        start = self._next.get(partition, OFFSET_BEGINNING)
        if high <= 0 or (start != OFFSET_BEGINNING and start >= high):
            return
        self._consumer.assign([TopicPartition(self.topic, partition, start)])
        deadline = time.monotonic() + self.timeout_s
        position = start
        try:
            while position == OFFSET_BEGINNING or position < high:
                if time.monotonic() > deadline:
                    raise KafkaError(
                        f"timed out reading {self.topic} [{partition}] up to offset {high}"
                    )
                msg = self._consumer.poll(0.5)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == RdKafkaError._PARTITION_EOF:
                        break
                    raise KafkaError(f"reading {self.topic}: {err.str()}", code=err.name())
                value = msg.value()
                if value:  # a compaction tombstone (null value) carries no schema
                    try:
                        self.store.add_json(value)
                    except DecodeError as exc:
                        log().warning("schemas.invalid", offset=msg.offset(), error=exc.message)
                position = (msg.offset() or 0) + 1
        finally:
            self._consumer.unassign()
        self._next[partition] = position

    def close(self) -> None:
        self._consumer.close()
