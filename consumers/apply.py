"""`cutover apply`: the Kafka source of the apply engine (exactly-once effect into commerce).

One process = one member of the consumer group ``apply.group_id`` (``[kafka] apply_assignment``:
cooperative-sticky or range, ``read_committed``, no auto commit), subscribed to the domain
topics of the mapping.
:class:`ApplyConsumer` polls, buffers and plans per partition, and plays its part of the commit
protocol of :mod:`consumers.engine` (the fence, the offsets); the engine runs the loop and the
transaction. The decisions live in pure modules (:mod:`consumers.events`, :mod:`consumers.batch`,
:mod:`consumers.sql`) and the database work in :mod:`consumers.sink`.

Exactly-once effect, in three parts:

* **offsets live in the commerce database**, in the transaction that applies the rows
  (``cutover.consumer_offsets``). On assignment a partition is sought to the stored
  ``next_offset`` (or the beginning); Kafka's committed offsets are only a monitoring hint;
* **a fence**: a batch locks its partitions' offsets rows (``FOR UPDATE``) and checks that
  ``next_offset`` is still what this member started from. If another member progressed (this
  one is a zombie of a rebalance it has not heard of yet) the partition is dropped from the
  batch and re-sought from the database;
* **position guards**: every row write applies only if its source position is newer (see
  :mod:`consumers.sql`), so whatever is applied twice (a crash between COMMIT and the next
  poll, a rebalance, a replay from offset 0) changes nothing.

Per-aggregate atomicity: a partition's messages are committed only up to its last event that
closes a unit (:func:`consumers.batch.closed_prefix`); the open tail is buffered, not stored. A
tail that grows past ``long_tx_events`` (a huge source transaction) is applied in sub-batches
inside one database transaction kept open across polls — the other partitions are paused
meanwhile — and committed when its closing event arrives. Memory stays bounded by the sub-batch
size and librdkafka's prefetch queue (``queued.max.messages.kbytes``, 32 MB by default here).

Rebalances (:mod:`consumers.rebalance`, eager or cooperative protocol): revoked or lost
partitions lose their buffered state; if an open long transaction held work of a revoked
partition it is rolled back and the remaining partitions are re-sought from the database.
Commerce database unavailable: the batch is abandoned, the loop reconnects for up to
``db_retry_s`` seconds and re-seeks every partition from the stored offsets, or stops with a
DatabaseError (exit 3). SIGTERM/SIGINT (``stop``): the current batch is finished and
committed, an open long transaction is rolled back (it cannot commit half a source
transaction), the consumer leaves the group cleanly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
from confluent_kafka import KafkaError as RdKafkaError
from structlog.typing import FilteringBoundLogger

from consumers.batch import TP, Entry, plan_step
from consumers.engine import (
    ApplyEngine,
    ApplySummary,
    Batch,
    CommitInfo,
    CrashPoint,
    Decoder,
    Tx,
)
from consumers.letters import DlqPublisher, RecordLetters
from consumers.rebalance import OwnedPartition, RebalanceCallbacks, is_eager, tp_text
from consumers.reverse import sink_factory
from consumers.schemas import SchemaReader
from consumers.sink import Sink
from cutover import kafka, metrics, pg
from cutover.config import Settings
from cutover.control_store.offsets import NEW_ROW_OFFSET
from cutover.direction import Direction, forward
from cutover.errors import DatabaseError, KafkaError
from cutover.kafka import translate as kafka_error
from cutover.logging import get_logger
from cutover.mapping import MappingSpec, load_mapping


def log() -> FilteringBoundLogger:
    # Looked up at each use, not at import: a logger bound before cutover.logging.configure()
    # runs would keep structlog's defaults (console renderer on stdout).
    return get_logger(__name__)


# SQLSTATEs worth a rollback and a retry of the batch rather than stopping.
_TRANSIENT = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03"})


@dataclass(frozen=True, slots=True)
class ApplyOptions:
    """Knobs of one apply process that are not in the config file."""

    #: Open-tail length (events) from which a partition's source transaction is applied in
    #: sub-batches inside one long database transaction. Default: 2 × batch_max_events.
    long_tx_events: int | None = None
    #: How long to keep reconnecting to an unavailable commerce database before exit 3.
    db_retry_s: float = 60.0
    #: Stop (exit 0) after this long without a message and with nothing pending.
    exit_when_idle_s: float | None = None
    #: Called after every COMMIT.
    on_commit: Callable[[CommitInfo], None] | None = None
    #: Fault tests only (``CUTOVER_CRASH_AT``): kill this process like ``kill -9`` right before
    #: or right after the commerce COMMIT of a batch.
    crash_at: CrashPoint | None = None


class ApplyConsumer(RebalanceCallbacks):
    """One apply process: the Kafka source of :class:`consumers.engine.ApplyEngine`.
    ``run()`` until ``stop`` is set (or idle, see :class:`ApplyOptions`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        mapping: MappingSpec | None = None,
        options: ApplyOptions | None = None,
        stop: threading.Event | None = None,
        direction: Direction | None = None,
    ) -> None:
        # Which topics, group and database (cutover.direction): from here on ``settings.target``
        # is the apply side of that direction and ``settings.apply.group_id`` its group.
        self.direction = direction or forward(settings)
        settings = self.direction.settings_for_apply(settings)
        self.settings = settings
        self.mapping = mapping if mapping is not None else load_mapping(settings.mapping_path)
        self.options = options or ApplyOptions()
        self.stop = stop or threading.Event()
        self.group = settings.apply.group_id
        self.control = settings.target.control_schema
        self.batch_max = settings.apply.batch_max_events
        self.long_tx_events = self.options.long_tx_events or 2 * self.batch_max
        self.topics = self.direction.topics(self.mapping)
        self.eager = is_eager(settings.kafka.apply_assignment)
        self.engine = ApplyEngine(
            self.mapping,
            connect=self._connect_db,
            control_schema=self.control,
            letters=RecordLetters(
                self.group,
                halt=settings.apply.dlq_policy == "halt",
                publisher=lambda: DlqPublisher(settings),
            ),
            domain_of={self.direction.topic(d): d for d in self.mapping.domains},
            on_commit=self.options.on_commit,
            crash_at=self.options.crash_at,
            observe=True,
            sink_factory=sink_factory(self.direction),
            side=self.direction.apply_side,
        )
        self._parts: dict[TP, OwnedPartition] = {}
        self._streaming: set[TP] = set()
        self._paused: set[TP] = set()
        self._need_reseek: set[TP] = set()
        self._db_broken = False
        self._callback_error: BaseException | None = None
        self._consumer: Any = None
        self._schemas: SchemaReader | None = None
        self._decoder: Decoder | None = None
        self._last_message = time.monotonic()
        self._lag_reported = 0.0

    @property
    def summary(self) -> ApplySummary:
        return self.engine.summary

    @property
    def sink(self) -> Sink:
        return self.engine.db

    # ================================================================== lifecycle

    def run(self) -> ApplySummary:
        try:
            self._start()
            self.engine.run(self, self.stop)
            if self.engine.tx is not None:
                # Stopping inside a long source transaction: it cannot be committed in part.
                # Whoever gets the partitions next re-applies it from the stored offsets.
                self._abandon_tx("stopping inside a long source transaction")
        except BaseException:
            self._abandon_tx("error")
            raise
        finally:
            self._close()
        return self.summary

    def _start(self) -> None:
        self._connect()
        self._check_control_tables()
        warning = pg.superuser_warning(self.engine.db.conn, "cutover apply")
        if warning is not None:
            log().warning("apply.superuser", problem=warning)
        self._schemas = SchemaReader(self.settings.kafka, self.group)
        self._schemas.refresh()
        self._decoder = Decoder(self._schemas.store, self._schemas.refresh)
        # The exactly-once protocol's settings (no auto commit, read_committed, the assignor
        # of [kafka] apply_assignment) are mandatory in cutover.kafka: the pass-through cannot
        # change them. The callbacks (consumers.rebalance) follow the assignor's protocol.
        self._consumer = kafka.consumer(
            self.settings.kafka,
            "apply",
            group_id=self.group,
            extra={"error_cb": self._on_kafka_error},
        )
        self._consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._last_message = time.monotonic()
        log().info(
            "apply.started",
            group_id=self.group,
            topics=self.topics,
            batch_max_events=self.batch_max,
            long_tx_events=self.long_tx_events,
        )

    def next_batch(self) -> Batch | None:
        """One poll: the entries to apply now, per partition (the engine's Source protocol)."""
        self._update_pause()
        idle = self.options.exit_when_idle_s
        if (
            idle is not None
            and self.engine.tx is None
            and time.monotonic() - self._last_message > idle
            and not any(p.buffer for p in self._parts.values())
        ):
            log().info("apply.idle_exit", idle_s=idle)
            return None
        try:
            msgs = self._poll_adaptive()
        except KafkaException as exc:
            raise kafka_error(exc, "consuming") from None
        self._raise_callback_error()
        if msgs:
            self._last_message = time.monotonic()
        if self._db_broken:
            raise DatabaseError("connection lost", side="target")
        self._ingest(msgs)
        self._report_lag()
        plan = self._plan()
        return Batch(plan, commit=not self._streaming)

    def _report_lag(self) -> None:
        """``cutover_apply_lag_messages`` of every owned partition, once a second: the end offset
        librdkafka last saw (cached from fetch responses: no broker round trip) minus the next
        offset to apply. Unknown until the partition was fetched once (not reported as 0)."""
        now = time.monotonic()
        if now - self._lag_reported < 1.0:
            return
        self._lag_reported = now
        for (topic, partition), part in list(self._parts.items()):
            try:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), cached=True
                )
            except KafkaException:
                continue
            if high >= 0:
                applied = part.committed if part.committed is not None else max(low, 0)
                metrics.set_apply_lag(topic, partition, high - applied)

    def _poll_adaptive(self) -> list[Any]:
        """Up to ``batch_max`` messages, waiting at most ``batch_max_wait_ms`` for the first.

        Adaptive cadence: ``consume(n, wait)`` returns only when n messages arrived or the wait
        ran out, so at a steady trickle every event sat out the whole wait (the commit-to-applied
        latency of bench/cdc_latency.py). Instead, block only until the first message, then take
        whatever librdkafka has already fetched without waiting: a small batch when little is
        pending (low latency), a full one when much is (throughput). The offsets still commit
        only with the applied transaction (:mod:`consumers.engine`).
        """
        consumer = self._consumer
        assert consumer is not None
        first = consumer.poll(self.settings.apply.batch_max_wait_ms / 1000)
        if first is None:
            return []
        msgs: list[Any] = [first]
        if self.batch_max > 1:
            msgs.extend(consumer.consume(self.batch_max - 1, 0))
        return msgs

    def _on_kafka_error(self, err: RdKafkaError) -> None:
        log().warning("apply.kafka_error", error=err.str(), code=err.name(), fatal=err.fatal())

    def _close(self) -> None:
        log().info("apply.stopping", **self.summary.fields())
        if self._consumer is not None:
            try:
                # Leaves the group: the remaining members get our partitions at once.
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log().warning("apply.close_failed", error=str(exc))
            self._consumer = None
        self.engine.letters.close()
        if self._schemas is not None:
            self._schemas.close()
        self.engine.close()
        log().info("apply.stopped")

    # ================================================================== database connection

    def _connect_db(self) -> psycopg.Connection[tuple[object, ...]]:
        return pg.connect(
            self.settings.target.dsn,
            side=self.direction.apply_side,
            connect_timeout=10,
            application_name=f"cutover-apply:{self.group}",
        )

    def _connect(self) -> None:
        self.engine.connect()
        self._db_broken = False

    def _check_control_tables(self) -> None:
        for table in self.sink.control.missing(self.sink.CONTROL_TABLES)[:1]:
            init = "cutover init --reverse" if self.direction.reverse else "cutover init"
            raise DatabaseError(
                f"control table {self.control}.{table} does not exist: run `{init}` first",
                side=self.direction.apply_side,
            )

    def recover(self, exc: DatabaseError) -> bool:
        """Source protocol: recover from a database error if it is worth a retry."""
        if not (self.engine.broken() or self._db_broken):
            state = exc.sqlstate or ""
            if state not in _TRANSIENT and not state.startswith("08"):
                return False
        self._recover(exc)
        return True

    def _recover(self, exc: DatabaseError) -> None:
        """Abandon the batch, reconnect, and re-seek every partition from the stored offsets."""
        log().warning("apply.db_retry", error=exc.message, sqlstate=exc.sqlstate)
        self._abandon_tx("database error")
        deadline = time.monotonic() + self.options.db_retry_s
        delay = 0.2
        while True:
            if self.stop.is_set():
                # Nothing is half-applied (the batch was abandoned, offsets live with the rows):
                # a stop asked during an outage ends the wait instead of outlasting it.
                log().info("apply.db_retry_stopped")
                return
            try:
                if self.engine.broken():
                    self._connect()
                self._reseek(list(self._parts))
                break
            except DatabaseError as again:
                if time.monotonic() > deadline:
                    raise DatabaseError(
                        f"commerce database unavailable for {self.options.db_retry_s:.0f}s, "
                        f"giving up: {again.message}",
                        side="target",
                        sqlstate=again.sqlstate,
                    ) from None
                self.engine.close()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        log().info("apply.db_recovered")

    def _abandon_tx(self, reason: str) -> None:
        if not self.engine.rollback(reason):
            self._db_broken = True
        self._streaming.clear()
        self._resume_all()

    # ================================================================== seeking

    def _reseek(self, tps: Sequence[TP]) -> None:
        """Point partitions back at the stored offsets, forgetting what was buffered."""
        tps = [tp for tp in tps if tp in self._parts]
        if not tps:
            return
        offsets = self.sink.read_offsets(self.group, tps, lock=False)
        for tp in tps:
            part = self._parts[tp]
            off = offsets.get(tp)
            if off is not None and off < 0:
                off = None
            part.committed = off
            part.cursor = off or 0
            part.buffer.clear()
            try:
                self._consumer.seek(
                    TopicPartition(tp[0], tp[1], OFFSET_BEGINNING if off is None else off)
                )
                self._need_reseek.discard(tp)
            except KafkaException as exc:
                # E.g. the fetcher has not started on a just-assigned partition: try again on
                # the next loop; until then its messages are dropped.
                log().info("apply.seek_deferred", partition=tp_text([tp]), error=str(exc))
                self._need_reseek.add(tp)
        log().info("apply.reseeked", offsets={f"{t}[{p}]": offsets.get((t, p)) for t, p in tps})

    def _resume_all(self) -> None:
        if self._paused and self._consumer is not None:
            self._resume(list(self._paused))

    def _resume(self, tps: list[TP]) -> None:
        self._consumer.resume([TopicPartition(t, p) for t, p in tps])
        for tp in tps:
            self._paused.discard(tp)
            part = self._parts.get(tp)
            if part is None:
                continue
            # Fetching restarts where this member stopped taking messages.
            try:
                self._consumer.seek(TopicPartition(tp[0], tp[1], part.cursor))
            except KafkaException:
                self._need_reseek.add(tp)

    def _update_pause(self) -> None:
        """While a long transaction is open only its partitions are fetched."""
        want = (set(self._parts) - self._streaming) if self._streaming else set()
        pause = want - self._paused
        resume = self._paused - want
        if pause:
            self._consumer.pause([TopicPartition(t, p) for t, p in pause])
            self._paused |= pause
        if resume:
            self._resume(list(resume))

    # ================================================================== ingest: decode, buffer

    def _ingest(self, msgs: Sequence[Any]) -> None:
        if self._need_reseek:
            pending = set(self._need_reseek)
            self._reseek(list(pending))
            skip = pending  # messages of this poll predate the seek
        else:
            skip = set()
        decoder = self._decoder
        assert decoder is not None
        refreshed = False
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaError(f"consumer failed: {err.str()}", code=err.name())
                if err.code() != RdKafkaError._PARTITION_EOF:
                    log().warning("apply.kafka_error", error=err.str(), code=err.name())
                continue
            tp = (msg.topic(), msg.partition())
            part = self._parts.get(tp)
            if part is None or tp in skip or tp in self._need_reseek:
                continue
            offset = msg.offset()
            if offset < part.cursor:
                continue  # fetched before a seek, or already taken
            part.cursor = offset + 1
            entry = Entry(offset, msg.key(), msg.value())
            refreshed = decoder.decode(entry, refreshed)
            part.buffer.append(entry)

    # ================================================================== plan: what a step applies

    def _plan(self) -> dict[TP, list[Entry]]:
        """Take, per partition, the entries this step applies (see the module docstring)."""
        step = plan_step(
            {tp: part.buffer for tp, part in self._parts.items()},
            self._streaming,
            batch_max=self.batch_max,
            long_tx_events=self.long_tx_events,
        )
        for tp, tail in step.opened:
            log().info("apply.long_tx_opened", partition=tp_text([tp]), open_tail=tail)
        for tp in step.closed:
            log().info("apply.long_tx_closed", partition=tp_text([tp]))
        self._streaming = step.streaming
        plan: dict[TP, list[Entry]] = {}
        for tp, take in step.take.items():
            buf = self._parts[tp].buffer
            plan[tp] = buf[:take]
            del buf[:take]
        return plan

    # ================================================================== the engine's hooks

    def claim(self, sink: Sink, tx: Tx, batch: Batch) -> None:
        """Commit protocol, step 2 (see :mod:`consumers.engine`): the fence. Lock the offsets
        rows of partitions new to this transaction and check they still hold what this member
        started from. A partition another member moved on is dropped from the batch and
        re-sought from the database."""
        new = [tp for tp in batch.entries if tp not in tx.locked]
        for tp in self._fence(sink, tx, new):
            del batch.entries[tp]
            self._streaming.discard(tp)
            self._reseek([tp])
        batch.commit = not self._streaming

    def _fence(self, sink: Sink, tx: Tx, tps: list[TP]) -> set[TP]:
        absent = [tp for tp in tps if self._parts[tp].committed is None]
        if absent:
            sink.claim_offsets(self.group, absent)
        stored = sink.read_offsets(self.group, tps, lock=True)
        fenced: set[TP] = set()
        for tp in tps:
            expected = self._parts[tp].committed
            got = stored.get(tp)
            ok = got == (NEW_ROW_OFFSET if expected is None else expected)
            if ok:
                tx.locked.add(tp)
            else:
                fenced.add(tp)
                log().warning(
                    "apply.fenced", partition=tp_text([tp]), expected=expected, stored=got
                )
        return fenced

    def before_commit(self, sink: Sink, tx: Tx) -> None:
        """Step 6: store next_offset (last offset of the batch + 1) and the source progress of
        every partition in the transaction."""
        if tx.pending:
            sink.store_offsets(self.group, list(tx.pending.values()))

    def after_commit(self, tx: Tx) -> None:
        """Step 8: remember what is stored (the fence of the next batch expects it), then tell
        Kafka too, asynchronously: only a monitoring hint, never read back."""
        hints: list[TopicPartition] = []
        for tp, upd in tx.pending.items():
            part = self._parts.get(tp)
            if part is not None:
                part.committed = upd.next_offset
                hints.append(TopicPartition(tp[0], tp[1], upd.next_offset))
        if hints:
            try:
                self._consumer.commit(offsets=hints, asynchronous=True)
            except KafkaException as exc:
                log().debug("apply.kafka_commit_hint_failed", error=str(exc))


__all__ = ["ApplyConsumer", "ApplyOptions", "ApplySummary", "CommitInfo"]
