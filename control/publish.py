"""Publishing a domain's state to the compacted control topic (step 2 of a transition, see
:mod:`control.machine`); routers following the topic parse :func:`state_message`."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from cutover.config import Settings
from cutover.errors import KafkaError

__all__ = ["KafkaPublisher", "Publisher", "state_message"]


class Publisher(Protocol):
    """Publishes a domain's state to the control topic and waits for the acknowledgement."""

    def publish(self, domain: str, value: Mapping[str, object]) -> None: ...


class KafkaPublisher:
    """Publishes to ``settings.kafka.control_topic`` (idempotent producer, acks=all).

    Creates the topic (compacted, 1 partition) when it is missing, so a switch never depends on a
    broker's auto-creation defaults (which would not compact).
    """

    def __init__(self, settings: Settings, timeout_s: float = 15.0) -> None:
        from confluent_kafka import Producer

        self.settings = settings
        self.topic = settings.kafka.control_topic
        self.timeout_s = timeout_s
        conf: dict[str, object] = {
            **settings.kafka.producer,
            "bootstrap.servers": settings.kafka.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": int(timeout_s * 1000),
        }
        self._producer = Producer(conf)
        self._checked = False

    def _ensure_topic(self) -> None:
        if self._checked:
            return
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        admin = AdminClient(
            {**self.settings.kafka.producer, "bootstrap.servers": self.settings.kafka.bootstrap}
        )
        meta = admin.list_topics(timeout=self.timeout_s)
        if self.topic not in meta.topics:
            futures = admin.create_topics(
                [
                    NewTopic(
                        self.topic,
                        num_partitions=1,
                        replication_factor=self.settings.kafka.replication_factor,
                        config={"cleanup.policy": "compact"},
                    )
                ]
            )
            for fut in futures.values():
                try:
                    fut.result()
                except Exception as exc:  # already created by a concurrent run is fine
                    if "TOPIC_ALREADY_EXISTS" not in str(exc):
                        raise
        self._checked = True

    def publish(self, domain: str, value: Mapping[str, object]) -> None:
        try:
            self._ensure_topic()
        except Exception as exc:
            raise KafkaError(f"creating control topic {self.topic}: {exc}") from None
        errors: list[str] = []
        done = threading.Event()

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            done.set()

        self._producer.produce(
            self.topic,
            key=domain.encode(),
            value=json.dumps(dict(value), sort_keys=True).encode(),
            partition=0,
            on_delivery=on_delivery,
        )
        remaining = self._producer.flush(self.timeout_s)
        if remaining or not done.is_set():
            raise KafkaError(
                f"control topic {self.topic}: the state of {domain} was not acknowledged within "
                f"{self.timeout_s:g} s"
            )
        if errors:
            raise KafkaError(f"control topic {self.topic}: publishing {domain}: {errors[0]}")


def state_message(
    *, domain: str, state: str, version: int, actor: str, transition_id: str, changed_at: datetime
) -> dict[str, object]:
    """The control-topic value (also what routers parse)."""
    return {
        "domain": domain,
        "state": state,
        "version": version,
        "changed_at": changed_at.astimezone(UTC).isoformat(),
        "actor": actor,
        "transition_id": transition_id,
    }
