"""Kafka clients of the control plane and the tools: metadata and watermark reads.

Every librdkafka configuration the product builds should come from here, with the mandatory
settings applied after the user's pass-through settings so that nothing can weaken them.
"""

from __future__ import annotations

from typing import Any

from cutover.config import Settings
from cutover.errors import KafkaError


def kafka_consumer(settings: Settings) -> Any:
    """A consumer for metadata and watermarks only: never subscribes, never commits."""
    from confluent_kafka import Consumer

    return Consumer(
        {
            **settings.kafka.consumer,
            "bootstrap.servers": settings.kafka.bootstrap,
            "group.id": "cutover-control-probe",
            "enable.auto.commit": False,
            "allow.auto.create.topics": False,
        }
    )


def fetch_watermarks(
    consumer: Any, topic: str, *, timeout_s: float = 5.0
) -> dict[int, tuple[int, int]]:
    """(low, high) watermark per partition of ``topic``; KafkaError if it is unknown or down."""
    from confluent_kafka import TopicPartition

    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            reason = (
                info.error.str() if info is not None and info.error is not None else "no partitions"
            )
            raise KafkaError(f"topic {topic} is not available: {reason}")
        out: dict[int, tuple[int, int]] = {}
        for p in sorted(info.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
            out[p] = (int(low), int(high))
        return out
    except KafkaError:
        raise
    except Exception as exc:
        raise KafkaError(f"reading watermarks of {topic}: {exc}") from None
