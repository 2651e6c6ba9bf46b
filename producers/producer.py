"""The CDC producer loop (``cutover produce``): slot → pgoutput → Avro → Kafka, with no loss.

Reading: ``pg_logical_slot_peek_binary_changes`` through a SERVER-SIDE cursor (a psycopg named
cursor fetching ``_ITERSIZE`` rows at a time), so even a 1,000,000-row transaction never sits in
client memory: PostgreSQL materialises the peek result in a tuplestore that spills to disk, and
we stream it through. Peek never consumes; the slot moves only by ``pg_replication_slot_advance``
in step 5 below. (The consuming ``pg_logical_slot_get_*`` functions are never used.)

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
5. ``pg_replication_slot_advance(slot, end LSN of the last acknowledged commit)``;
6. send heartbeats (rate-limited to ``heartbeat_interval_s``) to every partition;
7. record snapshot progress of the chunks whose rows were acknowledged in this checkpoint.

A restart resumes from the slot; events between the slot and the record are delivered again
(duplicates with the same ``(source.lsn, source.seq)``, which consumers ignore).

Catch-up: every peek re-decodes the WAL from the slot's ``restart_lsn``, which PostgreSQL only
moves at ``xl_running_xacts`` records (every 15 s or at checkpoints). Draining a large backlog
with one peek per ``peek_batch`` changes would decode the same WAL over and over, so while the
producer is behind, one peek reads up to ``peek_batch * catchup_factor`` changes and is still
checkpointed every ``peek_batch`` changes (steps 3-7 run between rows of the cursor: the slot is
not held once the peek has been materialised).

Other duties: one producer per slot (a session advisory lock derived from the slot name; the
second one is refused naming the holder's pid); slot safety at start (:func:`check_slot`);
heartbeats while idle (``pg_logical_emit_message(true, 'cutover.heartbeat', ...)`` so the slot
advances even when the captured tables are idle: PostgreSQL 15 skips empty transactions, and a
transactional logical message is not empty); DBLog snapshots (:mod:`producers.snapshot`);
SIGTERM/SIGINT finish the current checkpoint and exit 0; crash points for fault tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Final

import psycopg
from psycopg import sql

from cutover import codec, metrics, pg
from cutover.config import Settings
from cutover.errors import (
    CheckFailed,
    ConfigError,
    CutoverError,
    KafkaError,
    RuntimeFailure,
    SlotSafetyError,
)
from cutover.logging import get_logger
from cutover.mapping import MappingSpec, load_mapping
from producers import kafka_io, snapshot, source_state
from producers.events import (
    HEARTBEAT_KEY,
    HEARTBEAT_PREFIX,
    ChangeStream,
    ChunkWindow,
    SourceInfo,
    TableRoute,
    heartbeat_record,
)
from producers.fast_avro import encoder_for
from producers.pgoutput import lsn_to_str

CRASH_POINTS: Final = ("after_produce_before_ack", "after_ack_before_advance")
_ITERSIZE: Final = 5_000
# Advisory lock namespace ('cutv'); the second key is crc32 of the slot name.
_LOCK_CLASS: Final = 0x63757476
_REQUEST_POLL_S: Final = 1.0
# Key chunks re-reading rows changed with unchanged TOAST values inside a window, at most.
_MAX_REREADS: Final = 5
# How long a starting producer waits for a slot still held by a (dead producer's) backend.
_SLOT_BUSY_WAIT_S: Final = 30.0
# Kafka heartbeats are rate-limited to the interval, with slack so that idle heartbeats, which
# are themselves one interval apart, are not skipped every other time by timing jitter.
_HEARTBEAT_SLACK: Final = 0.8

Conn = psycopg.Connection[Any]
ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    """Run-time choices, built once at the entry point (no environment reads below it)."""

    crash_at: str | None = None  # CUTOVER_CRASH_AT: one of CRASH_POINTS
    initial_snapshot: bool = True
    exit_when_idle: bool = False  # stop once caught up and no snapshot is left (tests, bench)
    max_runtime_s: float | None = None
    catchup_factor: int = 8
    idle_sleep_s: float = 0.2
    producer_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ConfigError(
                f"CUTOVER_CRASH_AT={self.crash_at!r} is not a crash point; known: "
                + ", ".join(CRASH_POINTS)
            )


def options_from_environ(environ: dict[str, str], **kwargs: Any) -> ProducerOptions:
    """Options from the environment snapshot taken at the entry point."""
    return ProducerOptions(crash_at=environ.get("CUTOVER_CRASH_AT") or None, **kwargs)


@dataclass
class ProducerReport:
    events: int = 0
    snapshot_rows: int = 0
    transactions: int = 0
    checkpoints: int = 0
    position: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""
    peak_rss_kb: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["position"] = lsn_to_str(self.position)
        return out


def _version() -> str:
    try:
        return metadata.version("kafka-cutover")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0.0.0"


def lock_keys(slot: str) -> tuple[int, int, int]:
    """(class key, signed object key for pg_try_advisory_lock, unsigned key as in pg_locks)."""
    unsigned = zlib.crc32(slot.encode())
    signed = unsigned - (1 << 32) if unsigned >= (1 << 31) else unsigned
    return _LOCK_CLASS, signed, unsigned


def acquire_producer_lock(conn: Conn, slot: str) -> None:
    """Hold a session advisory lock for the producer's life; refuse if another producer has it."""
    key1, key2, unsigned = lock_keys(slot)
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (key1, key2)).fetchone()
        if got and got[0]:
            return
        holder = conn.execute(
            "SELECT l.pid, a.application_name, a.client_addr::text FROM pg_locks l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 2"
            " AND l.granted",
            (key1, unsigned),
        ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, "taking the producer lock", "source") from None
    who = (
        f"backend pid {holder[0]} ({holder[1] or 'unknown application'})"
        if holder
        else "another session"
    )
    raise CheckFailed(
        f"another producer is already running on slot {slot}: {who} holds its lock. "
        "Only one producer may read a slot; stop the other one first"
    )


@dataclass(frozen=True, slots=True)
class SlotStatus:
    confirmed: int
    recorded: int
    wal_status: str | None


def check_slot(
    conn: Conn, slot: str, *, log: Any = None, busy_wait_s: float = _SLOT_BUSY_WAIT_S
) -> SlotStatus:
    """Slot safety at start: refuse a missing or lost slot, or one AHEAD of our record.

    ``confirmed <= recorded`` is normal (a crash between recording and advancing, or a
    PostgreSQL crash that lost an advance not yet checkpointed): the producer resumes from the
    slot and delivers that range again. A slot still held by a backend is waited for a little:
    after a kill -9 the dead producer's backend finishes the peek it was running first.
    """
    deadline = time.monotonic() + busy_wait_s
    while True:
        try:
            row = conn.execute(
                "SELECT plugin, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, wal_status,"
                " active_pid, database = current_database() FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            recorded = source_state.read_position(conn, slot)
        except psycopg.Error as exc:
            raise pg.translate(exc, f"checking slot {slot}", "source") from None
        if row is None or row[3] is None or time.monotonic() >= deadline:
            break
        if log is not None:
            log.info("slot.busy_waiting", active_pid=row[3])
        time.sleep(0.5)
    rec = f"{lsn_to_str(recorded)}" if recorded is not None else "nothing"
    if row is None:
        raise SlotSafetyError(
            f"slot {slot} does not exist (the producer had delivered up to {rec}): it was "
            "dropped; changes since then were not captured. Possible data loss, re-snapshot "
            "required: `cutover init` (recreates the slot), then `cutover init --resnapshot`"
        )
    plugin, confirmed, wal_status, active_pid, same_db = row
    if not same_db or plugin != "pgoutput":
        raise ConfigError(f"slot {slot} is not a pgoutput slot of this database")
    if wal_status == "lost":
        raise SlotSafetyError(
            f"slot {slot} is lost (wal_status = lost): PostgreSQL removed WAL it still needed "
            f"(max_slot_wal_keep_size). Possible data loss, re-snapshot required: drop the slot, "
            "`cutover init`, then `cutover init --resnapshot`"
        )
    if recorded is None:
        raise ConfigError(
            f"no delivered position recorded for slot {slot} in cutover.producer_state: "
            "run `cutover init` first"
        )
    if confirmed is None or int(confirmed) > recorded:
        raise SlotSafetyError(
            f"slot {slot} is at {lsn_to_str(int(confirmed or 0))}, AHEAD of the last position "
            f"the producer delivered ({lsn_to_str(recorded)}): it was advanced, or dropped and "
            "recreated, behind the producer's back, so changes in between may be in no topic. "
            "Possible data loss, re-snapshot required: `cutover init --resnapshot`"
        )
    if active_pid is not None:
        raise CheckFailed(
            f"slot {slot} is in use by backend pid {active_pid}: another reader (not a cutover "
            "producer holding the lock) is attached; stop it first"
        )
    if log is not None and int(confirmed) < recorded:
        log.info(
            "slot.behind_record",
            slot=slot,
            confirmed=lsn_to_str(int(confirmed)),
            recorded=lsn_to_str(recorded),
            note="crash between record and advance: that range is delivered again",
        )
    return SlotStatus(int(confirmed), recorded, wal_status)


def _crash(point: str) -> None:
    """Kill this process like ``kill -9`` would (no flush, no atexit, no finally)."""
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)  # pragma: no cover - SIGKILL does not return


def _peak_rss_kb() -> int:
    """Peak resident memory of this process, in kB: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries it across fork+exec, so a producer started by a
    big parent (a test runner) would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class CdcProducer:
    """One producer on one slot. :meth:`run` returns when stopped; raises on failure."""

    def __init__(
        self,
        settings: Settings,
        options: ProducerOptions,
        *,
        stop: threading.Event | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
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
        self._position = 0
        self._checkpointed_commits = 0
        self._request: source_state.SnapshotRequest | None = None
        self._request_polled = 0.0
        self._request_estimate: int | None = None
        self._domain_partitions: dict[str, int] = {}
        self._reread_parent: ChunkWindow | None = None

    # -- setup ---------------------------------------------------------------------------------

    def _connect(self, name: str, *, autocommit: bool) -> Conn:
        conn: Conn = pg.connect(
            self.settings.source.dsn,
            side="source",
            autocommit=autocommit,
            application_name=f"cutover produce ({name})",
            doing="cannot connect",
        )
        try:
            # The type output functions run in this session: fix what pgoutput.py assumes.
            for setting, value in (
                ("DateStyle", "ISO"),
                ("TimeZone", "UTC"),
                ("bytea_output", "hex"),
                ("extra_float_digits", "1"),
            ):
                conn.execute(
                    sql.SQL("SET {} = {}").format(sql.Identifier(setting), sql.Literal(value))
                )
            if not autocommit:
                conn.commit()
            return conn
        except psycopg.Error as exc:
            raise pg.translate(exc, "cannot connect", "source") from None

    def run(self) -> ProducerReport:
        settings = self.settings
        src = settings.source
        started = time.monotonic()
        mapping = load_mapping(settings.mapping_path)
        with (
            self._connect("control", autocommit=True) as ctl,
            self._connect("reader", autocommit=False) as reader,
        ):
            if source_state.missing_tables(ctl):
                raise ConfigError(
                    "the legacy control tables (schema cutover) are missing: run `cutover init`"
                )
            acquire_producer_lock(ctl, src.slot)
            status = check_slot(ctl, src.slot, log=self.log)
            self._position = status.confirmed
            self._persisted = source_state.read_table_columns(ctl, src.slot)
            db = str(ctl.execute("SELECT current_database()").fetchone()[0])  # type: ignore[index]
            kafka = kafka_io.KafkaOut(settings.kafka, client_id=f"cutover-producer-{src.slot}")
            topics = [settings.kafka.topic(d) for d in mapping.domains]
            partitions = kafka.partitions([*topics, settings.kafka.schemas_topic])
            self._domain_partitions = {t: partitions[t] for t in topics}
            for topic, count in self._domain_partitions.items():
                if count != settings.kafka.partitions:
                    self.log.warning(
                        "producer.partition_mismatch",
                        topic=topic,
                        partitions=count,
                        configured=settings.kafka.partitions,
                    )
            self.kafka = kafka
            self.ctl = ctl
            self.mapping = mapping
            self._publish_schema_ws(self._hb_schema)
            self.stream = ChangeStream(
                mapping,
                SourceInfo(version=_version(), name=settings.kafka.topic_prefix, db=db),
                partitions=self._domain_partitions,
                topic_for=settings.kafka.topic,
                emit=kafka.produce,
                on_schema=self._on_schema,
                known_columns=self._persisted,
                clock_ms=lambda: time.time_ns() // 1_000_000,
                encoder_factory=encoder_for,
            )
            if self.options.initial_snapshot:
                created = source_state.ensure_initial_requests(ctl, src.slot, list(mapping.tables))
                if created:
                    self.log.info("snapshot.initial_queued", tables=len(created))
            self.log.info(
                "producer.started",
                publication=src.publication,
                position=lsn_to_str(self._position),
                recorded=lsn_to_str(status.recorded),
                topics=self._domain_partitions,
                producer=self.options.producer_name,
            )
            try:
                self._loop(reader, started)
            finally:
                self.report.elapsed_s = time.monotonic() - started
                self.report.peak_rss_kb = _peak_rss_kb()
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

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self, reader: Conn, started: float) -> None:
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
            self._maybe_start_chunk()
            read = self._read_once(reader, limit)
            if read >= limit:
                limit = min(limit * 2, max_limit)  # behind: read more per peek (module doc)
                continue
            # The peek returned less than asked: everything in the WAL was read (caught up).
            limit = src.peek_batch
            busy = bool(self.stream.windows) or self._request is not None
            if self.options.exit_when_idle and not busy and not self._poll_requests(force=True):
                self.report.stopped_by = "idle"
                break
            if time.monotonic() - self._last_advance >= src.heartbeat_interval_s:
                self._emit_heartbeat()
            elif read == 0 and not busy:
                self.stop.wait(self.options.idle_sleep_s)
        # Whatever was produced since the last checkpoint (heartbeats) must be acknowledged.
        self.kafka.flush()

    def _read_once(self, reader: Conn, limit: int) -> int:
        """One peek, streamed through; checkpoints every ~peek_batch changes. Returns rows read."""
        src = self.settings.source
        stream = self.stream
        feed = stream.feed
        rows = 0
        query = (
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s,"
            " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
        )
        publication = '"' + src.publication.replace('"', '""') + '"'
        try:
            with reader.cursor(name="cutover_peek", binary=True) as cur:
                cur.itersize = _ITERSIZE
                cur.execute(query, (src.slot, limit, publication))
                stopping = False
                while not stopping:
                    batch = cur.fetchmany(_ITERSIZE)
                    if not batch:
                        break
                    for (data,) in batch:
                        feed(data)
                        rows += 1
                        if stream.tx is None and stream.changes_in_batch >= src.peek_batch:
                            # (1) a bounded batch of whole transactions: checkpoint here.
                            self._checkpoint()
                            if self.stop.is_set():
                                # Everything read so far is delivered and advanced: a signal
                                # need not wait for the rest of a long catch-up peek.
                                stopping = True
                                break
            reader.commit()
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                reader.rollback()
            if exc.sqlstate == "42704":
                raise SlotSafetyError(
                    f"slot {src.slot} disappeared while the producer was reading it: possible "
                    "data loss, re-snapshot required (`cutover init`, then `cutover init "
                    "--resnapshot`)"
                ) from None
            raise pg.translate(exc, f"reading slot {src.slot}", "source") from None
        if stream.tx is not None:
            raise RuntimeFailure(
                f"the peek of slot {src.slot} ended inside a transaction; this should not happen "
                "(PostgreSQL returns whole transactions)"
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
        if self.options.crash_at == "after_produce_before_ack":
            _crash("after_produce_before_ack")
        # (3) flush and check every delivery; KafkaError propagates: no advance.
        try:
            self.kafka.flush()
        except KafkaError:
            metrics.delivery_failed()
            raise
        for topic, count in stream.events_by_topic.items():
            metrics.events_produced(topic.rsplit(".", 1)[-1], count)
        stream.events_by_topic.clear()
        # (4) record the position durably (write-ahead of the advance).
        source_state.record_position(
            self.ctl,
            self.settings.source.slot,
            self.settings.source.publication,
            lsn,
            self.options.producer_name,
        )
        if self.options.crash_at == "after_ack_before_advance":
            _crash("after_ack_before_advance")
        # (5) advance the slot to the end of the last acknowledged commit.
        try:
            self.ctl.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                (self.settings.source.slot, lsn_to_str(lsn)),
            )
        except psycopg.Error as exc:
            raise pg.translate(
                exc, f"advancing slot {self.settings.source.slot}", "source"
            ) from None
        events = stream.events - self.report.events
        txs = stream.transactions - self._checkpointed_commits
        self._position = lsn
        self._last_advance = time.monotonic()
        self._checkpointed_commits = stream.transactions
        self.report.events = stream.events
        self.report.snapshot_rows = stream.snapshot_rows
        self.report.transactions = stream.transactions
        self.report.checkpoints += 1
        self.report.position = lsn
        stream.reset_batch_counters()
        self.log.info("slot.advanced", lsn=lsn_to_str(lsn))
        metrics.slot_advanced(lsn)
        self._report_slot_lag()
        self.log.info(
            "producer.batch_delivered",
            events=events,
            txs=txs,
            lsn=lsn_to_str(lsn),
            peak_rss_mb=round(_peak_rss_kb() / 1024, 1),
        )
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
                self._chunk_done(window)

    # -- heartbeats ----------------------------------------------------------------------------

    def _emit_heartbeat(self) -> None:
        """A transactional logical message: gives the slot something to advance to when idle."""
        try:
            self.ctl.execute(
                "SELECT pg_logical_emit_message(true, %s, %s)",
                (HEARTBEAT_PREFIX, self.options.producer_name),
            )
        except psycopg.Error as exc:
            raise pg.translate(exc, "emitting a heartbeat message", "source") from None
        # Counts as activity: the next idle heartbeat is one interval later.
        self._last_advance = time.monotonic()

    def _report_slot_lag(self) -> None:
        """WAL the slot holds back, for the ``cutover_slot_lag_bytes`` gauge."""
        try:
            row = self.ctl.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.settings.source.slot,),
            ).fetchone()
        except psycopg.Error as exc:
            raise pg.translate(exc, "reading the slot's lag", "source") from None
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

    def _on_schema(self, route: TableRoute, changes: list[str]) -> None:
        self._publish_schema_ws(route.writer)
        if changes:
            self.log.info(
                "schema.evolved",
                table=route.qualified,
                changes=changes,
                fingerprint=route.writer.fingerprint_hex,
            )
        if self._persisted.get(route.qualified) != route.columns:
            source_state.record_table_columns(
                self.ctl,
                self.settings.source.slot,
                route.qualified,
                route.columns,
                route.writer.fingerprint_hex,
            )
            self._persisted[route.qualified] = route.columns

    # -- snapshots -----------------------------------------------------------------------------

    def _poll_requests(self, *, force: bool = False) -> bool:
        """Pick the oldest open snapshot request (polled at most once a second)."""
        if self._request is not None:
            return True
        now = time.monotonic()
        if not force and now - self._request_polled < _REQUEST_POLL_S:
            return False
        self._request_polled = now
        requests = source_state.open_requests(self.ctl, self.settings.source.slot)
        if not requests:
            return False
        request = requests[0]
        if request.status == "pending":
            source_state.mark_request(self.ctl, request.id, "running")
            self.log.info(
                "snapshot.started",
                table=request.source_table,
                request=request.id,
                kind=request.kind,
                where=request.where_sql,
            )
        self._request = request
        self._request_estimate = snapshot.estimate_rows(
            self.ctl, self.mapping.source_schema, request.source_table
        )
        return True

    def _maybe_start_chunk(self) -> None:
        if self.stream.windows or not self._poll_requests():
            return
        request = self._request
        assert request is not None
        if not snapshot.request_is_open(self.ctl, request.id):
            self.log.warning("snapshot.cancelled", table=request.source_table, request=request.id)
            self._request = None
            return
        tm = self.mapping.tables.get(request.source_table)
        if tm is None:
            self._fail_request(request, "table is not in the mapping")
            return
        schema = self.mapping.source_schema
        columns = snapshot.published_column_specs(
            self.ctl, self.settings.source.publication, schema, tm.source_table
        )
        route = self.stream.route_for(schema, tm.source_table, columns)
        parent = self._reread_parent
        keys: tuple[tuple[object, ...], ...] = ()
        if parent is not None:
            keys = tuple(parent.reread)
            parent.reread = []
            self._reread_parent = None
        try:
            chunk = snapshot.read_chunk(
                self.ctl,
                schema=schema,
                table=tm.source_table,
                columns=columns,
                primary_key=tm.primary_key,
                request=request,
                last_pk=request.last_pk,
                chunk_rows=self.settings.source.snapshot_chunk_rows,
                keys=keys,
            )
        except CutoverError as exc:
            reason = snapshot.request_fault(exc)
            if reason is None:
                raise
            self._fail_request(request, reason)
            return
        self.stream.add_window(
            ChunkWindow(
                chunk_id=chunk.chunk_id,
                route=route,
                rows=chunk.rows,
                request_id=request.id,
                last_pk=chunk.last_pk,
                selected=chunk.selected,
                final=chunk.final,
                parent=parent,
                keys=keys,
                attempt=parent.attempt + 1 if parent is not None else 0,
            )
        )

    def _fail_request(self, request: source_state.SnapshotRequest, reason: str) -> None:
        """Mark a request failed for its own fault (it stays visible in ``snapshot --list``)."""
        source_state.mark_request(self.ctl, request.id, "failed", reason)
        self.log.error(
            "snapshot.failed", table=request.source_table, request=request.id, error=reason
        )
        self._request = None

    def _chunk_done(self, window: ChunkWindow) -> None:
        """After step 5: record a chunk's progress, or schedule what must be read again."""
        request = self._request
        if request is None or request.id != window.request_id:
            return
        root = window.parent or window
        if window.state == "failed":
            self.log.warning("snapshot.chunk_retry", chunk=window.chunk_id)
            if window.parent is not None:
                window.parent.reread.extend(window.keys)
                self._reread_parent = window.parent
            return  # a range chunk is simply read again under new watermarks
        if window.parent is not None:
            root.emitted += window.emitted
        if window.reread:
            if window.attempt < _MAX_REREADS:
                # Rows the stream changed with unchanged TOAST values inside the window: read
                # them again before the chunk counts as done (progress is not recorded yet).
                root.reread = list(window.reread)
                root.attempt = window.attempt
                self._reread_parent = root
                self.log.info("snapshot.reread", chunk=window.chunk_id, keys=len(window.reread))
                return
            self.log.warning(
                "snapshot.reread_gave_up",
                chunk=window.chunk_id,
                keys=len(window.reread),
                note="rows updated continuously with unchanged TOAST values",
            )
        source_state.record_progress(
            self.ctl, request.id, root.last_pk, root.emitted, done=root.final
        )
        rows = request.rows_emitted + root.emitted
        event = {
            "table": request.source_table,
            "request": request.id,
            "chunk": request.chunks + 1,
            "selected": root.selected,
            "emitted": root.emitted,
            "dropped": root.dropped,
            "rows": rows,
            "estimate": self._request_estimate,
            "done": root.final,
            "lsn": lsn_to_str(window.high_lsn),
        }
        self.log.info("snapshot.chunk_done", **event)
        if self.progress is not None:
            self.progress(event)
        if root.final:
            self.log.info(
                "snapshot.done", table=request.source_table, request=request.id, rows=rows
            )
            self._request = None
        else:
            self._request = replace(
                request,
                status="running",
                last_pk=root.last_pk,
                rows_emitted=rows,
                chunks=request.chunks + 1,
            )


def run_producer(
    settings: Settings,
    options: ProducerOptions,
    *,
    stop: threading.Event | None = None,
    progress: ProgressCallback | None = None,
    install_signals: bool = False,
) -> ProducerReport:
    """Run a producer until stopped. With ``install_signals``, SIGTERM/SIGINT stop it cleanly."""
    stop = stop or threading.Event()
    if install_signals:

        def _handler(signum: int, _frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
    return CdcProducer(settings, options, stop=stop, progress=progress).run()


def mapping_tables(mapping: MappingSpec) -> list[str]:
    return list(mapping.tables)
