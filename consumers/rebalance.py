"""The apply consumer's rebalance callbacks, for both group protocols.

``[kafka] apply_assignment`` picks the assignor (:mod:`cutover.kafka` makes it mandatory):

* ``range`` uses the **eager** protocol: at every rebalance each member is told to
  give up its whole assignment (``on_revoke`` with everything), then gets its whole new one
  (``on_assign``), which it takes with ``assign()``. Every member stops consuming until the
  group has re-formed; the gain is per-topic balance: range splits each topic's partitions
  among the members, so the hot domain (payment) is shared by every applier;
* ``cooperative-sticky`` (the default) uses the **cooperative** protocol: only the partitions
  that move are revoked (``incremental_unassign``) or added (``incremental_assign``); the others
  keep flowing. It balances partition counts only, so one applier may keep a whole topic.

Whatever the protocol, the exactly-once rules are the same: a partition is assigned at the
offset stored in the apply-side database (the beginning if none), and giving one up drops its
buffered state; if an open long transaction held work of a partition given up, it can never
commit and is rolled back (the partitions kept are re-sought from the stored offsets).

The callbacks run inside ``poll()``/``consume()``: an exception is kept and raised by
``raise_callback_error`` after the call returns (librdkafka must not see it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from structlog.typing import FilteringBoundLogger

from consumers.batch import TP, Entry
from consumers.engine import ApplyEngine
from cutover import metrics
from cutover.errors import DatabaseError
from cutover.logging import get_logger

#: The assignors of the cooperative protocol (every other one librdkafka has is eager).
COOPERATIVE = frozenset({"cooperative-sticky"})


def log() -> FilteringBoundLogger:
    return get_logger("consumers.apply")


def is_eager(assignment: str) -> bool:
    """Whether ``assignment`` (a librdkafka assignor) uses the eager rebalance protocol.
    The Python client has no ``rebalance_protocol()``: the configured assignor tells."""
    return assignment not in COOPERATIVE


@dataclass(slots=True)
class OwnedPartition:
    """A partition this member owns, as the apply consumer tracks it."""

    topic: str
    partition: int
    #: next_offset as this member believes the database holds it (None: no row yet).
    committed: int | None
    #: The next offset accepted from the consumer: drops messages fetched before a seek.
    cursor: int
    buffer: list[Entry] = field(default_factory=list)


def tp_text(tps: Iterable[TP]) -> list[str]:
    return [f"{t}[{p}]" for t, p in tps]


class RebalanceCallbacks:
    """The ``subscribe()`` callbacks of :class:`consumers.apply.ApplyConsumer` (a mixin: they
    work on its partition state)."""

    group: str
    engine: ApplyEngine
    #: Eager protocol (``assign``/``unassign`` of everything) or cooperative (incremental).
    eager: bool
    _parts: dict[TP, OwnedPartition]
    _streaming: set[TP]
    _paused: set[TP]
    _need_reseek: set[TP]
    _db_broken: bool
    _callback_error: BaseException | None
    _last_message: float

    def _abandon_tx(self, reason: str) -> None:
        raise NotImplementedError

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        try:
            tps = [(p.topic, p.partition) for p in partitions]
            if self.eager:
                # Eager: this is the whole assignment. on_revoke gave everything up already;
                # should anything remain (its callback failed), it is not ours any more.
                self._drop_partitions(set(self._parts) - set(tps), "apply.partitions_revoked")
            try:
                offsets = self.engine.db.read_offsets(self.group, tps, lock=False)
                reseek = False
            except DatabaseError as exc:
                # Assign now (the group protocol needs it) and seek once the database is back.
                log().warning("apply.assign_db_error", error=exc.message)
                offsets, reseek = {}, True
                self._db_broken = True
            for p in partitions:
                tp = (p.topic, p.partition)
                off = offsets.get(tp)
                if off is None or off < 0:
                    p.offset = OFFSET_BEGINNING
                    self._parts[tp] = OwnedPartition(p.topic, p.partition, None, 0)
                else:
                    p.offset = off
                    self._parts[tp] = OwnedPartition(p.topic, p.partition, off, off)
                if reseek:
                    self._need_reseek.add(tp)
            if self.eager:
                consumer.assign(partitions)
            else:
                consumer.incremental_assign(partitions)
            # --exit-when-idle counts from the assignment: a slow group join (a rebalance,
            # a broker under load) is not idleness, and the new partitions' backlog is ahead.
            self._last_message = time.monotonic()
            log().info(
                "apply.partitions_assigned",
                partitions=tp_text(tps),
                offsets={f"{t}[{p}]": offsets.get((t, p)) for t, p in tps},
            )
        except BaseException as exc:
            self._callback_error = exc

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._give_up(consumer, partitions, "apply.partitions_revoked")

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._give_up(consumer, partitions, "apply.partitions_lost")

    def _give_up(self, consumer: Any, partitions: list[TopicPartition], event: str) -> None:
        tps = {(p.topic, p.partition) for p in partitions}
        if self.eager:
            tps |= set(self._parts)  # eager: everything goes, whatever the list says
        self._drop_partitions(tps, event)
        # The client itself then gives the partitions up (``unassign`` when eager,
        # ``incremental_unassign`` when cooperative), as it does after any revoke or lost
        # callback that did not. Not called here: an explicit call counts as done even when it
        # fails, and such a failure (the coordinator moving in a broker's restart) would
        # become fatal to this member, where the client's own call is retried by the group.

    def _drop_partitions(self, tps: set[TP], event: str) -> None:
        if not tps:
            return
        try:
            tx = self.engine.tx
            if tx is not None and (tps & tx.locked or tps & self._streaming):
                # The open long transaction holds uncommitted work of a partition we no longer
                # own: it can never commit. Roll back; the partitions we keep restart from the
                # database offsets.
                keep = tx.locked - tps
                self._abandon_tx("partitions revoked during a long transaction")
                self._need_reseek |= keep
            for tp in tps:
                metrics.drop_apply_lag(*tp)  # another member's to report now
                self._parts.pop(tp, None)
                self._streaming.discard(tp)
                self._paused.discard(tp)
                self._need_reseek.discard(tp)
            log().info(event, partitions=tp_text(sorted(tps)))
        except BaseException as exc:
            self._callback_error = exc

    def _raise_callback_error(self) -> None:
        if self._callback_error is not None:
            exc, self._callback_error = self._callback_error, None
            raise exc


__all__ = ["COOPERATIVE", "OwnedPartition", "RebalanceCallbacks", "is_eager"]
