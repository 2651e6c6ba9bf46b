"""The producer's edge to Kafka: an idempotent producer with checked deliveries, and topics.

confluent-kafka exceptions are translated here, once, into :class:`~cutover.errors.KafkaError`
carrying the librdkafka error name.

Delivery checking without a Python callback per message: the producer runs with
``delivery.report.only.error=true``, so librdkafka calls back only for failed messages. After
``flush()`` has emptied the queue, every message that did not fail was acknowledged by all
in-sync replicas (``acks=all``, idempotence on). That keeps the hot path free of a callback per
event, which at 30,000 events/s is a measurable share of one core.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from cutover.config import KafkaSettings
from cutover.errors import ConfigError, KafkaError

# Settings the no-loss guarantee depends on: a pass-through may not weaken them.
_MANDATORY: Final[dict[str, str]] = {"enable.idempotence": "true", "acks": "all"}
_ACKS_ALL: Final = frozenset({"all", "-1"})
# Defaults we choose (a pass-through may override): bounded queue, batching, compression.
_DEFAULTS: Final[dict[str, Any]] = {
    "linger.ms": 20,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 200_000,
    # Bounds the memory of queued messages (librdkafka's default is 1 GB).
    "queue.buffering.max.kbytes": 131_072,
    "batch.size": 1_000_000,
}
_POLL_EVERY: Final = 1_000
_MAX_FAILURES_KEPT: Final = 20

Headers = list[tuple[str, str | bytes | None]]
HEADERS_CHANGE: Final[Headers] = [("cutover.kind", b"change")]
HEADERS_HEARTBEAT: Final[Headers] = [("cutover.kind", b"heartbeat")]
HEADERS_SCHEMA: Final[Headers] = [("cutover.kind", b"schema")]

DAY_MS: Final = 24 * 3600 * 1000


def translate(exc: BaseException, doing: str) -> KafkaError:
    """A confluent-kafka exception as our :class:`KafkaError`."""
    err = exc.args[0] if exc.args else None
    if isinstance(err, RdKafkaError):
        return KafkaError(f"{doing}: {err.str()}", code=err.name())
    return KafkaError(f"{doing}: {exc}")


def producer_config(settings: KafkaSettings, client_id: str) -> dict[str, Any]:
    """librdkafka producer settings: our defaults, the pass-through, then the mandatory ones."""
    conf: dict[str, Any] = {**_DEFAULTS, **dict(settings.producer)}
    for key, required in _MANDATORY.items():
        given = conf.get(key)
        if given is None:
            continue
        text = str(given).lower()
        ok = text in _ACKS_ALL if key == "acks" else text in ("true", "1")
        if not ok:
            raise ConfigError(
                f"[kafka.producer] {key} = {given!r} would allow losing events; the producer "
                f"requires {key} = {required!r}: remove the setting"
            )
    conf.update({"enable.idempotence": True, "acks": "all"})
    conf["bootstrap.servers"] = settings.bootstrap
    conf["client.id"] = client_id
    conf["delivery.report.only.error"] = True
    return conf


class KafkaOut:
    """An idempotent producer that knows whether everything it sent was acknowledged."""

    def __init__(self, settings: KafkaSettings, *, client_id: str) -> None:
        conf = producer_config(settings, client_id)
        conf["on_delivery"] = self._on_delivery
        # How long a message may take to be delivered before librdkafka fails it.
        self.delivery_timeout_s = float(conf.get("message.timeout.ms", 300_000)) / 1000.0
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise translate(exc, "creating the Kafka producer") from None
        self.sent = 0
        self.failed = 0
        self.failures: list[str] = []
        self._since_poll = 0

    def _on_delivery(self, err: RdKafkaError | None, msg: Any) -> None:
        if err is None:  # only with delivery.report.only.error off; kept for safety
            return
        self.failed += 1
        if len(self.failures) < _MAX_FAILURES_KEPT:
            self.failures.append(f"{msg.topic()}[{msg.partition()}]: {err.str()} ({err.name()})")

    def produce(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes,
        headers: Headers = HEADERS_CHANGE,
    ) -> None:
        """Queue one message; waits (serving delivery reports) while the queue is full."""
        producer = self._producer
        while True:
            try:
                producer.produce(topic, value, key, partition=partition, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
            except KafkaException as exc:
                raise translate(exc, f"producing to {topic}[{partition}]") from None
        self.sent += 1
        self._since_poll += 1
        if self._since_poll >= _POLL_EVERY:
            self._since_poll = 0
            producer.poll(0)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued message is acknowledged; KafkaError if any was not.

        A failed delivery (librdkafka gives up after ``message.timeout.ms``) or messages still
        queued after ``timeout_s`` (default: the delivery timeout plus a margin) raise, and the
        caller must not advance the slot.
        """
        limit = timeout_s if timeout_s is not None else self.delivery_timeout_s + 15.0
        deadline = time.monotonic() + limit
        remaining = self._producer.flush(min(1.0, limit))
        while remaining and time.monotonic() < deadline:
            remaining = self._producer.flush(1.0)
        if self.failed:
            detail = "; ".join(self.failures)
            raise KafkaError(f"{self.failed} deliveries failed, the slot is not advanced: {detail}")
        if remaining:
            raise KafkaError(
                f"{remaining} messages not acknowledged within {limit:.0f} s; the slot is not "
                "advanced",
                code="_MSG_TIMED_OUT",
            )

    def partitions(self, topics: Sequence[str], timeout_s: float = 15.0) -> dict[str, int]:
        """Partition counts of ``topics``; KafkaError naming any that is missing."""
        try:
            meta = self._producer.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            raise translate(exc, "reading topic metadata") from None
        out: dict[str, int] = {}
        missing = []
        for topic in topics:
            tmeta = meta.topics.get(topic)
            if tmeta is None or tmeta.error is not None or not tmeta.partitions:
                missing.append(topic)
            else:
                out[topic] = len(tmeta.partitions)
        if missing:
            raise KafkaError(
                f"topic(s) {', '.join(missing)} do not exist: run `cutover init` first",
                code="UNKNOWN_TOPIC_OR_PART",
            )
        return out

    def close(self) -> None:
        # Nothing to release explicitly: librdkafka's handle is freed with the object.
        self._producer.poll(0)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: Mapping[str, str]


def topic_specs(settings: KafkaSettings, domains: Sequence[str]) -> list[TopicSpec]:
    """The topics of docs/ARCHITECTURE.md for ``domains``."""
    common: dict[str, str] = {}
    if settings.replication_factor >= 3:
        common["min.insync.replicas"] = "2"
    specs = [
        TopicSpec(
            settings.topic(d),
            settings.partitions,
            {**common, "cleanup.policy": "delete", "retention.ms": str(7 * DAY_MS)},
        )
        for d in domains
    ]
    specs.append(
        TopicSpec(
            settings.dlq_topic,
            1,
            {**common, "cleanup.policy": "delete", "retention.ms": str(30 * DAY_MS)},
        )
    )
    specs.append(TopicSpec(settings.control_topic, 1, {**common, "cleanup.policy": "compact"}))
    specs.append(TopicSpec(settings.schemas_topic, 1, {**common, "cleanup.policy": "compact"}))
    return specs


def ensure_topics(
    settings: KafkaSettings, specs: Sequence[TopicSpec], timeout_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Create the missing topics; report per topic ``created`` / ``exists`` (and mismatches)."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise translate(exc, f"listing topics at {settings.bootstrap}") from None
    report: dict[str, dict[str, Any]] = {}
    to_create = []
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
        else:
            to_create.append(
                NewTopic(
                    spec.name,
                    num_partitions=spec.partitions,
                    replication_factor=settings.replication_factor,
                    config=dict(spec.config),
                )
            )
    if to_create:
        futures = admin.create_topics(to_create, request_timeout=timeout_s)
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
                report[name] = {"status": "created", "partitions": _spec(specs, name).partitions}
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                exists = RdKafkaError.TOPIC_ALREADY_EXISTS
                if isinstance(err, RdKafkaError) and err.code() == exists:
                    report[name] = {"status": "exists"}
                else:
                    raise translate(exc, f"creating topic {name}") from None
    return report


def _spec(specs: Sequence[TopicSpec], name: str) -> TopicSpec:
    return next(s for s in specs if s.name == name)
