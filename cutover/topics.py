"""Kafka topics of the product: their specs (docs/ARCHITECTURE.md) and their creation.

The one place topics are created (:func:`ensure_topics`): a topic left to a broker's
auto-creation would get the broker's defaults (no compaction for the control and schemas
topics, the broker's message size). Clients and errors are :mod:`cutover.kafka`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cutover.config import KafkaSettings
from cutover.kafka import admin, message_max_bytes, translate

DAY_MS: Final = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: Mapping[str, str]


def size_problems(kafka: KafkaSettings) -> list[str]:
    """Disagreements between the producer's and the topics' message size limits."""
    producer = message_max_bytes(kafka)
    if producer > kafka.max_message_bytes:
        return [
            f"[kafka.producer] message.max.bytes = {producer} is above [kafka] "
            f"max_message_bytes = {kafka.max_message_bytes} (the topics' max.message.bytes): "
            "the broker would refuse what the producer accepts; remove the pass-through"
        ]
    return []


def min_insync_replicas(kafka: KafkaSettings) -> int | None:
    """The topics' ``min.insync.replicas``: ``[kafka] min_insync_replicas``, else 2 when the
    replication factor is 3 or more (one broker may fail without stopping acks=all writes), else
    None (the broker's default)."""
    if kafka.min_insync_replicas is not None:
        return kafka.min_insync_replicas
    return 2 if kafka.replication_factor >= 3 else None


def _common_topic_config(kafka: KafkaSettings) -> dict[str, str]:
    isr = min_insync_replicas(kafka)
    return {} if isr is None else {"min.insync.replicas": str(isr)}


def control_topic_spec(kafka: KafkaSettings) -> TopicSpec:
    """The control topic: one partition (one order of states), compacted (latest per domain)."""
    return TopicSpec(
        kafka.control_topic, 1, {**_common_topic_config(kafka), "cleanup.policy": "compact"}
    )


def topic_specs(kafka: KafkaSettings, domains: Sequence[str]) -> list[TopicSpec]:
    """The topics of docs/ARCHITECTURE.md for ``domains``."""
    common = _common_topic_config(kafka)
    size = {"max.message.bytes": str(kafka.max_message_bytes)}
    specs = [
        TopicSpec(
            kafka.topic(d),
            kafka.partitions,
            {**common, **size, "cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
        )
        for d in domains
    ]
    specs.append(
        TopicSpec(
            kafka.dlq_topic,
            1,
            {**common, **size, "cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
        )
    )
    specs.append(control_topic_spec(kafka))
    specs.append(TopicSpec(kafka.schemas_topic, 1, {**common, "cleanup.policy": "compact"}))
    return specs


def ensure_topics(
    kafka: KafkaSettings, specs: Sequence[TopicSpec], timeout_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Create the missing topics; report per topic ``created`` / ``exists`` (and mismatches).

    The one place topics are created: a topic left to a broker's auto-creation would get the
    broker's defaults (no compaction for the control and schemas topics).
    """
    from confluent_kafka import KafkaError as RdKafkaError
    from confluent_kafka import KafkaException
    from confluent_kafka.cimpl import NewTopic

    client = admin(kafka)
    try:
        existing = client.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise translate(exc, f"listing topics at {kafka.bootstrap}") from None
    report: dict[str, dict[str, Any]] = {}
    to_create = []
    to_resize: list[TopicSpec] = []
    for spec in specs:
        meta = existing.get(spec.name)
        if meta is not None and meta.error is None:
            entry: dict[str, Any] = {"status": "exists", "partitions": len(meta.partitions)}
            if len(meta.partitions) != spec.partitions:
                entry["warning"] = (
                    f"has {len(meta.partitions)} partitions, settings say {spec.partitions}; "
                    "left as it is (changing it would move keys between partitions). The "
                    "producer partitions by the topic's actual count"
                )
            report[spec.name] = entry
            if "max.message.bytes" in spec.config:
                to_resize.append(spec)
        else:
            to_create.append(
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=kafka.replication_factor,
                    config=dict(spec.config),
                )
            )
    _set_message_size(client, to_resize, timeout_s)
    if not to_create:
        return report
    partitions = {s.name: s.partitions for s in specs}
    for name, future in client.create_topics(to_create, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            report[name] = {"status": "created", "partitions": partitions[name]}
        except Exception as exc:  # KafkaException, or the future's own timeout
            err = exc.args[0] if exc.args else None
            # Created by a concurrent run meanwhile: what we wanted.
            if isinstance(err, RdKafkaError) and err.code() == RdKafkaError.TOPIC_ALREADY_EXISTS:
                report[name] = {"status": "exists"}
            else:
                raise translate(exc, f"creating topic {name}") from None
    return report


def _set_message_size(client: Any, specs: Sequence[TopicSpec], timeout_s: float) -> None:
    """Set ``max.message.bytes`` of existing topics to the configured one (idempotent)."""
    if not specs:
        return
    from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource

    resources = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            spec.name,
            incremental_configs=[
                ConfigEntry(
                    "max.message.bytes",
                    spec.config["max.message.bytes"],
                    incremental_operation=AlterConfigOpType.SET,
                )
            ],
        )
        for spec in specs
    ]
    for resource, future in client.incremental_alter_configs(
        resources, request_timeout=timeout_s
    ).items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:  # KafkaException, or the future's own timeout
            raise translate(exc, f"setting max.message.bytes of topic {resource.name}") from None
