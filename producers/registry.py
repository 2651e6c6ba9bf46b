"""The producer's side of the schema registry: Confluent-framed values (``[kafka]
schema_registry_url`` set; without it the single-object encoding stays, see :mod:`cutover.codec`).

Each writer schema is registered when its route is built (before any event of that shape is
encoded): a table's envelope under ``<topic>-<record full name>`` (TopicRecordNameStrategy,
compatibility BACKWARD), the heartbeat under ``cutover.Heartbeat`` (see :mod:`cutover.registry`).
The id goes into the 5-byte header the compiled encoder (:mod:`producers.fast_avro`) writes in
place of the single-object one: the body is the same Avro binary; the hot path costs nothing more.

* An ADD COLUMN yields a new writer schema, registered as the subject's next version.
* A schema the registry refuses (incompatible with the subject's versions) stops the producer with
  :class:`~cutover.errors.SchemaIncompatible` (exit 3) naming the table and carrying the
  registry's reason; the slot does not advance past the change.
* An unreachable registry blocks the registration: the producer logs ``registry.unavailable``,
  produces nothing of that shape and does not advance the slot until the registry answers (or it
  is stopped: exit 3, nothing lost, the slot only advances after acknowledged deliveries).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from cutover import codec
from cutover.config import Settings
from cutover.errors import SchemaIncompatible, SchemaRegistryError
from cutover.mapping import MappingSpec
from cutover.registry import HEARTBEAT_SUBJECT, Registry, subject_for
from producers.fast_avro import Encoder, encoder_for

# HTTP 409: the registry refused the schema as incompatible with the subject's versions.
_CONFLICT = 409


def _namespace(db_schema: str, table: str) -> str:
    """The envelope namespace :func:`cutover.codec.envelope_schema` gives ``db_schema.table``."""
    ws = codec.writer_schema(codec.envelope_schema(db_schema, table, ()))
    return ws.name.rsplit(".", 1)[0]


class ConfluentFraming:
    """Registers writer schemas and builds Confluent-framed encoders for them."""

    def __init__(
        self,
        settings: Settings,
        mapping: MappingSpec,
        topic_for: Callable[[str], str],
        stop: threading.Event | None = None,
    ) -> None:
        self.registry = Registry(settings.kafka, stop=stop)
        # Writer schema namespace -> (qualified table, topic): the encoder factory is given the
        # writer schema alone.
        self._tables = {
            _namespace(mapping.source_schema, table): (
                f"{mapping.source_schema}.{table}",
                topic_for(tm.domain),
            )
            for table, tm in mapping.tables.items()
        }

    def schema_id(self, writer: codec.WriterSchema) -> int:
        """Register ``writer`` under its subject; its registry id. A table's envelope: its
        topic's subject; a record every topic carries alike (``cutover.Truncate``): its name."""
        namespace = writer.name.rsplit(".", 1)[0]
        found = self._tables.get(namespace)
        if found is None:
            return self.registry.register(writer.name, writer.json)
        table, topic = found
        subject = subject_for(topic, writer.name)
        try:
            return self.registry.register(subject, writer.json)
        except SchemaRegistryError as exc:
            if exc.status != _CONFLICT:
                raise
            raise SchemaIncompatible(
                table,
                f"the schema registry at {self.registry.url} refused the new writer schema "
                f"under subject {subject}: {exc.reason} (HTTP {exc.status}). Revert the change, or "
                "re-snapshot the table under a new topic prefix",
            ) from None

    def encoder_factory(self, writer: codec.WriterSchema) -> Encoder:
        """``producers.fast_avro.encoder_for`` with the Confluent header of ``writer``."""
        header = codec.confluent_header(self.schema_id(writer))
        return encoder_for(dataclasses.replace(writer, header=header))

    def heartbeat(self, writer: codec.WriterSchema) -> codec.WriterSchema:
        """The heartbeat schema registered under its own subject, with its Confluent header
        (``codec.encode`` writes ``writer.header`` then the body)."""
        schema_id = self.registry.register(HEARTBEAT_SUBJECT, writer.json)
        return dataclasses.replace(writer, header=codec.confluent_header(schema_id))


def framing_for(
    settings: Settings,
    mapping: MappingSpec,
    topic_for: Callable[[str], str],
    stop: threading.Event | None = None,
) -> ConfluentFraming | None:
    """The producer's Confluent framing if a schema registry is configured, else None;
    ``topic_for`` names the topic of a domain (either direction, :mod:`cutover.direction`)."""
    if not settings.kafka.schema_registry_url:
        return None
    return ConfluentFraming(settings, mapping, topic_for, stop)
