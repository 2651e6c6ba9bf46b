"""The schema registry (Confluent Schema Registry API: Confluent, Apicurio's ccompat, Karapace).

With ``[kafka] schema_registry_url`` set, every message value is in the **Confluent wire format**
(byte 0, the 4-byte big-endian schema id, the Avro binary body; :mod:`cutover.codec`) and each
writer schema is registered under a subject:

* ``<topic>-<record full name>`` for the change events of one table (TopicRecordNameStrategy,
  e.g. ``shop.payment-cutover.shop.orders.Envelope``), with the subject's compatibility set to
  BACKWARD, so an ADD COLUMN registers the next version and an incompatible change is refused by
  the registry itself;
* ``cutover.Heartbeat`` and ``cutover.Truncate`` for the heartbeat and truncate records every
  domain topic also carries alike (RecordNameStrategy).

Not TopicNameStrategy (``<topic>-value``): a domain topic carries several tables (orders,
order_items, ... on ``<prefix>.payment``) and heartbeats, records of different names, and a
registry checking BACKWARD refuses a record of another name as the next version of a subject
(Avro's name-mismatch rule). One subject per record type per topic is Confluent's own answer
for topics with several event types; deserializers find the schema by id either way.

The HTTP client and its caches (schema → id per subject, id → schema) are those of
``confluent_kafka.schema_registry``; this module adds the configuration from :class:`KafkaSettings`,
errors from our tree (:class:`~cutover.errors.SchemaRegistryError`, the registry's own reason in
the message, never its password) and waiting out an unreachable registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cutover.codec import SchemaStore
from cutover.config import KafkaSettings
from cutover.errors import SchemaRegistryError
from cutover.logging import get_logger

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

COMPATIBILITY: Final = "BACKWARD"
HEARTBEAT_SUBJECT: Final = "cutover.Heartbeat"
# HTTP statuses that mean "the registry is not there right now", not "the request is wrong".
_UNAVAILABLE: Final = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


def subject_for(topic: str, record_name: str) -> str:
    """The subject of a record type's values on a topic (TopicRecordNameStrategy)."""
    return f"{topic}-{record_name}"


def client_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The ``SchemaRegistryClient`` configuration of the ``schema_registry_*`` settings."""
    if not kafka.schema_registry_url:
        raise ValueError("no schema registry is configured")
    conf: dict[str, Any] = {
        "url": kafka.schema_registry_url,
        "timeout": 10,
        # We wait out an unreachable registry ourselves (logged, stoppable): few inner retries.
        "max.retries": 1,
        "retries.wait.ms": 200,
        "retries.max.wait.ms": 1000,
    }
    if kafka.schema_registry_user:
        conf["basic.auth.user.info"] = (
            f"{kafka.schema_registry_user}:{kafka.schema_registry_password or ''}"
        )
    for key, value in (
        ("ssl.ca.location", kafka.schema_registry_ca),
        ("ssl.certificate.location", kafka.schema_registry_cert),
        ("ssl.key.location", kafka.schema_registry_key),
    ):
        if value:
            conf[key] = value
    return conf


def _translate(exc: Exception, doing: str) -> SchemaRegistryError:
    from confluent_kafka.schema_registry.error import SchemaRegistryError as ClientError

    if isinstance(exc, ClientError):
        return SchemaRegistryError(
            f"{doing}: {exc.error_message}",
            status=exc.http_status_code,
            error_code=exc.error_code,
            reason=str(exc.error_message),
        )
    return SchemaRegistryError(f"{doing}: unreachable ({type(exc).__name__}: {exc})")


def _unavailable(exc: Exception) -> bool:
    from confluent_kafka.schema_registry.error import SchemaRegistryError as ClientError

    if isinstance(exc, ClientError):
        return exc.http_status_code in _UNAVAILABLE
    # httpx's transport errors (connection refused, timeouts) and OSError: not an answer.
    return True


class Registry:
    """One registry client; :meth:`call` runs a request, waiting while the registry is down."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        stop: threading.Event | None = None,
        max_wait_s: float | None = None,
        client: SchemaRegistryClient | None = None,
    ) -> None:
        # Imported here, not at module level: the client (httpx, authlib, ...) costs ~0.4 s
        # of CPU to import, which every command would pay, with or without a registry.
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = kafka.schema_registry_url or ""
        self.client = client or SchemaRegistryClient(client_config(kafka))
        self.stop = stop or threading.Event()
        # None: wait until the registry answers or stop is set (the producer); a number: give
        # up after that long (readers, tools).
        self.max_wait_s = max_wait_s
        self.log = get_logger("cutover.registry")
        self._compatible: set[str] = set()

    def call(self, doing: str, request: Callable[[], T]) -> T:
        """``request()``; while the registry is unreachable, log why and retry (backing off)."""
        started = time.monotonic()
        delay = 0.5
        warned = False
        while True:
            try:
                result = request()
            except Exception as exc:  # the client raises httpx's, its own and ValueError
                if not _unavailable(exc):
                    raise _translate(exc, doing) from None
                waited = time.monotonic() - started
                if self.stop.is_set() or (self.max_wait_s is not None and waited > self.max_wait_s):
                    raise _translate(exc, doing) from None
                if not warned:
                    # Said once per outage, not per retry; the slot does not advance meanwhile.
                    self.log.warning(
                        "registry.unavailable", doing=doing, error=_translate(exc, doing).message
                    )
                    warned = True
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            if warned:
                self.log.info("registry.available", doing=doing,
                              waited_s=round(time.monotonic() - started, 1))  # fmt: skip
            return result

    def register(self, subject: str, schema_json: str, *, compatibility: bool = True) -> int:
        """Register ``schema_json`` under ``subject``; its id (cached by the client). An
        incompatible schema raises :class:`SchemaRegistryError` with the registry's reason."""
        from confluent_kafka.schema_registry import Schema

        schema = Schema(schema_json, "AVRO")
        schema_id: int = self.call(
            f"registering a schema under subject {subject}",
            lambda: self.client.register_schema(subject, schema),
        )
        if compatibility and subject not in self._compatible:
            # After the first version: some registries (Apicurio) know no config of a subject
            # that does not exist yet. Every later version is checked against BACKWARD.
            self.call(
                f"setting compatibility {COMPATIBILITY} of subject {subject}",
                lambda: self.client.set_compatibility(subject, COMPATIBILITY),
            )
            self._compatible.add(subject)
        return schema_id

    def schema_json(self, schema_id: int) -> str:
        """The schema text of ``schema_id`` (cached by the client)."""
        schema = self.call(
            f"reading schema id {schema_id}", lambda: self.client.get_schema(schema_id)
        )
        return str(schema.schema_str)


def reader_registry(kafka: KafkaSettings, max_wait_s: float = 120.0) -> Registry | None:
    """A registry for readers (appliers, replay, DLQ tools) if one is configured, else None."""
    if not kafka.schema_registry_url:
        return None
    return Registry(kafka, max_wait_s=max_wait_s)


def with_registry(store: SchemaStore, kafka: KafkaSettings) -> SchemaStore:
    """``store``, resolving Confluent schema ids through the configured registry (if any)."""
    if store.resolve is None and (reg := reader_registry(kafka)) is not None:
        store.resolve = reg.schema_json
    return store
