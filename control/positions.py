"""What source position the consumers of a domain have applied: verify's lag awareness (step 3
of :mod:`control.verify`, and the catch-up wait of its invariants).

Every partition of the domain topic counts, the ones Kafka reports (not only the configured
count: a topic created with more partitions than configured must not hide the extra ones) and
any a consumer recorded an offset for; a partition nothing was applied from holds the minimum at
zero, so verify waits rather than judging commerce against rows it has not received.

The same reader follows the reverse direction (``reverse=True``, commerce → legacy, used by
``rollback-writes`` to drain it): the appliers' offsets then live in legacy (``[reverse]
control_schema`` and ``group_id``, topics ``<prefix>.reverse.<domain>``) and the producer's
delivered position in commerce's control schema under the ``[reverse] slot``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from control import digest as dg
from control.verify_io import Conn
from cutover.config import Settings
from cutover.control_store import LEGACY_SCHEMA, ControlStore
from cutover.control_store import offsets as stored_offsets
from cutover.control_store import producer as producer_state
from cutover.kafka import fetch_watermarks, kafka_consumer
from cutover.logging import get_logger
from cutover.mapping import MappingSpec

__all__ = ["LEGACY_CONTROL_SCHEMA", "PositionReader", "partitions_of"]

log = get_logger("control.verify")

#: Schema of the producer's control tables in the LEGACY database (cutover.control_store).
LEGACY_CONTROL_SCHEMA = LEGACY_SCHEMA


def partitions_of(
    configured: int, offsets: Mapping[int, object], watermarks: Mapping[int, int] | None
) -> list[int]:
    """The partitions to take the minimum over: the configured ones, the topic's real ones (its
    watermarks) and any with a recorded offset. Fails closed: a partition only one source knows
    of still counts."""
    return sorted(set(range(configured)) | set(offsets) | set(watermarks or ()))


class PositionReader:
    """Reads what source position the consumers of a domain have applied (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        mapping: MappingSpec,
        legacy: Conn,
        commerce: Conn,
        *,
        reverse: bool = False,
    ) -> None:
        self.settings = settings
        self.mapping = mapping
        self.legacy = legacy
        self.commerce = commerce
        self.reverse = reverse
        self._consumer: Any = None

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def applied(self, domain: str) -> int | None:
        """The position every partition of ``domain`` has applied; None when no consumer ever
        recorded a position for the domain (then commerce is treated as static)."""
        s = self.settings
        if self.reverse:
            topic, group = s.kafka.reverse_topic(domain), s.reverse.group_id
            store = ControlStore(self.legacy, s.reverse.control_schema, "source")
        else:
            topic, group = s.kafka.topic(domain), s.apply.group_id
            store = ControlStore(self.commerce, s.target.control_schema, "target")
        if not store.exists(stored_offsets.TABLE):
            return None
        rows = stored_offsets.read_group(store, group, topic)
        if not rows:
            return None
        if not self.reverse and self._snapshot_unfinished(domain):
            # Snapshot rows of chunks not read yet carry no position below the delivered one:
            # until the snapshot is done, nothing of this domain counts as applied.
            return 0
        offsets = {o.partition: (o.next_offset, o.last_source_lsn) for o in rows}
        delivered = self._delivered()
        # Read even without a delivered position: they name the topic's real partitions.
        watermarks = self._watermarks(topic)
        partitions = partitions_of(self.settings.kafka.partitions, offsets, watermarks)
        return dg.applied_position(
            partitions, offsets, delivered, watermarks if delivered is not None else None
        )

    def _snapshot_unfinished(self, domain: str) -> bool:
        """Whether a snapshot of one of the domain's tables is pending or running."""
        store = ControlStore(self.legacy, LEGACY_CONTROL_SCHEMA, "source")
        if not store.exists("snapshot_requests"):
            return False
        tables = [t.source_table for t in self.mapping.tables_of(domain)]
        unfinished = producer_state.unfinished_tables(store, self.settings.source.slot, tables) > 0
        if unfinished:
            log.info("verify.snapshot_unfinished", domain=domain)
        return unfinished

    def _delivered(self) -> int | None:
        if self.reverse:
            store = ControlStore(self.commerce, self.settings.target.control_schema, "target")
            slot = self.settings.reverse.slot
        else:
            store = ControlStore(self.legacy, LEGACY_CONTROL_SCHEMA, "source")
            slot = self.settings.source.slot
        if not store.exists("producer_state"):
            return None
        return producer_state.read_position(store, slot)

    def _watermarks(self, topic: str) -> dict[int, int] | None:
        try:
            if self._consumer is None:
                self._consumer = kafka_consumer(self.settings)
            marks = fetch_watermarks(self._consumer, topic, timeout_s=2.0)
        except Exception as exc:  # Kafka down: fall back to last_source_lsn only
            log.debug("verify.watermarks_unavailable", topic=topic, error=str(exc))
            return None
        return {p: high for p, (_low, high) in marks.items()}
