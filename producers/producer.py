"""The CDC producer loop (``cutover produce``): slot → pgoutput → Avro → Kafka, with no loss.

Reading (:mod:`producers.slot_reader`, ``[source] read_mode``): ``"sql"`` peeks with
``pg_logical_slot_peek_binary_changes`` through a SERVER-SIDE cursor (PostgreSQL materialises
the peek in a tuplestore that spills to disk, so even a 1,000,000-row transaction never sits in
client memory) and advances with ``pg_replication_slot_advance``; ``"stream"``
(:mod:`producers.wal_stream`) reads over the streaming replication protocol, where the
walsender decodes once and pushes, and confirms with a standby status update. Neither consumes
anything before step 5 below. (The consuming ``pg_logical_slot_get_*`` functions are never
used.)

The commit protocol, run at every checkpoint (see :meth:`CdcProducer._checkpoint`):

1. read a bounded batch of whole transactions: a checkpoint is taken after ~``peek_batch``
   changes, at a Commit boundary; a giant transaction is streamed through and checkpointed at
   its Commit;
2. produce every event (explicit partition ``crc32(key) % partitions``, the last event of each
   transaction per partition marked ``last_in_partition``);
3. flush and check that every delivery succeeded (a failure or timeout raises KafkaError: NO
   advance, exit 3);
4. record the position durably in legacy ``cutover.producer_state`` (write-ahead of the advance,
   so after any crash ``slot <= record``: a slot found AHEAD of the record moved behind our back);
5. confirm the end LSN of the last acknowledged commit (``reader.confirm``: the advance, or
   the status update);
6. send heartbeats (rate-limited to ``heartbeat_interval_s``) to every partition;
7. record snapshot progress of the chunks whose rows were acknowledged in this checkpoint.

A restart resumes from the slot; events between the slot and the record are delivered again
(duplicates with the same ``(source.lsn, source.seq)``, which consumers ignore).

Catch-up (``read_mode = "sql"``): every peek re-decodes the WAL from the slot's
``restart_lsn``, which PostgreSQL only moves at ``xl_running_xacts`` records (every 15 s or at
checkpoints). Draining a large backlog with one peek per ``peek_batch`` changes would decode the
same WAL over and over, so while the producer is behind, one peek reads up to
``peek_batch * catchup_factor`` changes and is still checkpointed every ``peek_batch`` changes
(steps 3-7 run between rows of the cursor: the slot is not held once the peek has been
materialised). In stream mode a read just returns to the loop's duties after that many.

Other duties: one producer per slot and slot safety at start (:mod:`producers.slot_safety`);
heartbeats while idle (``pg_logical_emit_message(true, 'cutover.heartbeat', ...)`` so the slot
advances even when the captured tables are idle: PostgreSQL 15 skips empty transactions, and a
transactional logical message is not empty); DBLog snapshots (:mod:`producers.snapshot_runner`);
SIGTERM/SIGINT finish the current checkpoint and exit 0; crash points for fault tests.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, Final

import psycopg

from cutover import codec, fence, metrics, pg, shutdown
from cutover.config import Settings
from cutover.control_store import PRODUCER_TABLES, ControlStore
from cutover.control_store import producer as producer_state
from cutover.direction import Direction, forward
from cutover.errors import (
    ConfigError,
    DatabaseError,
    KafkaError,
    RuntimeFailure,
)
from cutover.logging import get_logger
from cutover.mapping import MappingSpec, load_mapping
from producers import coverage, kafka_io, row_letters
from producers.events import (
    HEARTBEAT_KEY,
    HEARTBEAT_PREFIX,
    ChangeStream,
    SourceInfo,
    TableRoute,
    heartbeat_record,
)
from producers.fast_avro import encoder_for
from producers.pgoutput import lsn_to_str
from producers.registry import framing_for
from producers.run_options import (
    ProducerOptions,
    ProducerReport,
    peak_rss_kb,
)
from producers.slot_reader import PeekReader, SlotReader, apply_session_settings, ms_since
from producers.slot_safety import SlotStatus, acquire_producer_lock, check_slot
from producers.snapshot_runner import SnapshotRunner
from producers.wal_stream import WalStreamReader

# The slot-lag gauge is read at most this often: not one more round trip in every cycle.
_LAG_EVERY_S: Final = 1.0
# Kafka heartbeats are rate-limited to the interval, with slack so that idle heartbeats, which
# are themselves one interval apart, are not skipped every other time by timing jitter.
_HEARTBEAT_SLACK: Final = 0.8

Conn = psycopg.Connection[Any]
ProgressCallback = Callable[[dict[str, Any]], None]


def _version() -> str:
    try:
        return metadata.version("kafka-cutover")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def _db(exc: psycopg.Error, doing: str) -> DatabaseError:
    return pg.translate(exc, doing, "source")


def _crash(point: str) -> None:
    """Kill this process like ``kill -9`` would (no flush, no atexit, no finally)."""
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # pragma: no cover - SIGKILL does not return


class CdcProducer:
    """One producer on one slot. :meth:`run` returns when stopped; raises on failure."""

    def __init__(
        self,
        settings: Settings,
        options: ProducerOptions,
        *,
        stop: threading.Event | None = None,
        progress: ProgressCallback | None = None,
        direction: Direction | None = None,
    ) -> None:
        # Which database, slot, publication and topics (cutover.direction): from here on
        # ``settings.source`` is the capture side of that direction.
        self.direction = direction or forward(settings)
        settings = self.direction.settings_for_capture(settings)
        self.settings = settings
        self.options = options
        self.stop = stop or threading.Event()
        self.progress = progress
        self.log = get_logger("cutover.producer").bind(slot=settings.source.slot)
        self.report = ProducerReport()
        self._published: set[int] = set()
        self._persisted: dict[str, tuple[codec.ColumnSpec, ...]] = {}
        self._hb_schema = codec.writer_schema(codec.heartbeat_schema())
        self._last_kafka_hb = 0.0
        self._last_advance = time.monotonic()
        self._last_watch = time.monotonic()
        self._lag_read = -_LAG_EVERY_S
        self._position = 0
        self._checkpointed_commits = 0
        self._fenced_seen: frozenset[str] = frozenset()
        self._domain_partitions: dict[str, int] = {}
        self._timings: dict[str, float] = {}

    # -- setup ---------------------------------------------------------------------------------

    def _connect(self, name: str, *, autocommit: bool) -> Conn:
        conn: Conn = pg.connect(
            self.settings.source.dsn,
            side=self.direction.capture_side,
            autocommit=autocommit,
            application_name=f"cutover produce ({name})",
            doing="cannot connect",
        )
        # The type output functions run in this session: fix what pgoutput.py assumes.
        apply_session_settings(conn, self.direction.capture_side)
        return conn

    def _open_reader(self) -> SlotReader:
        """The reader of ``[source] read_mode`` (producers.slot_reader), at the slot's position."""
        src = self.settings.source
        side = self.direction.capture_side
        if src.read_mode == "stream":
            return WalStreamReader(
                src.dsn,
                self.ctl,
                slot=src.slot,
                publication=src.publication,
                side=side,
                start_lsn=self._position,
                stop=self.stop,
                timings=self._timings,
                application_name="cutover produce (stream)",
                log=self.log,
            )
        return PeekReader(
            self._connect("reader", autocommit=False),
            self.ctl,
            slot=src.slot,
            publication=src.publication,
            side=side,
            stop=self.stop,
            timings=self._timings,
        )

    def run(self) -> ProducerReport:
        settings = self.settings
        started = time.monotonic()
        self.mapping = self.direction.routes(load_mapping(settings.mapping_path))
        with self._connect("control", autocommit=True) as ctl:
            # The producer's state lives next to the slot it reads (forward: legacy, schema
            # cutover; reverse: commerce, [target] control_schema).
            self.ctl = ctl
            direction = self.direction
            self.store = ControlStore(ctl, direction.producer_schema, direction.capture_side)
            status = self._start()
            # What was built so far (modules, settings, clients) lives as long as the run: kept
            # out of the cyclic collector's full passes, which would walk it in vain (the change
            # path makes no reference cycles); given back at the end (in-process callers).
            gc.freeze()
            self.log.info(
                "producer.started",
                direction=self.direction.way,
                publication=settings.source.publication,
                position=lsn_to_str(self._position),
                recorded=lsn_to_str(status.recorded),
                topics=self._domain_partitions,
                producer=self.options.producer_name,
                fenced=sorted(self._fenced_seen),
                read_mode=settings.source.read_mode,
            )
            self.reader = self._open_reader()
            self.kafka.while_waiting = self.reader.keep_alive
            try:
                self._loop(started)
            finally:
                gc.unfreeze()
                self.reader.close()
                self.report.elapsed_s = time.monotonic() - started
                self.report.peak_rss_kb = peak_rss_kb()
                self.log.info(
                    "producer.stopped",
                    reason=self.report.stopped_by or "error",
                    events=self.report.events,
                    snapshot_rows=self.report.snapshot_rows,
                    transactions=self.report.transactions,
                    position=lsn_to_str(self._position),
                    elapsed_s=round(self.report.elapsed_s, 3),
                )
        return self.report

    def _start(self) -> SlotStatus:
        """Lock the slot, check it, connect to Kafka and build the stream and snapshot runner."""
        settings, src = self.settings, self.settings.source
        if self.store.missing(PRODUCER_TABLES):
            raise ConfigError(
                f"the producer's control tables (schema {self.store.schema}, {self.store.side} "
                "database) are missing: run `cutover init`"
                + (" --reverse" if self.direction.reverse else "")
            )
        warning = pg.superuser_warning(self.ctl, "cutover produce")
        if warning is not None:
            self.log.warning("producer.superuser", problem=warning)
        acquire_producer_lock(self.ctl, src.slot)
        status = check_slot(self.store, src.slot, log=self.log)
        self._position = status.confirmed
        self._persisted = producer_state.read_table_columns(self.store, src.slot)
        # The captured set is watched (producers.coverage): at start, per Relation, periodically.
        if self.direction.watch_capture:
            coverage.check_publication(self.ctl, src.publication, self.mapping)
        db = str(self.ctl.execute("SELECT current_database()").fetchone()[0])  # type: ignore[index]
        self.kafka = kafka_io.KafkaOut(settings.kafka, client_id=f"cutover-producer-{src.slot}")
        self._domain_partitions = self._partitions()
        # A schema registry configured: Confluent-framed values (producers.registry).
        framing = framing_for(settings, self.mapping, self.direction.topic, self.stop)
        if framing is not None:
            self._hb_schema = framing.heartbeat(self._hb_schema)
        self._publish_schema_ws(self._hb_schema)
        # Rows the envelope cannot carry are withheld as dead letters (producers.row_letters).
        self.letters = row_letters.LetterBox(settings, self.store, self.kafka)
        self.stream = ChangeStream(
            self.mapping,
            SourceInfo(version=_version(), name=settings.kafka.topic_prefix, db=db),
            partitions=self._domain_partitions,
            topic_for=self.direction.topic,
            emit=self.kafka.produce,
            on_schema=self._on_schema,
            known_columns=self._persisted,
            clock_ms=lambda: time.time_ns() // 1_000_000,
            encoder_factory=encoder_for if framing is None else framing.encoder_factory,
            on_letter=self.letters.reject,
            max_event_bytes=settings.kafka.max_message_bytes - row_letters.SIZE_MARGIN,
            carry_truncates=self.options.carry_truncates,
            # The domains whose write fence was up at the slot's position (cutover.fence).
            fenced_domains=fence.fenced_at(
                self.ctl, self.store.schema, status.confirmed, side=self.direction.capture_side
            ),
        )
        self._fenced_seen = frozenset(self.stream.fenced)
        self.stream.refused = self.letters.open_keys()
        self._publish_schema_ws(self.stream.truncate_writer)
        self.snapshots = SnapshotRunner(
            settings,
            self.store,
            self.mapping,
            self.stream,
            log=self.log,
            progress=self.progress,
            watch_capture=self.direction.watch_capture,
        )
        if self.options.initial_snapshot and self.direction.snapshots:
            created = producer_state.ensure_initial_requests(
                self.store, src.slot, list(self.mapping.tables)
            )
            if created:
                self.log.info("snapshot.initial_queued", tables=len(created))
        return status

    def _partitions(self) -> dict[str, int]:
        """The partition count of every domain topic (a mismatch with the config is logged)."""
        kafka = self.settings.kafka
        topics = self.direction.topics(self.mapping)
        partitions = self.kafka.partitions([*topics, kafka.schemas_topic])
        for topic in topics:
            if partitions[topic] != kafka.partitions:
                self.log.warning(
                    "producer.partition_mismatch",
                    topic=topic,
                    partitions=partitions[topic],
                    configured=kafka.partitions,
                )
        return {t: partitions[t] for t in topics}

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self, started: float) -> None:
        src = self.settings.source
        limit = src.peek_batch
        max_limit = src.peek_batch * max(1, self.options.catchup_factor)
        while True:
            if self.stop.is_set():
                self.report.stopped_by = "signal"
                break
            if (
                self.options.max_runtime_s is not None
                and time.monotonic() - started >= self.options.max_runtime_s
            ):
                self.report.stopped_by = "max_runtime"
                break
            self.snapshots.maybe_start_chunk()
            read = self._read_once(limit)
            if not self.reader.caught_up:
                limit = min(limit * 2, max_limit)  # behind: read more per peek (module doc)
                continue
            # Everything in the WAL was read (caught up).
            limit = src.peek_batch
            busy = bool(self.stream.windows) or self.snapshots.request is not None
            if self.options.exit_when_idle and not busy and not self.snapshots.poll(force=True):
                self.report.stopped_by = "idle"
                break
            if time.monotonic() - self._last_advance >= src.heartbeat_interval_s:
                self._emit_heartbeat()
            elif read == 0 and not busy:
                self.reader.wait(self.options.idle_sleep_s)
        # Whatever was produced since the last checkpoint (heartbeats) must be acknowledged.
        self.kafka.flush()

    def _read_once(self, limit: int) -> int:
        """One read of the slot; checkpoints every ~peek_batch changes. Returns messages read."""
        batch = self.settings.source.peek_batch
        stream = self.stream
        feed = stream.feed

        def handle(data: bytes) -> bool:
            feed(data)
            if stream.tx is None and stream.changes_in_batch >= batch:
                # (1) a bounded batch of whole transactions: checkpoint here.
                self._checkpoint()
                # Everything read so far is delivered and confirmed: a signal need not wait
                # for the rest of a long catch-up read.
                return not self.stop.is_set()
            return True

        rows = self.reader.read(limit, handle)
        if stream.tx is not None:
            raise RuntimeFailure(
                f"the read of slot {self.settings.source.slot} ended inside a transaction; this "
                "should not happen (the readers return whole transactions)"
            )
        if stream.transactions != self._checkpointed_commits:
            self._checkpoint()
        return rows

    def _checkpoint(self) -> None:
        """Steps 2-7 of the commit protocol (module docstring) for what was read so far."""
        stream = self.stream
        lsn = stream.last_commit_end_lsn
        assert lsn is not None
        # (2) every event of the batch has been handed to the producer by stream.feed.
        # Crash points fire at the first checkpoint that carries events: one of only filtered
        # transactions (echoes, heartbeats) would have nothing to redeliver.
        carries = bool(stream.events_by_topic)
        if self.options.crash_at == "after_produce_before_ack" and carries:
            _crash("after_produce_before_ack")
        # (3) flush and check every delivery; KafkaError propagates: no advance.
        t0 = time.monotonic()
        try:
            self.kafka.flush()
        except KafkaError:
            metrics.delivery_failed()
            raise
        self._timings["flush_ms"] = ms_since(t0)
        t0 = time.monotonic()
        self.letters.resolve(stream.cleared)  # their full images are acknowledged
        stream.cleared.clear()
        for topic, count in stream.events_by_topic.items():
            metrics.events_produced(topic.rsplit(".", 1)[-1], count)
        stream.events_by_topic.clear()
        # (4) record the position durably (write-ahead of the advance).
        producer_state.record_position(
            self.store,
            self.settings.source.slot,
            self.settings.source.publication,
            lsn,
            self.options.producer_name,
        )
        if self.options.crash_at == "after_ack_before_advance" and carries:
            _crash("after_ack_before_advance")
        self._timings["record_ms"] = ms_since(t0)
        # (5) confirm the end of the last acknowledged commit: the slot advances (SQL) or the
        # walsender is told (stream); never before (3) and (4).
        self.reader.confirm(lsn)
        self._account(lsn)
        # (6) heartbeats, at most one round per interval.
        now = time.monotonic()
        if (
            now - self._last_kafka_hb
            >= self.settings.source.heartbeat_interval_s * _HEARTBEAT_SLACK
        ):
            self._send_heartbeats(lsn)
            self._last_kafka_hb = now
        # (7) snapshot progress: the chunk rows are acknowledged and the slot is past the HW.
        if stream.completed_chunks:
            chunks = list(stream.completed_chunks)
            stream.completed_chunks.clear()
            for window in chunks:
                self.snapshots.chunk_done(window)

    def _account(self, lsn: int) -> None:
        """After step 5: the report, metrics and log line of the checkpoint just taken."""
        stream = self.stream
        events = stream.events - self.report.events
        txs = stream.transactions - self._checkpointed_commits
        echoes = stream.echo_dropped - self.report.echo_dropped
        fenced_out = stream.fence_dropped - self.report.fence_dropped
        self._position = lsn
        self._last_advance = time.monotonic()
        self._checkpointed_commits = stream.transactions
        self.report.events = stream.events
        self.report.snapshot_rows = stream.snapshot_rows
        self.report.transactions = stream.transactions
        self.report.echo_dropped = stream.echo_dropped
        self.report.fence_dropped = stream.fence_dropped
        self.report.checkpoints += 1
        self.report.position = lsn
        stream.reset_batch_counters()
        self.log.info("slot.advanced", lsn=lsn_to_str(lsn))
        metrics.slot_advanced(lsn)
        if echoes:
            metrics.echo_dropped(echoes)
        if stream.fenced != self._fenced_seen:
            self._fenced_seen = frozenset(stream.fenced)
            self.log.info(
                "producer.fences_changed", fenced=sorted(self._fenced_seen), lsn=lsn_to_str(lsn)
            )
        self._report_slot_lag()
        self._watch_publication()
        self.log.info(
            "producer.batch_delivered",
            events=events,
            txs=txs,
            echo_dropped=echoes,
            fence_dropped=fenced_out,
            lsn=lsn_to_str(lsn),
            peak_rss_mb=round(peak_rss_kb() / 1024, 1),
            # Where a cycle's time goes (bench/cdc_latency.py reads these).
            **{k: v for k, v in self._timings.items() if not k.startswith("_")},
        )

    # -- heartbeats ----------------------------------------------------------------------------

    def _emit_heartbeat(self) -> None:
        """A transactional logical message: gives the slot something to advance to when idle."""
        try:
            self.ctl.execute(
                "SELECT pg_logical_emit_message(true, %s, %s)",
                (HEARTBEAT_PREFIX, self.options.producer_name),
            )
        except psycopg.Error as exc:
            raise pg.translate(
                exc, "emitting a heartbeat message", self.direction.capture_side
            ) from None
        # Counts as activity: the next idle heartbeat is one interval later.
        self._last_advance = time.monotonic()

    def _report_slot_lag(self) -> None:
        """WAL the slot holds back, for the ``cutover_slot_lag_bytes`` gauge (once a second)."""
        now = time.monotonic()
        if now - self._lag_read < _LAG_EVERY_S:
            return
        self._lag_read = now
        try:
            row = self.ctl.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.settings.source.slot,),
            ).fetchone()
        except psycopg.Error as exc:
            raise pg.translate(exc, "reading the slot's lag", self.direction.capture_side) from None
        if row is not None and row[0] is not None:
            metrics.set_slot_lag(int(row[0]))

    def _send_heartbeats(self, lsn: int) -> None:
        value = codec.encode(
            self._hb_schema,
            heartbeat_record(time.time_ns() // 1_000_000, lsn, self.options.producer_name),
        )
        for topic, count in self._domain_partitions.items():
            for partition in range(count):
                self.kafka.produce(
                    topic, partition, HEARTBEAT_KEY, value, kafka_io.HEADERS_HEARTBEAT
                )
        metrics.heartbeat_sent()
        self.log.debug("heartbeat.sent", lsn=lsn_to_str(lsn))

    # -- schemas -------------------------------------------------------------------------------

    def _publish_schema_ws(self, ws: codec.WriterSchema) -> None:
        if ws.fingerprint in self._published:
            return
        self.kafka.produce(
            self.settings.kafka.schemas_topic,
            0,
            ws.fingerprint_hex.encode(),
            ws.json.encode(),
            kafka_io.HEADERS_SCHEMA,
        )
        # Acknowledged before the first event that uses it is produced.
        self.kafka.flush()
        self._published.add(ws.fingerprint)
        self.log.info("schema.published", schema=ws.name, fingerprint=ws.fingerprint_hex)

    def _watch_publication(self) -> None:
        """Periodic coverage check: a table that left the publication sends no Relation at all."""
        now = time.monotonic()
        if (
            not self.direction.watch_capture
            or now - self._last_watch < self.settings.source.heartbeat_interval_s
        ):
            return
        self._last_watch = now
        coverage.check_publication(self.ctl, self.settings.source.publication, self.mapping)

    def _on_schema(self, route: TableRoute, changes: list[str]) -> None:
        # Before any change of this shape becomes an event: a lost mapped column stops here.
        if self.direction.watch_capture:
            coverage.check_relation(self.mapping, route.qualified, (c.name for c in route.columns))
        self._publish_schema_ws(route.writer)
        if changes:
            self.log.info(
                "schema.evolved",
                table=route.qualified,
                changes=changes,
                fingerprint=route.writer.fingerprint_hex,
            )
        if self._persisted.get(route.qualified) != route.columns:
            producer_state.record_table_columns(
                self.store,
                self.settings.source.slot,
                route.qualified,
                route.columns,
                route.writer.fingerprint_hex,
            )
            self._persisted[route.qualified] = route.columns


def run_producer(
    settings: Settings,
    options: ProducerOptions,
    *,
    stop: threading.Event | None = None,
    progress: ProgressCallback | None = None,
    install_signals: bool = False,
    direction: Direction | None = None,
) -> ProducerReport:
    """Run a producer until stopped. With ``install_signals``, SIGTERM/SIGINT stop it cleanly."""
    stop = stop or threading.Event()
    if install_signals:

        def _handler(signum: int, _frame: Any) -> None:
            stop.set()

        shutdown.adopt(_handler)
    return CdcProducer(settings, options, stop=stop, progress=progress, direction=direction).run()


def mapping_tables(mapping: MappingSpec) -> list[str]:
    return list(mapping.tables)
