"""Read topics back to their end and decode them: for tests, benchmarks and diagnostics.

:func:`read_all` reads every partition of the given topics from offset 0 up to the end offsets
seen when it started; :func:`schema_store` builds a :class:`~cutover.codec.SchemaStore` from the
schemas topic, exactly as a consumer would, so decoding proves the schemas were published.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from cutover.codec import SchemaStore
from cutover.errors import KafkaError


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def kind(self) -> str:
        for name, value in self.headers:
            if name == "cutover.kind":
                return value.decode()
        return ""


def read_all(bootstrap: str, topics: Sequence[str], timeout_s: float = 60.0) -> list[RawMessage]:
    """Every message of ``topics`` up to their current end, in partition order."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cutover-readback-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    try:
        meta = consumer.list_topics(timeout=10)
        assignments: list[TopicPartition] = []
        ends: dict[tuple[str, int], int] = {}
        for wanted in topics:
            tmeta = meta.topics.get(wanted)
            if tmeta is None or tmeta.error is not None:
                raise KafkaError(f"topic {wanted} does not exist")
            for p in tmeta.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(wanted, p), timeout=10)
                if high > low:
                    ends[(wanted, p)] = high
                    assignments.append(TopicPartition(wanted, p, low))
        out: list[RawMessage] = []
        if not assignments:
            return out
        consumer.assign(assignments)
        deadline = time.monotonic() + timeout_s
        remaining = dict(ends)
        while remaining:
            if time.monotonic() > deadline:
                raise KafkaError(f"read-back timed out; still missing {remaining}")
            for msg in consumer.consume(10_000, timeout=1.0):
                if msg.error() is not None:
                    raise KafkaError(f"read-back: {msg.error()}")
                topic_name, partition, offset = msg.topic(), msg.partition(), msg.offset()
                if topic_name is None or partition is None or offset is None:
                    continue
                topic = topic_name
                tp = (topic, partition)
                if tp not in remaining or offset >= remaining[tp]:
                    continue
                headers = tuple(
                    (str(h[0]), h[1] if isinstance(h[1], bytes) else str(h[1] or "").encode())
                    for h in (msg.headers() or [])
                )
                value = msg.value()
                key = msg.key()
                out.append(
                    RawMessage(
                        topic,
                        partition,
                        offset,
                        key if isinstance(key, bytes) else None,
                        value if isinstance(value, bytes) else None,
                        headers,
                    )
                )
                if offset + 1 >= remaining[tp]:
                    del remaining[tp]
        out.sort(key=lambda m: (m.topic, m.partition, m.offset))
        return out
    finally:
        consumer.close()


def schema_store(bootstrap: str, schemas_topic: str) -> SchemaStore:
    """A SchemaStore holding every schema of the schemas topic."""
    store = SchemaStore()
    for msg in read_all(bootstrap, [schemas_topic]):
        if msg.value is not None:
            store.add_json(msg.value)
    return store


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded message of a domain topic."""

    raw: RawMessage
    schema: str
    record: dict[str, Any]

    @property
    def is_change(self) -> bool:
        return self.raw.kind == "change"


def decode_all(store: SchemaStore, messages: Sequence[RawMessage]) -> list[Decoded]:
    out = []
    for msg in messages:
        if msg.value is None:
            continue
        ws, record = store.decode(msg.value)
        out.append(Decoded(msg, ws.name, record))
    return out
