"""Producer dead letters: a row the envelope cannot carry stops that row, not the stream.

A value the envelope cannot carry (NaN or +-Infinity in a constrained numeric, an infinite or
out-of-range date/time, text its type cannot hold) or an event over the message size limit
raises :class:`~cutover.errors.UncarriableValue` where the value is converted
(:mod:`producers.pgoutput.values`, :mod:`producers.routes`) or, for the size, where the event
is encoded (:mod:`producers.events`). The change stream then withholds that one event and
hands a :class:`RowLetter` to the producer's :class:`LetterBox`, which, by ``[apply]
dlq_policy``:

* ``dlq`` (default): publishes it to the DLQ topic (headers ``cutover.origin=producer``, topic,
  table, key, LSN, reason; the value is the same, as JSON) and records it in legacy's
  ``cutover.producer_dead_letters``, which the ``dead_letters`` gate and ``cutover dlq list``
  read. The rest of the source transaction and every other row flow on; the slot moves on
  (the letter is acknowledged by Kafka before the slot is advanced, like every event).
* ``halt``: stops the producer (exit 3) naming table, key and LSN and how to resume.

Never a column value: a letter is built from the table, the row's primary key, the LSN, the
column name and a reason word of a fixed vocabulary (the exception's message, which may show the
value, is not used). Social (excluded) columns are not published, so they never reach here.

A letter is resolved by the producer when a later *full* image of the same row is delivered
(an UPDATE that carries every column, a DELETE, a snapshot row of ``cutover snapshot --table T
--where ...``): that image replaces whatever commerce held. An UPDATE with unchanged TOAST
columns does not resolve it (commerce would keep their older values).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cutover import metrics
from cutover.config import Settings
from cutover.control_store import ControlStore, dead_letters
from cutover.envelope import lsn_to_str
from cutover.errors import RuntimeFailure, UncarriableValue, UnmappableRow
from cutover.logging import get_logger
from producers.kafka_io import KafkaOut
from producers.routes import TableRoute

#: Room left under ``[kafka] max_message_bytes`` for the key, headers and record overhead.
SIZE_MARGIN: Final = 4096


@dataclass(frozen=True, slots=True)
class RowLetter:
    """What the producer publishes and records about one withheld row: no column values."""

    domain: str
    topic: str
    table: str
    key: str  # the row's primary key, JSON object text
    message_key: bytes  # the event's Kafka key (the aggregate id)
    lsn: int
    reason: str
    column: str | None

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        """Kafka headers, in the spirit of the appliers' dead letters (``cutover.*``)."""
        return [
            ("cutover.origin", b"producer"),
            ("cutover.topic", self.topic.encode()),
            ("cutover.table", self.table.encode()),
            ("cutover.key", self.key.encode()),
            ("cutover.lsn", lsn_to_str(self.lsn).encode()),
            ("cutover.error_class", UncarriableValue.__name__.encode()),
            ("cutover.error", self.reason.encode()),
        ]

    def payload(self) -> bytes:
        return json.dumps(
            {
                "origin": "producer",
                "topic": self.topic,
                "table": self.table,
                "key": self.key,
                "lsn": lsn_to_str(self.lsn),
                "reason": self.reason,
                "column": self.column,
            }
        ).encode()

    def record(self) -> dead_letters.ProducerLetter:
        return dead_letters.ProducerLetter(
            self.domain, self.topic, self.table, self.key, self.lsn, self.reason, self.column
        )

    def describe(self) -> str:
        where = f" (column {self.column})" if self.column else ""
        return f"{self.table} key {self.key} at LSN {lsn_to_str(self.lsn)}: {self.reason}{where}"


class RefusedRow(dict[str, object]):
    """A snapshot row that did not decode: what did (for its key) and why (``error``)."""

    def __init__(self, partial: Mapping[str, object], error: UncarriableValue) -> None:
        super().__init__(partial)
        self.error = error


def row_key(primary_key: Sequence[str], row: Mapping[str, object]) -> str:
    """The row's primary key as JSON object text (values as JSON, others as their text)."""
    return json.dumps({c: row.get(c) for c in primary_key}, default=str)


def letter_for(
    exc: UncarriableValue, route: TableRoute, row: Mapping[str, object], lsn: int
) -> RowLetter:
    """The dead letter of ``row`` of ``route`` refused with ``exc`` at commit LSN ``lsn``."""
    try:
        message_key = route.key_of(row)[0].encode()
    except UnmappableRow:  # the aggregate id itself did not decode: still a letter, keyless
        message_key = b""
    return RowLetter(
        domain=route.mapping.domain,
        topic=route.topic,
        table=route.qualified,
        key=row_key(route.mapping.primary_key, row),
        message_key=message_key,
        lsn=lsn,
        reason=exc.reason,
        column=exc.column,
    )


def halt_message(letter: RowLetter) -> str:
    """The stop message of the ``halt`` policy: table, key, LSN and how to resume."""
    table = letter.table.rsplit(".", 1)[-1]
    return (
        f"the producer cannot carry {letter.describe()}; [apply] dlq_policy = 'halt' stops "
        "at it for every domain (one slot). Resume: correct the row in legacy (its next "
        "change flows), or switch dlq_policy to 'dlq' to withhold it as a dead letter and "
        f"re-send it later with `cutover snapshot --table {table} --where ...`; then restart "
        "`cutover produce`"
    )


class LetterBox:
    """The producer's side of dead letters: the policy, the DLQ topic, the control table."""

    def __init__(self, settings: Settings, store: ControlStore, kafka: KafkaOut) -> None:
        self.policy = settings.apply.dlq_policy
        self.topic = settings.kafka.dlq_topic
        self.slot = settings.source.slot
        self.store = store
        self.kafka = kafka
        self.log = get_logger("cutover.producer").bind(slot=self.slot)
        self.sent = 0

    def open_keys(self) -> set[tuple[str, str]]:
        """(table, row key) of the open letters: a full image of one of them resolves it."""
        return dead_letters.open_producer_keys(self.store, self.slot)

    def reject(self, letter: RowLetter) -> None:
        """Withhold one row: halt, or publish and record its letter (acked before any advance:
        the checkpoint flushes the DLQ message with the events)."""
        if self.policy == "halt":
            raise RuntimeFailure(halt_message(letter))
        self.kafka.produce(self.topic, 0, letter.message_key, letter.payload(), letter.headers())
        dead_letters.record_producer(self.store, self.slot, letter.record())
        metrics.dead_letter(letter.domain, UncarriableValue.__name__)
        self.sent += 1
        self.log.warning(
            "producer.dead_letter",
            table=letter.table,
            key=letter.key,
            lsn=lsn_to_str(letter.lsn),
            reason=letter.reason,
            column=letter.column,
            dlq_topic=self.topic,
        )

    def resolve(self, cleared: Sequence[tuple[str, str, int]]) -> None:
        """Resolve the letters of rows whose full image was acknowledged."""
        if not cleared:
            return
        done = dead_letters.resolve_producer(self.store, self.slot, cleared)
        for table, key, lsn in cleared:
            self.log.info(
                "producer.dead_letter_resolved", table=table, key=key, lsn=lsn_to_str(lsn)
            )
        self.log.debug("producer.dead_letters_resolved", count=done)
