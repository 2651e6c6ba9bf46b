"""The apply engine: one loop that turns batches of decoded messages into commerce rows.

Three sources feed it, each a thin adapter (:class:`Source`):

* the Kafka consumer group of ``cutover apply`` (:mod:`consumers.apply`): partitions, fence,
  offsets stored with the rows, long source transactions, rebalances, database recovery;
* a replay file, for ``cutover replay play --to-target`` (:mod:`consumers.replay.play`);
* the dead-letter table, for ``cutover dlq retry`` (:mod:`consumers.dlq`).

A source hands out :class:`Batch` es: per partition, :class:`~consumers.batch.Entry` objects
decoded with :class:`Decoder` (a decode error stays on the entry and becomes a dead letter).
The engine owns the database transaction and the steps every source shares; the source gets a
hook where its protocol differs. Commit protocol (the numbers are used where the steps happen):

1. BEGIN, unless a transaction is already open (a long source transaction spans batches);
2. ``source.claim``: the source takes what the batch is about under the transaction's locks
   (Kafka: the offsets fence; dead letters: the rows) and drops what it no longer owns;
3. decode errors become dead letters; heartbeats only update the partition's offsets row;
   changes go to :class:`~consumers.sink.Sink`, set-based with position guards, which returns
   the poison changes;
4. poison messages go to the :class:`~consumers.letters.LetterPolicy` (halt, or record);
5. before COMMIT the policy flushes what left the process (the dead-letter topic);
6. ``source.before_commit`` writes its bookkeeping in the transaction (Kafka: the offsets);
7. COMMIT: rows, tombstones, dead letters and bookkeeping become visible together;
8. ``source.after_commit`` (Kafka: remember the stored offsets, hint them to Kafka).

Database errors from any step go to ``source.recover``, which may reconnect and go on.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import psycopg

from consumers.batch import TP, Entry
from consumers.events import Change, Heartbeat, from_record
from consumers.letters import DeadLetter, LetterPolicy
from consumers.sink import Sink
from cutover import metrics
from cutover.codec import SchemaStore
from cutover.control_store import Side
from cutover.control_store.offsets import OffsetUpdate
from cutover.errors import CutoverError, DatabaseError, DecodeError, UnknownSchema
from cutover.logging import get_logger
from cutover.mapping import MappingSpec
from cutover.origin import setup_session

CrashPoint = Literal["apply_before_commit", "apply_after_commit"]

_LATENCY_SAMPLE = 10_000


@dataclass(frozen=True, slots=True)
class CommitInfo:
    """What one COMMIT made visible (for observers: the benchmark, metrics)."""

    committed_at_ms: int
    source_ts_ms: Sequence[int]
    events: int
    dead_letters: int


@dataclass(slots=True)
class ApplySummary:
    events: int = 0
    upserted: int = 0
    deleted: int = 0
    dead_letters: int = 0
    commits: int = 0
    truncates: int = 0

    def fields(self) -> dict[str, int]:
        return {
            "events": self.events,
            "upserted": self.upserted,
            "deleted": self.deleted,
            "truncates": self.truncates,
            "dead_letters": self.dead_letters,
            "commits": self.commits,
        }


@dataclass(slots=True)
class Tx:
    """The open commerce-database transaction."""

    #: Partitions the source claimed in this transaction (step 2 runs once per partition).
    locked: set[TP] = field(default_factory=set)
    pending: dict[TP, OffsetUpdate] = field(default_factory=dict)
    events: int = 0
    upserted: int = 0
    deleted: int = 0
    letters: int = 0
    truncated: list[str] = field(default_factory=list)
    source_ts: list[int] = field(default_factory=list)
    # For the metrics: events per domain, and source commit times of a bounded sample of them
    # (the latency histogram; a 1,000,000-event transaction must not grow memory).
    by_domain: dict[str, int] = field(default_factory=dict)
    latency_sample: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class Batch:
    """Entries to apply in the open transaction, per partition, in partition order."""

    entries: dict[TP, list[Entry]]
    #: COMMIT after applying; False while a source transaction is still open (a long one is
    #: applied in sub-batches of one database transaction). ``claim`` may change it.
    commit: bool = True


class Source(Protocol):
    """Where batches come from, and the source's part of the commit protocol."""

    def next_batch(self) -> Batch | None:
        """The next batch (possibly empty: nothing to do now); None when the source is done."""

    def claim(self, sink: Sink, tx: Tx, batch: Batch) -> None:
        """Step 2 (after BEGIN): lock what the batch is about, drop from ``batch`` what this
        process no longer owns."""

    def before_commit(self, sink: Sink, tx: Tx) -> None:
        """Step 6: the source's bookkeeping, in the transaction."""

    def after_commit(self, tx: Tx) -> None:
        """Step 8: after COMMIT."""

    def recover(self, exc: DatabaseError) -> bool:
        """A database error happened: recover and return True, or False to raise it."""


class SimpleSource:
    """No-op hooks for sources without bookkeeping of their own."""

    def claim(self, sink: Sink, tx: Tx, batch: Batch) -> None:
        tx.locked.update(batch.entries)

    def before_commit(self, sink: Sink, tx: Tx) -> None:
        return None

    def after_commit(self, tx: Tx) -> None:
        return None

    def recover(self, exc: DatabaseError) -> bool:
        return False


class Decoder:
    """Decodes entries with a schema store; ``refresh`` (if any) re-reads the schemas topic
    once per round when a fingerprint is unknown: only one still unknown then is poison."""

    def __init__(self, store: SchemaStore, refresh: Callable[[], object] | None = None) -> None:
        self.store = store
        self.refresh = refresh

    def decode(self, entry: Entry, refreshed: bool = False) -> bool:
        """Decode ``entry`` in place (event or error); returns whether a refresh happened."""
        if entry.value is None:
            entry.error = DecodeError("message has no value (null)")
            return refreshed
        try:
            try:
                ws, record = self.store.decode(entry.value)
            except UnknownSchema:
                if refreshed or self.refresh is None:
                    raise
                self.refresh()
                refreshed = True
                ws, record = self.store.decode(entry.value)
            entry.event = from_record(ws.name, record)
        except DecodeError as exc:
            entry.error = exc
        return refreshed


# The apply loop allocates ~40 objects per event (decoded records, rows, operations) and makes
# almost no reference cycles: with CPython's default threshold (700) the cyclic collector ran
# every ~20 events and its full collections walked every live batch, ~19 µs of CPU per event
# (bench/apply_throughput.py). Cycles are still collected, just less often.
_GC_GEN0_THRESHOLD = 50_000


@contextlib.contextmanager
def tuned_gc() -> Iterator[None]:
    """Collect cycles less often, and never scan what exists at start (modules, the mapping,
    the schemas): ``gc.freeze`` moves it to the permanent generation. Garbage is collected
    first (frozen, it would never be freed), and both are undone at the end, so an in-process
    caller (tests, the replay sandbox) gets its collector back as it was."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    if before[0] < _GC_GEN0_THRESHOLD:
        gc.set_threshold(_GC_GEN0_THRESHOLD, before[1], before[2])
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _crash() -> None:
    """Die like ``kill -9`` would: no flush, no rollback, no finally."""
    os.kill(os.getpid(), signal.SIGKILL)


Connect = Callable[[], psycopg.Connection[tuple[object, ...]]]
SinkFactory = Callable[[psycopg.Connection[tuple[object, ...]], MappingSpec, str], Sink]


class ApplyEngine:
    """Applies batches from a :class:`Source` through one commerce-database connection."""

    def __init__(
        self,
        mapping: MappingSpec,
        *,
        connect: Connect,
        control_schema: str,
        letters: LetterPolicy,
        domain_of: Mapping[str, str],
        on_commit: Callable[[CommitInfo], None] | None = None,
        crash_at: CrashPoint | None = None,
        observe: bool = False,
        sink_factory: SinkFactory = Sink,
        side: Side = "target",
    ) -> None:
        self.mapping = mapping
        #: The sink class (the reverse direction writes legacy: consumers.reverse.LegacySink)
        #: and which side its database is, for messages.
        self.sink_factory = sink_factory
        self.side = side
        self._connect = connect
        self.control = control_schema
        self.letters = letters
        self.domain_of = domain_of
        self.on_commit = on_commit
        self.crash_at = crash_at
        #: Feed the Prometheus metrics (the long-running consumer does).
        self.observe = observe
        self.sink: Sink | None = None
        self.tx: Tx | None = None
        self.summary = ApplySummary()

    # ------------------------------------------------------------------ connection

    def connect(self) -> Sink:
        """(Re)connect; the previous connection, if any, is closed.

        The session takes a replication origin first: the other direction's producer drops what
        it writes (no echo), and a write fence on the target lets it through.
        """
        self.close()
        conn = self._connect()
        try:
            setup_session(conn, side=self.side)
        except BaseException:
            conn.close()
            raise
        self.sink = self.sink_factory(conn, self.mapping, self.control)
        return self.sink

    @property
    def db(self) -> Sink:
        assert self.sink is not None
        return self.sink

    def broken(self) -> bool:
        conn = self.sink.conn if self.sink is not None else None
        return conn is None or conn.closed or conn.broken

    def close(self) -> None:
        if self.sink is not None and not self.sink.conn.closed:
            self.sink.conn.close()

    # ------------------------------------------------------------------ the loop

    def run(self, source: Source, stop: threading.Event | None = None) -> ApplySummary:
        """Apply every batch of ``source`` until it is done or ``stop`` is set."""
        with tuned_gc():
            try:
                while stop is None or not stop.is_set():
                    try:
                        batch = source.next_batch()
                        if batch is None:
                            break
                        self.step(source, batch)
                    except DatabaseError as exc:
                        if not source.recover(exc):
                            raise
            except BaseException:
                self.rollback("error")
                raise
        return self.summary

    def step(self, source: Source, batch: Batch) -> None:
        if batch.entries:
            self.apply(source, batch)
        if self.tx is not None and batch.commit:
            self.commit(source)

    def rollback(self, reason: str) -> bool:
        """Abandon the open transaction; False when the connection could not even roll back."""
        if self.tx is not None:
            get_logger(__name__).warning(
                "apply.tx_rolled_back",
                reason=reason,
                events=self.tx.events,
                partitions=len(self.tx.locked),
            )
        self.tx = None
        if self.sink is None:
            return True
        try:
            self.sink.rollback()
        except DatabaseError:
            return False
        return True

    # ------------------------------------------------------------------ steps 1-4

    def apply(self, source: Source, batch: Batch) -> None:
        # 1. BEGIN, unless a long transaction is already open.
        if self.tx is None:
            self.db.begin()
            self.tx = Tx()
        tx = self.tx
        # 2. The source claims the batch's partitions (new ones in this transaction only).
        if any(tp not in tx.locked for tp in batch.entries):
            source.claim(self.db, tx, batch)
        # 3. Decode errors become dead letters; heartbeats only update the offsets row;
        #    changes go to the sink, which applies them set-based with position guards.
        changes, refs, letters = self._sort(tx, batch.entries)
        stats, failures = self.db.apply(changes)
        for i, error in failures:
            tp, entry = refs[i]
            letters.append(self.letter(tp, entry, error, changes[i].table))
        # 4. Poison messages: the policy halts, or records them in this transaction.
        if letters:
            letters.sort(key=lambda letter: (letter.topic, letter.partition, letter.offset))
            self.letters.handle(self.db, letters)
        tx.events += sum(len(entries) for entries in batch.entries.values())
        tx.upserted += stats.upserted
        tx.deleted += stats.deleted
        tx.truncated += stats.truncated
        tx.letters += len(letters)

    def _sort(
        self, tx: Tx, plan: Mapping[TP, Sequence[Entry]]
    ) -> tuple[list[Change], list[tuple[TP, Entry]], list[DeadLetter]]:
        """Step 3 without I/O: the batch's changes (with where each came from), its dead
        letters, and the offsets rows' progress."""
        changes: list[Change] = []
        refs: list[tuple[TP, Entry]] = []
        letters: list[DeadLetter] = []
        keep_ts = self.on_commit is not None  # bounded memory otherwise
        for tp, entries in plan.items():
            domain = tp[0].rsplit(".", 1)[-1]
            tx.by_domain[domain] = tx.by_domain.get(domain, 0) + len(entries)
            upd = tx.pending.get(tp)
            if upd is None:
                upd = tx.pending[tp] = OffsetUpdate(tp[0], tp[1], entries[0].offset)
            sample = tx.latency_sample
            seen, lsn, ts = False, 0, 0  # any change; the newest source LSN and commit time
            for entry in entries:
                event = entry.event
                if entry.error is not None or event is None:
                    letters.append(self.letter(tp, entry, entry.error, None))
                elif isinstance(event, Heartbeat):
                    upd.last_heartbeat_ms = max(upd.last_heartbeat_ms or 0, event.ts_ms)
                    if self.observe:
                        metrics.heartbeat_seen(domain, event.ts_ms)
                else:
                    if len(sample) < _LATENCY_SAMPLE:
                        sample.append(event.ts_ms)
                    changes.append(event)
                    refs.append((tp, entry))
                    # Plain comparisons: two max() calls per event cost more than the rest.
                    seen = True
                    if event.lsn > lsn:  # noqa: PLR1730
                        lsn = event.lsn
                    if event.ts_ms > ts:  # noqa: PLR1730
                        ts = event.ts_ms
                    if keep_ts:
                        tx.source_ts.append(event.ts_ms)
            if seen:
                upd.last_source_lsn = max(upd.last_source_lsn or 0, lsn)
                upd.last_source_ts_ms = max(upd.last_source_ts_ms or 0, ts)
            # Only offsets of whole units are ever committed: at COMMIT every partition of the
            # transaction ended on a closing event (streaming ones are committed when closed).
            upd.next_offset = entries[-1].offset + 1
        return changes, refs, letters

    def letter(
        self, tp: TP, entry: Entry, error: CutoverError | None, table: str | None
    ) -> DeadLetter:
        return DeadLetter(
            topic=tp[0],
            partition=tp[1],
            offset=entry.offset,
            key=entry.key,
            value=entry.value,
            error=error or DecodeError("undecodable message"),
            domain=self.domain_of.get(tp[0]),
            source_table=table,
        )

    # ------------------------------------------------------------------ steps 5-8

    def commit(self, source: Source) -> None:
        tx = self.tx
        assert tx is not None
        # 5. Dead letters sent in this transaction are acknowledged by Kafka before COMMIT. A
        #    crash after this and before 7 redoes the batch and sends them again: at least once
        #    on the topic, exactly once in cutover.dead_letters (unique per offset).
        if tx.letters:
            self.letters.flush()
        # 6. The source's bookkeeping (Kafka: next_offset and the source progress of every
        #    partition in the transaction; the rows were locked in 2).
        source.before_commit(self.db, tx)
        # 7. COMMIT: rows, tombstones, dead letters and bookkeeping become visible together.
        if self.crash_at == "apply_before_commit":
            _crash()
        self.db.commit()
        if self.crash_at == "apply_after_commit":
            _crash()
        self.tx = None
        committed_at = int(time.time() * 1000)
        if self.observe:
            metrics.batch_applied(tx.by_domain, tx.latency_sample, committed_at)
        # 8. The source's part after COMMIT.
        source.after_commit(tx)
        s = self.summary
        s.events += tx.events
        s.upserted += tx.upserted
        s.deleted += tx.deleted
        s.dead_letters += tx.letters
        s.commits += 1
        s.truncates += len(tx.truncated)
        for table in tx.truncated:
            # Rare and destructive: one line each (the rows are in cutover.truncates).
            get_logger(__name__).warning("apply.truncate_applied", table=table)
            if self.observe:
                metrics.truncate_applied(table)
        get_logger(__name__).info(
            "apply.batch_committed",
            events=tx.events,
            partitions=len(tx.pending),
            upserted=tx.upserted,
            deleted=tx.deleted,
            dead_letters=tx.letters,
            ms=round((time.monotonic() - tx.started) * 1000, 1),
        )
        if self.on_commit is not None:
            self.on_commit(CommitInfo(committed_at, tx.source_ts, tx.events, tx.letters))


__all__ = [
    "ApplyEngine",
    "ApplySummary",
    "Batch",
    "CommitInfo",
    "Decoder",
    "SimpleSource",
    "Source",
    "Tx",
]
