"""Where the commit-to-applied time goes: the stages and the CPU behind bench/cdc_latency.py.

* **Stages, per event, no guessing.** Every change event carries the source transaction's
  commit time (``source.ts_ms``, pgoutput's Begin) and the time the producer built it (the
  envelope's ``ts_ms``). The benchmark switches its domain topics to
  ``message.timestamp.type=LogAppendTime`` before anything is produced, so each record's Kafka
  timestamp is the BROKER's append time (after librdkafka's linger and the produce request).
  After the run, :func:`stage_latencies` reads back exactly the records of the measuring
  window (per-partition offsets taken at its start and end) and gives, per event, source
  commit → producer built it and source commit → broker append (p50/p99, exact). The last
  stage, → commerce COMMIT, is the appliers' histogram (bench/cdc_latency.py).
* **CPU of every process in the window** (:class:`CpuWindow`): utime+stime from /proc at the
  window's start and end, per group (producer, each applier, the benchmark process = the
  workload generator, each PostgreSQL cluster = postmaster and all its children, the Kafka
  broker), and the whole machine's busy share from /proc/stat: what the machine spent on
  others (another job's tests) is the difference.
* **The producer's cycles in the window** (:func:`producer_cycles`): its
  ``producer.batch_delivered`` log lines (events per cycle, cycles/s, peek/flush/record/advance),
  and how much WAL each cycle decodes again (:func:`slot_sample`).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition

from cutover.codec import SchemaStore

_CLK_TCK = os.sysconf("SC_CLK_TCK")
TP = tuple[str, int]


# ------------------------------------------------------------------------------ pure parts


def exact_quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of ``values`` by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize_ms(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"events": 0}
    return {
        "events": len(values),
        "p50_ms": round(exact_quantile(values, 0.50)),
        "p99_ms": round(exact_quantile(values, 0.99)),
        "max_ms": round(max(values)),
    }


def cycle_stats(lines: Iterable[str], start: datetime, end: datetime) -> dict[str, Any]:
    """Summary of the producer's ``producer.batch_delivered`` JSON lines logged in [start, end)."""
    rows = []
    for line in lines:
        if '"producer.batch_delivered"' not in line:
            continue
        row = json.loads(line)
        when = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00"))
        if start <= when < end:
            rows.append(row)
    seconds = (end - start).total_seconds()
    out: dict[str, Any] = {"cycles": len(rows), "cycles_per_s": round(len(rows) / seconds, 1)}
    if not rows:
        return out
    events = [r["events"] for r in rows]
    out["events_per_cycle_p50"] = round(statistics.median(events))
    out["events_per_cycle_max"] = max(events)
    for key in ("peek_ms", "flush_ms", "record_ms", "advance_ms"):
        values = [float(r[key]) for r in rows if key in r]
        if values:
            out[f"{key}_mean"] = round(statistics.fmean(values), 1)
    return out


@dataclass
class CpuWindow:
    """CPU seconds of process groups between :meth:`start` and :meth:`stop` (see module doc)."""

    groups: Mapping[str, Sequence[int]]
    _before: dict[int, float] = field(default_factory=dict)
    _machine: tuple[float, float] = (0.0, 0.0)
    _load: float = 0.0

    def start(self) -> None:
        self._before = {pid: cpu for pid in self._pids() if (cpu := proc_cpu_s(pid)) is not None}
        self._machine = machine_cpu_s()
        self._load = os.getloadavg()[0]

    def stop(self, window_s: float) -> dict[str, Any]:
        busy0, total0 = self._machine
        busy1, total1 = machine_cpu_s()
        per: dict[str, float] = {}
        for name, pids in self.groups.items():
            used = 0.0
            for pid in pids:
                now = proc_cpu_s(pid)
                if now is not None:  # a process born in the window counts from 0
                    used += now - self._before.get(pid, 0.0)
            per[name] = round(100 * used / window_s, 1)
        cpus = os.cpu_count() or 1
        machine = 100 * cpus * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        return {
            "load_1m_start": round(self._load, 1),
            "load_1m_end": round(os.getloadavg()[0], 1),
            "unit": "% of one core over the window",
            "machine_busy": round(machine, 1),
            "machine_capacity": 100 * cpus,
            "processes": per,
            "others": round(machine - sum(per.values()), 1),
        }

    def _pids(self) -> list[int]:
        return [pid for pids in self.groups.values() for pid in pids]


# ------------------------------------------------------------------------------ /proc


def proc_cpu_s(pid: int) -> float | None:
    """utime+stime of a live process in seconds; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and all its children, live ones and those it has reaped (a
    PostgreSQL cluster: backends that ended count through the postmaster's cutime/cstime)."""
    try:
        fields = Path(f"/proc/{root}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    reaped = (int(fields[13]) + int(fields[14])) / _CLK_TCK
    return reaped + sum(proc_cpu_s(pid) or 0.0 for pid in process_tree(root))


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in first]
    idle = ticks[3] + ticks[4]  # idle + iowait
    total = sum(ticks[:8])  # guest time is already inside user/nice
    return (total - idle) / _CLK_TCK, total / _CLK_TCK


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant (a PostgreSQL postmaster and its backends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def slot_sample(dsn: str, slot: str) -> tuple[int, int]:
    """(current WAL position, bytes from the slot's restart_lsn to its confirmed position).

    Every peek and every ``pg_replication_slot_advance`` decodes the WAL from restart_lsn, which
    PostgreSQL moves only at a running-transactions record (every 15 s): that span is what each
    producer cycle decodes again before it reaches anything new.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,"
            " pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    if row is None:
        raise SystemExit(f"slot {slot} is missing")
    return int(row[0]), int(row[1])


def postmaster_of(dsn: str) -> int:
    """The postmaster PID of the cluster behind ``dsn`` (the parent of our backend)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        backend = conn.info.backend_pid
        return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])


# ------------------------------------------------------------------------------ Kafka


def partition_ends(bootstrap: str, topics: Sequence[str], partitions: int) -> dict[TP, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-latency-ends"})
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t in topics
            for p in range(partitions)
        }
    finally:
        consumer.close()


def stage_latencies(
    bootstrap: str, store: SchemaStore, start: Mapping[TP, int], end: Mapping[TP, int]
) -> dict[str, Any]:
    """Per change event of the window: commit → producer built it, commit → broker append."""
    wanted = {tp: (start[tp], end[tp]) for tp in end if end[tp] > start.get(tp, 0)}
    built: list[float] = []
    appended: list[float] = []
    after_build: list[float] = []
    types: set[int] = set()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-latency-stages",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    try:
        consumer.assign([TopicPartition(t, p, lo) for (t, p), (lo, _) in wanted.items()])
        left = {tp: hi for tp, (_, hi) in wanted.items()}
        while left:
            msgs = consumer.consume(10_000, 10.0)
            if not msgs:
                raise SystemExit(f"read-back of the window stalled; missing {sorted(left)}")
            for msg in msgs:
                tp = (str(msg.topic()), int(msg.partition() or 0))
                offset, value = msg.offset(), msg.value()
                if msg.error() is not None or tp not in left or offset is None:
                    continue
                if offset >= left[tp]:
                    continue
                if offset + 1 >= left[tp]:
                    del left[tp]
                if ("cutover.kind", b"change") not in (msg.headers() or ()) or value is None:
                    continue
                kind, append_ms = msg.timestamp()
                types.add(kind)
                _, record = store.decode(value)
                commit_ms = record["source"]["ts_ms"]
                built.append(record["ts_ms"] - commit_ms)
                appended.append(append_ms - commit_ms)
                after_build.append(append_ms - record["ts_ms"])
    finally:
        consumer.close()
    if types - {2}:
        raise SystemExit(f"record timestamp types {types}: the topics are not LogAppendTime")
    return {
        "kafka_timestamp": "broker append time (topics set to LogAppendTime by the benchmark)",
        "commit_to_producer_built": summarize_ms(built),
        "commit_to_broker_append": summarize_ms(appended),
        "producer_built_to_broker_append": summarize_ms(after_build),
    }


def producer_cycles(log: Path, start: datetime, end: datetime) -> dict[str, Any]:
    with log.open(encoding="utf-8", errors="replace") as lines:
        return cycle_stats(lines, start, end)
