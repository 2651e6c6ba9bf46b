"""Figures for ``cutover monitor``: topics, group lag, apply rate and latency, slot, dead letters.

Pure aggregation (:func:`build_report` and the helpers it uses) over raw readings taken by thin
I/O functions (:func:`read_kafka`, :func:`read_target`, :func:`read_source`), so that every
figure is unit-tested without services. :class:`Monitor` keeps the connections and the previous
reading between refreshes (the apply rate is a difference of two readings).

Where each figure comes from (docs/OPERATIONS.md repeats this for operators):

* **end offset** per partition: the high watermark (what ``kafka-consumer-groups`` calls
  LOG-END-OFFSET);
* **committed offset** and **lag**: the apply group's offsets committed in Kafka
  (``Consumer.committed`` for ``[apply] group_id``); lag = end − committed, exactly as
  ``kafka-consumer-groups --describe`` computes LAG (a partition without a commit has no lag:
  "-"). The apply consumer commits to Kafka asynchronously after each database COMMIT, as a
  monitoring hint;
* **applied offset** and **applied lag**: ``next_offset`` in ``cutover.consumer_offsets``, the
  truth the consumers resume from (stored with the rows); applied lag = end − applied offset;
* **apply rate**: messages per second by which the applied offsets of a domain moved between
  two readings (heartbeats included: they occupy offsets too);
* **commit-to-applied latency** p50/p99: a coarse estimate, one sample per partition applied in
  the last minute: ``applied_at − last_source_ts_ms`` of its offsets row (the source commit time
  of the newest change applied there, and when its batch committed). It overstates by up to one
  batch when a later heartbeat-only batch moved ``applied_at``. The exact distribution is the
  ``cutover_apply_latency_seconds`` histogram of each apply process (cutover.metrics);
* **slot**: ``pg_replication_slots`` of ``[source] slot``: confirmed_flush_lsn, lag in bytes
  ``pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)``, wal_status, safe_wal_size;
* **producer heartbeat age**: ``now() − heartbeat_at`` of ``cutover.producer_state`` in the
  legacy database (set each time the producer advances the slot or heartbeats), computed by the
  server; **heartbeat applied age**: now − the newest producer heartbeat the consumers passed
  (``last_heartbeat_ms``) per domain;
* **dead letters**: open rows of ``cutover.dead_letters`` per domain, and the dead-letter topic's
  end offset (every poison message ever sent);
* **truncates**: the source TRUNCATEs carried into commerce, per source table
  (``cutover.truncates``).

A source that cannot be read (a database down, a topic missing) does not stop the monitor: its
section is empty and ``errors`` says why.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
from confluent_kafka import KafkaException, TopicPartition
from psycopg import sql

from control.monitor_report import (
    LATENCY_WINDOW_S,
    TP,
    DeadLetterFigures,
    KafkaReading,
    MonitorReport,
    OffsetsRow,
    PartitionFigures,
    SlotReading,
    SourceReading,
    TargetReading,
    TopicFigures,
    apply_rate,
    build_report,
    group_lag,
    latency_samples,
    percentile,
)
from cutover import capture, metrics, pg
from cutover import kafka as kafka_clients
from cutover.config import Settings
from cutover.control_store import LEGACY_SCHEMA, ControlStore, dead_letters, offsets
from cutover.control_store import producer as producer_state
from cutover.errors import CutoverError, KafkaError
from cutover.kafka import translate as kafka_error
from cutover.mapping import load_mapping

__all__ = [
    "LATENCY_WINDOW_S",
    "TP",
    "DeadLetterFigures",
    "KafkaProbe",
    "KafkaReading",
    "Monitor",
    "MonitorReport",
    "OffsetsRow",
    "PartitionFigures",
    "SlotReading",
    "SourceReading",
    "TargetReading",
    "TopicFigures",
    "apply_rate",
    "build_report",
    "group_lag",
    "latency_samples",
    "monitored_domains",
    "percentile",
    "read_source",
    "read_target",
]


# ====================================================================== I/O: thin readers


class KafkaProbe:
    """A consumer that never joins a group: metadata, watermarks and the apply group's
    committed offsets (OffsetFetch does not need membership). It commits nothing."""

    def __init__(self, settings: Settings, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self._consumer = kafka_clients.consumer(
            settings.kafka,
            "monitor",
            group_id=settings.apply.group_id,
            client_id=f"cutover-monitor-{uuid.uuid4().hex[:8]}",
        )

    def read(self, topics: Sequence[str]) -> KafkaReading:
        ends: dict[TP, int] = {}
        missing: dict[str, str] = {}
        try:
            meta = self._consumer.list_topics(timeout=self.timeout_s)
        except KafkaException as exc:
            raise kafka_error(exc, "reading the cluster metadata") from None
        tps: list[TopicPartition] = []
        for topic in topics:
            tmeta = meta.topics.get(topic)
            if tmeta is None or tmeta.error is not None or not tmeta.partitions:
                missing[topic] = f"topic {topic} does not exist"
                continue
            for p in sorted(tmeta.partitions):
                tps.append(TopicPartition(topic, p))
        try:
            for tp in tps:
                _low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
                ends[(tp.topic, tp.partition)] = high
            committed = self._consumer.committed(tps, timeout=self.timeout_s) if tps else []
        except KafkaException as exc:
            raise kafka_error(exc, "reading offsets") from None
        got: dict[TP, int | None] = {}
        for tp in committed:
            # OFFSET_INVALID (-1001): the group never committed this partition.
            got[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
        return KafkaReading(ends, got, missing)

    def end_offset(self, topic: str) -> int | None:
        """Σ end offsets of ``topic``; None if it does not exist."""
        try:
            reading = self.read([topic])
        except KafkaError:
            return None
        if topic in reading.missing:
            return None
        return sum(reading.ends.values())

    def close(self) -> None:
        self._consumer.close()


def _epoch_ms(column: sql.Composable) -> sql.Composed:
    return sql.SQL("(extract(epoch FROM {}) * 1000)::bigint").format(column)


def read_target(conn: psycopg.Connection[Any], control: str, group: str) -> TargetReading:
    """The apply group's offsets rows and the open dead letters per domain."""
    store = ControlStore(conn, control, "target")
    now = store.execute(
        sql.SQL("SELECT {}").format(_epoch_ms(sql.SQL("now()"))), doing="reading the clock"
    ).fetchone()
    rows = offsets.read_group(store, group)
    open_letters = dead_letters.open_by_domain(store)
    truncates: dict[str, int] = {}
    if store.exists("truncates"):  # created by `cutover init` since TRUNCATEs are carried
        truncates = {
            str(t): int(n)
            for t, n in store.execute(
                sql.SQL("SELECT source_table, count(*) FROM {} GROUP BY 1").format(
                    store.table("truncates")
                ),
                doing=f"reading {control}.truncates",
            ).fetchall()
        }
    assert now is not None
    return TargetReading(
        offsets=[
            OffsetsRow(
                o.topic,
                o.partition,
                o.next_offset,
                o.last_source_ts_ms,
                o.last_heartbeat_ms,
                o.applied_at_ms,
            )
            for o in rows
        ],
        open_dead_letters=open_letters,
        now_ms=int(now[0]),
        truncates=truncates,
    )


def read_source(conn: psycopg.Connection[Any], slot: str) -> SourceReading:
    """The slot's state and the producer's heartbeat (legacy database)."""
    try:
        row = conn.execute(
            "SELECT active, confirmed_flush_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
            " wal_status, safe_wal_size"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, f"reading the slot {slot}", "source") from None
    slot_reading = (
        SlotReading(slot, exists=False)
        if row is None
        else SlotReading(
            slot,
            exists=True,
            active=bool(row[0]),
            confirmed_flush_lsn=row[1],
            lag_bytes=None if row[2] is None else int(row[2]),
            wal_status=row[3],
            safe_wal_size=None if row[4] is None else int(row[4]),
        )
    )
    store = ControlStore(conn, LEGACY_SCHEMA, "source")
    beat = producer_state.read_heartbeat(store, slot) if store.exists("producer_state") else None
    return SourceReading(
        slot=slot_reading,
        heartbeat_age_s=None if beat is None else beat.age_s,
        delivered_lsn=None if beat is None else beat.delivered_lsn,
        producer=None if beat is None else beat.producer,
    )


def monitored_domains(settings: Settings) -> list[str]:
    """The mapping's domains (what `cutover apply` consumes); a broken mapping is a MappingError,
    as for every command."""
    return list(load_mapping(settings.mapping_path).domains)


class Monitor:
    """Takes readings on demand (:meth:`sample`); keeps connections and the last reading.

    Connections are opened lazily and re-opened after a failure, so a monitor left running
    survives a database or broker restart.
    """

    def __init__(self, settings: Settings, domains: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.domains = list(domains) if domains is not None else monitored_domains(settings)
        self._probe: KafkaProbe | None = None
        self._target: psycopg.Connection[Any] | None = None
        self._source: psycopg.Connection[Any] | None = None
        self._previous: tuple[float, dict[TP, int]] | None = None

    def _connect(self, dsn: str, side: str) -> psycopg.Connection[Any]:
        return pg.connect(dsn, side=side, connect_timeout=5, application_name="cutover-monitor")

    def sample(self) -> MonitorReport:
        errors: list[str] = []
        topics = [self.settings.kafka.topic(d) for d in self.domains]
        kafka: KafkaReading | None = None
        dlq_end: int | None = None
        try:
            if self._probe is None:
                self._probe = KafkaProbe(self.settings)
            kafka = self._probe.read(topics)
            dlq_end = self._probe.end_offset(self.settings.kafka.dlq_topic)
        except CutoverError as exc:
            errors.append(exc.message)
        target: TargetReading | None = None
        try:
            if self._target is None or self._target.closed or self._target.broken:
                self._target = self._connect(self.settings.target.dsn, "target")
            target = read_target(
                self._target, self.settings.target.control_schema, self.settings.apply.group_id
            )
        except CutoverError as exc:
            errors.append(exc.message)
            self._drop("_target")
        source: SourceReading | None = None
        blocks: list[tuple[str, str]] = []
        try:
            if self._source is None or self._source.closed or self._source.broken:
                self._source = self._connect(self.settings.source.dsn, "source")
            source = read_source(self._source, self.settings.source.slot)
            blocks = self._capture_blocks(self._source)
        except CutoverError as exc:
            errors.append(exc.message)
            self._drop("_source")
        now = time.monotonic()
        previous, elapsed = None, 0.0
        if self._previous is not None:
            elapsed = now - self._previous[0]
            previous = self._previous[1]
        report = build_report(
            self.settings,
            self.domains,
            kafka,
            target,
            source,
            previous_applied=previous,
            seconds_since_previous=elapsed,
            dlq_end_offset=dlq_end,
            errors=errors,
            capture_blocks=blocks,
        )
        if target is not None:
            self._previous = (now, {(r.topic, r.partition): r.next_offset for r in target.offsets})
        return report

    def _capture_blocks(self, conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
        """Mapped tables/columns no longer published; mirrored in ``cutover_capture_blocked``."""
        mapping = load_mapping(self.settings.mapping_path)
        blocks = capture.blocks(conn, self.settings.source.publication, mapping)
        blocked = {t for t, _cause in blocks}
        for name in mapping.tables:
            table = f"{mapping.source_schema}.{name}"
            metrics.capture_blocked(table, table in blocked)
        return blocks

    def _drop(self, attr: str) -> None:
        conn = getattr(self, attr)
        if conn is not None:
            conn.close()
        setattr(self, attr, None)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        self._drop("_target")
        self._drop("_source")
