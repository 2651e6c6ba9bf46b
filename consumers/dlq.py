"""`cutover dlq list` / `cutover dlq retry`: inspect and re-drive dead letters.

What a dead letter is and how the apply path records it: :mod:`consumers.letters`.

``cutover dlq retry`` is a source of the apply engine (:mod:`consumers.engine`): the open letters
of ``cutover.dead_letters`` are re-decoded with the current schemas and applied with the current
mapping through the same sink (position guards included): an event older than what the commerce
row holds is a successful no-op. Its dead-letter policy records a letter that fails again on the
letter itself (it stays open with the new error) instead of making a new one.

Both take a :class:`~cutover.direction.Direction` (``--reverse``): the reverse appliers keep their
letters in legacy's ``[reverse] control_schema`` and retry through the legacy sink; the reverse
producer's withheld rows are in commerce's control schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from structlog.typing import FilteringBoundLogger

from consumers.batch import Entry
from consumers.engine import ApplyEngine, Batch, Decoder, SimpleSource, Tx
from consumers.letters import DeadLetter, DlqPublisher, PoisonHalt
from consumers.reverse import sink_factory
from consumers.schemas import SchemaReader
from consumers.sink import Sink
from cutover import pg
from cutover.config import Settings
from cutover.control_store import ControlStore, dead_letters
from cutover.direction import Direction, forward
from cutover.envelope import lsn_to_str
from cutover.errors import DatabaseError, DecodeError, UncarriableValue
from cutover.logging import get_logger
from cutover.mapping import load_mapping

__all__ = [
    "DeadLetter",
    "DlqPublisher",
    "LetterRow",
    "PoisonHalt",
    "RetryReport",
    "list_dead_letters",
    "retry_dead_letters",
]


def log() -> FilteringBoundLogger:
    # Looked up at each use, not at import: a logger bound before cutover.logging.configure()
    # runs would keep structlog's defaults (console renderer on stdout).
    return get_logger(__name__)


# ------------------------------------------------------------------------- cutover dlq list


@dataclass(frozen=True, slots=True)
class LetterRow:
    id: int
    group_id: str
    domain: str | None
    topic: str
    partition: int
    offset: int
    source_table: str | None
    error_class: str
    error_message: str
    status: str
    created_at: datetime
    resolved_at: datetime | None
    #: "consumer" (an applier's poison message) or "producer" (a row the producer withheld,
    #: in legacy's cutover.producer_dead_letters: shown as p<id>, no partition or offset).
    origin: str = "consumer"

    @property
    def label(self) -> str:
        return f"p{self.id}" if self.origin == "producer" else str(self.id)

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "group_id": self.group_id,
            "domain": self.domain,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "source_table": self.source_table,
            "error_class": self.error_class,
            "error": self.error_message,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
            "origin": self.origin,
        }


def list_dead_letters(
    settings: Settings, status: str | None, direction: Direction | None = None
) -> list[LetterRow]:
    """The appliers' dead letters (their database), then the rows the producer withheld (the
    captured database), of ``direction`` (default forward)."""
    way = direction or forward(settings)
    applied = way.settings_for_apply(settings).target
    with pg.connect(applied.dsn, side=way.apply_side, application_name="cutover dlq") as conn:
        store = ControlStore(conn, applied.control_schema, way.apply_side)
        letters = dead_letters.list_rows(store, status)
    rows = [LetterRow(*letter) for letter in letters]
    try:
        with pg.connect(
            way.capture.dsn, side=way.capture_side, application_name="cutover dlq"
        ) as conn:
            store = ControlStore(conn, way.producer_schema, way.capture_side)
            if store.exists(dead_letters.PRODUCER_TABLE):
                produced = dead_letters.list_producer_rows(store, status)
                rows.extend(_producer_row(p) for p in produced)
    except DatabaseError as exc:
        # The appliers' letters are still worth showing; the gate reads legacy on its own.
        log().warning("dlq.producer_letters_unread", error=exc.message)
    return rows


def _producer_row(row: dead_letters.ProducerLetterRow) -> LetterRow:
    letter = row.letter
    column = f" in column {letter.column}" if letter.column else ""
    return LetterRow(
        row.id,
        "producer",
        letter.domain,
        letter.topic,
        -1,
        -1,
        letter.source_table,
        UncarriableValue.__name__,
        f"{letter.reason}{column}; key {letter.row_key}; LSN {lsn_to_str(letter.source_lsn)}",
        row.status,
        row.created_at,
        row.resolved_at,
        origin="producer",
    )


# ------------------------------------------------------------------------- cutover dlq retry


@dataclass(slots=True)
class RetryReport:
    retried: list[int] = field(default_factory=list)
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # id, class, message

    def as_json(self) -> dict[str, object]:
        return {
            "retried": self.retried,
            "failed": [{"id": i, "error_class": c, "error": m} for i, c, m in self.failed],
        }


def retry_dead_letters(
    settings: Settings, letter_id: int | None, direction: Direction | None = None
) -> RetryReport:
    """Re-drive open dead letters (one by id, or all) through decode, mapping and the sink of
    ``direction``'s appliers (default forward).

    One database transaction: each letter that applies is marked 'retried'; one that fails again
    stays 'open' with its new error. Offsets are not touched (the consumers moved on long ago).
    """
    way = direction or forward(settings)
    applied = way.settings_for_apply(settings)
    mapping = load_mapping(settings.mapping_path)
    reader = SchemaReader(settings.kafka, applied.apply.group_id)
    try:
        reader.refresh()
    finally:
        reader.close()
    control = applied.target.control_schema
    source = _LetterSource(control, letter_id, Decoder(reader.store))
    engine = ApplyEngine(
        mapping,
        connect=lambda: pg.connect(
            applied.target.dsn, side=way.apply_side, application_name="cutover dlq"
        ),
        control_schema=control,
        letters=source,
        domain_of={way.topic(d): d for d in mapping.domains},
        sink_factory=sink_factory(way),
        side=way.apply_side,
    )
    sink = engine.connect()
    try:
        source.load(sink)
        engine.run(source)
    finally:
        engine.close()
    return source.report


Position = tuple[str, int, int]


class _LetterSource(SimpleSource):
    """The open dead letters as one batch, and the retry's dead-letter policy: a letter that
    fails again keeps its row (status open, the new error); the others are marked retried."""

    def __init__(self, control: str, letter_id: int | None, decoder: Decoder) -> None:
        self.control = control
        self.letter_id = letter_id
        self.decoder = decoder
        self.report = RetryReport()
        self._ids: dict[Position, list[int]] = {}
        self._batch: Batch | None = None
        self._failed: set[int] = set()

    def _open_letters(self, sink: Sink) -> list[dead_letters.OpenLetter]:
        return dead_letters.lock_open(sink.control, self.letter_id)

    def load(self, sink: Sink) -> None:
        """Read the open letters into one batch, decoded (outside the transaction)."""
        entries: dict[tuple[str, int], list[Entry]] = {}
        for lid, topic, partition, offset, key, payload in self._open_letters(sink):
            entry = Entry(int(offset), key, payload if isinstance(payload, bytes) else None)
            if entry.value is None:
                entry.error = DecodeError("the dead letter has no payload (a null message value)")
            else:
                self.decoder.decode(entry)
            position = (str(topic), int(partition), int(offset))
            if position not in self._ids:  # the same message dead in two groups: apply once
                entries.setdefault(position[:2], []).append(entry)
            self._ids.setdefault(position, []).append(int(lid))
        for batch_entries in entries.values():
            batch_entries.sort(key=lambda e: e.offset)
        self._batch = Batch(entries)

    def next_batch(self) -> Batch | None:
        batch, self._batch = self._batch, None
        return batch

    def claim(self, sink: Sink, tx: Tx, batch: Batch) -> None:
        """Lock the letters (a parallel retry skips them); drop those locked or retried
        elsewhere since they were read."""
        locked = {(str(t), int(p), int(o)) for _i, t, p, o, _k, _v in self._open_letters(sink)}
        for tp in list(batch.entries):
            kept = [e for e in batch.entries[tp] if (tp[0], tp[1], e.offset) in locked]
            if kept:
                batch.entries[tp] = kept
            else:
                del batch.entries[tp]
        self._ids = {pos: ids for pos, ids in self._ids.items() if pos in locked}
        super().claim(sink, tx, batch)

    # The dead-letter policy of a retry (consumers.letters.LetterPolicy).

    def handle(self, sink: Sink, letters: Sequence[DeadLetter]) -> None:
        for letter in letters:
            for lid in self._ids.get((letter.topic, letter.partition, letter.offset), []):
                self._failed.add(lid)
                dead_letters.note_retry_failure(
                    sink.control, lid, letter.error_class, letter.error.message
                )
                self.report.failed.append((lid, letter.error_class, letter.error.message))
                log().warning(
                    "dlq.retry_failed", id=lid, error_class=letter.error_class,
                    error=letter.error.message,
                )  # fmt: skip

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def before_commit(self, sink: Sink, tx: Tx) -> None:
        for (topic, partition, offset), ids in sorted(self._ids.items()):
            for lid in ids:
                if lid in self._failed:
                    continue
                dead_letters.mark_retried(sink.control, lid)
                self.report.retried.append(lid)
                log().info("dlq.retried", id=lid, topic=topic, partition=partition, offset=offset)
        self.report.retried.sort()
        self.report.failed.sort()
