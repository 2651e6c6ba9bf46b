"""Publishing a domain's state to the compacted control topic (step 2 of a transition, see
:mod:`control.machine`); routers following the topic parse :func:`state_message`."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from cutover import kafka, topics
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
        self.settings = settings
        self.topic = settings.kafka.control_topic
        self.timeout_s = timeout_s
        self._producer = kafka.producer(
            settings.kafka, "control", extra={"message.timeout.ms": int(timeout_s * 1000)}
        )
        self._checked = False

    def _ensure_topic(self) -> None:
        if self._checked:
            return
        topics.ensure_topics(
            self.settings.kafka, [topics.control_topic_spec(self.settings.kafka)], self.timeout_s
        )
        self._checked = True

    def publish(self, domain: str, value: Mapping[str, object]) -> None:
        self._ensure_topic()
        errors: list[str] = []
        done = threading.Event()

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            done.set()

        try:
            self._producer.produce(
                self.topic,
                key=domain.encode(),
                value=json.dumps(dict(value), sort_keys=True).encode(),
                partition=0,
                on_delivery=on_delivery,
            )
        except Exception as exc:  # KafkaException, BufferError: the same refusal to the caller
            raise kafka.translate(exc, f"control topic {self.topic}: publishing {domain}") from None
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
