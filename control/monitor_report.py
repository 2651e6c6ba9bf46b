"""The figures of ``cutover monitor`` (pure): the raw readings :mod:`control.monitor` takes, and
:func:`build_report`, which combines them into the :class:`MonitorReport` the command shows.
Where each figure comes from is the module doc of :mod:`control.monitor`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cutover.config import Settings
from cutover.envelope import lsn_to_str

#: Offsets rows applied longer ago than this give no latency sample.
LATENCY_WINDOW_S = 60.0

TP = tuple[str, int]


# ====================================================================== raw readings


@dataclass(frozen=True, slots=True)
class KafkaReading:
    """End offsets and the group's committed offsets per (topic, partition)."""

    ends: Mapping[TP, int]
    committed: Mapping[TP, int | None]
    #: Topics that could not be read, with the reason.
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OffsetsRow:
    """One ``cutover.consumer_offsets`` row of the apply group."""

    topic: str
    partition: int
    next_offset: int
    last_source_ts_ms: int | None
    last_heartbeat_ms: int | None
    applied_at_ms: int


@dataclass(frozen=True, slots=True)
class TargetReading:
    offsets: Sequence[OffsetsRow]
    open_dead_letters: Mapping[str, int]  # domain ("" when unknown) → open rows
    now_ms: int
    #: Carried TRUNCATEs per source table (``cutover.truncates``).
    truncates: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SlotReading:
    name: str
    exists: bool
    active: bool | None = None
    confirmed_flush_lsn: str | None = None
    lag_bytes: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None


@dataclass(frozen=True, slots=True)
class SourceReading:
    slot: SlotReading
    heartbeat_age_s: float | None
    delivered_lsn: int | None
    producer: str | None


# ====================================================================== the report


@dataclass(frozen=True, slots=True)
class PartitionFigures:
    partition: int
    end_offset: int
    committed_offset: int | None
    lag: int | None
    applied_offset: int | None
    applied_lag: int | None


@dataclass(frozen=True, slots=True)
class TopicFigures:
    domain: str
    topic: str
    partitions: Sequence[PartitionFigures]
    error: str | None = None
    apply_rate: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    latency_samples: int = 0
    heartbeat_applied_age_s: float | None = None
    dead_letters_open: int = 0

    @property
    def end_offset(self) -> int:
        return sum(p.end_offset for p in self.partitions)

    @property
    def lag(self) -> int | None:
        """Σ lag of the partitions that have one (None when none has: no commit yet)."""
        lags = [p.lag for p in self.partitions if p.lag is not None]
        return sum(lags) if lags else None

    @property
    def applied_lag(self) -> int | None:
        lags = [p.applied_lag for p in self.partitions if p.applied_lag is not None]
        return sum(lags) if lags else None


@dataclass(frozen=True, slots=True)
class DeadLetterFigures:
    open_total: int
    open_by_domain: Mapping[str, int]
    dlq_topic: str
    dlq_end_offset: int | None


@dataclass(frozen=True, slots=True)
class MonitorReport:
    taken_at: datetime
    group_id: str
    topics: Sequence[TopicFigures]
    slot: SlotReading | None
    producer_heartbeat_age_s: float | None
    producer_delivered_lsn: int | None
    dead_letters: DeadLetterFigures
    errors: Sequence[str]
    #: (table, cause) of each mapped table no longer (fully) published (cutover.capture).
    capture_blocks: Sequence[tuple[str, str]] = ()
    #: Carried TRUNCATEs per source table, since the pipeline started.
    truncates: Mapping[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at.isoformat(),
            "group_id": self.group_id,
            "topics": [_topic_json(t) for t in self.topics],
            "slot": None
            if self.slot is None
            else {
                "name": self.slot.name,
                "exists": self.slot.exists,
                "active": self.slot.active,
                "confirmed_flush_lsn": self.slot.confirmed_flush_lsn,
                "lag_bytes": self.slot.lag_bytes,
                "wal_status": self.slot.wal_status,
                "safe_wal_size": self.slot.safe_wal_size,
            },
            "producer": {
                "heartbeat_age_s": _round(self.producer_heartbeat_age_s),
                "delivered_lsn": (
                    None if (lsn := self.producer_delivered_lsn) is None else lsn_to_str(lsn)
                ),
            },
            "dead_letters": {
                "open_total": self.dead_letters.open_total,
                "open_by_domain": dict(self.dead_letters.open_by_domain),
                "dlq_topic": self.dead_letters.dlq_topic,
                "dlq_end_offset": self.dead_letters.dlq_end_offset,
            },
            "errors": list(self.errors),
            "capture_blocked": [{"table": t, "cause": c} for t, c in self.capture_blocks],
            "truncates_applied": dict(self.truncates),
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _topic_json(t: TopicFigures) -> dict[str, Any]:
    return {
        "domain": t.domain,
        "topic": t.topic,
        "error": t.error,
        "end_offset": t.end_offset,
        "lag": t.lag,
        "applied_lag": t.applied_lag,
        "apply_rate_msgs_per_s": _round(t.apply_rate, 1),
        "latency_p50_s": _round(t.latency_p50_s),
        "latency_p99_s": _round(t.latency_p99_s),
        "latency_samples": t.latency_samples,
        "heartbeat_applied_age_s": _round(t.heartbeat_applied_age_s),
        "dead_letters_open": t.dead_letters_open,
        "partitions": [
            {
                "partition": p.partition,
                "end_offset": p.end_offset,
                "committed_offset": p.committed_offset,
                "lag": p.lag,
                "applied_offset": p.applied_offset,
                "applied_lag": p.applied_lag,
            }
            for p in t.partitions
        ],
    }


# ====================================================================== pure aggregation


def group_lag(end_offset: int, committed: int | None) -> int | None:
    """Lag as ``kafka-consumer-groups`` computes it: end − committed; None without a commit."""
    if committed is None or committed < 0:
        return None
    return max(0, end_offset - committed)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def apply_rate(
    previous: Mapping[TP, int] | None,
    current: Mapping[TP, int],
    seconds: float,
    topic: str,
) -> float | None:
    """Messages/s by which the applied offsets of ``topic`` moved between two readings."""
    if previous is None or seconds <= 0:
        return None
    moved = 0
    for tp, offset in current.items():
        if tp[0] != topic:
            continue
        before = previous.get(tp)
        if before is not None and offset >= before:
            moved += offset - before
    return moved / seconds


def latency_samples(
    rows: Iterable[OffsetsRow], now_ms: int, window_s: float = LATENCY_WINDOW_S
) -> list[float]:
    """Commit-to-applied estimates in seconds (see the module doc), one per recent partition."""
    out = []
    for row in rows:
        if row.last_source_ts_ms is None or now_ms - row.applied_at_ms > window_s * 1000:
            continue
        if row.applied_at_ms - row.last_source_ts_ms > window_s * 1000:
            continue  # the newest change applied there is old: the partition is idle
        out.append(max(0.0, (row.applied_at_ms - row.last_source_ts_ms) / 1000))
    return out


def _partition_figures(
    topic: str, kafka: KafkaReading, applied: Mapping[TP, int]
) -> list[PartitionFigures]:
    parts: list[PartitionFigures] = []
    for (t, p), end in sorted(kafka.ends.items()):
        if t != topic:
            continue
        committed = kafka.committed.get((t, p))
        stored = applied.get((t, p))
        parts.append(
            PartitionFigures(
                partition=p,
                end_offset=end,
                committed_offset=committed,
                lag=group_lag(end, committed),
                applied_offset=stored,
                applied_lag=None if stored is None else max(0, end - stored),
            )
        )
    return parts


def _topic_figures(
    topic: str,
    domain: str,
    kafka: KafkaReading | None,
    target: TargetReading | None,
    *,
    applied: Mapping[TP, int],
    open_letters: int,
    previous_applied: Mapping[TP, int] | None,
    seconds_since_previous: float,
) -> TopicFigures:
    """The figures of one domain's topic (a part of :func:`build_report`)."""
    parts: list[PartitionFigures] = []
    error: str | None = None
    if kafka is None:
        error = "kafka not read"
    elif topic in kafka.missing:
        error = kafka.missing[topic]
    else:
        parts = _partition_figures(topic, kafka, applied)
    mine = [r for r in target.offsets if r.topic == topic] if target is not None else []
    samples = latency_samples(mine, target.now_ms) if target is not None else []
    beats = [r.last_heartbeat_ms for r in mine if r.last_heartbeat_ms is not None]
    return TopicFigures(
        domain=domain,
        topic=topic,
        partitions=parts,
        error=error,
        apply_rate=apply_rate(previous_applied, applied, seconds_since_previous, topic)
        if target is not None
        else None,
        latency_p50_s=percentile(samples, 50),
        latency_p99_s=percentile(samples, 99),
        latency_samples=len(samples),
        heartbeat_applied_age_s=(target.now_ms - max(beats)) / 1000
        if beats and target is not None
        else None,
        dead_letters_open=open_letters,
    )


def build_report(
    settings: Settings,
    domains: Sequence[str],
    kafka: KafkaReading | None,
    target: TargetReading | None,
    source: SourceReading | None,
    *,
    previous_applied: Mapping[TP, int] | None = None,
    seconds_since_previous: float = 0.0,
    dlq_end_offset: int | None = None,
    errors: Sequence[str] = (),
    capture_blocks: Sequence[tuple[str, str]] = (),
    taken_at: datetime | None = None,
) -> MonitorReport:
    """Combine the readings into the report (pure)."""
    rows = list(target.offsets) if target is not None else []
    applied = {(r.topic, r.partition): r.next_offset for r in rows}
    open_letters = dict(target.open_dead_letters) if target is not None else {}
    topics = [
        _topic_figures(
            settings.kafka.topic(domain),
            domain,
            kafka,
            target,
            applied=applied,
            open_letters=open_letters.get(domain, 0),
            previous_applied=previous_applied,
            seconds_since_previous=seconds_since_previous,
        )
        for domain in domains
    ]
    return MonitorReport(
        taken_at=taken_at or datetime.now(UTC),
        group_id=settings.apply.group_id,
        topics=topics,
        slot=source.slot if source is not None else None,
        producer_heartbeat_age_s=source.heartbeat_age_s if source is not None else None,
        producer_delivered_lsn=source.delivered_lsn if source is not None else None,
        dead_letters=DeadLetterFigures(
            open_total=sum(open_letters.values()),
            open_by_domain=open_letters,
            dlq_topic=settings.kafka.dlq_topic,
            dlq_end_offset=dlq_end_offset,
        ),
        errors=list(errors),
        capture_blocks=list(capture_blocks),
        truncates=dict(target.truncates) if target is not None else {},
    )
