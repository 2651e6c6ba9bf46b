"""True commit-to-applied latency, old DB to commerce DB, at a steady workload rate.

Run with the local stack up (``make up``)::

    .venv/bin/python -m bench.cdc_latency [--rate 600 | --events-rate 2000] [--warmup 15]
        [--window 45] [--producer linger.ms=5] [--consumer fetch.wait.max.ms=10]
        [--apply batch_max_wait_ms=50]

``--kafka``/``--producer``/``--consumer``/``--apply KEY=VALUE`` (repeatable) pass settings of
the ``[kafka]``, ``[kafka.producer]``, ``[kafka.consumer]`` and ``[apply]`` sections to this
run's processes
(recorded under ``settings`` in the result), to try a setting without changing a default.

The clock starts at the source transaction's COMMIT in the legacy database (the commit
timestamp pgoutput's Begin message carries, ``source.ts_ms`` of every event) and stops at the
COMMIT of the commerce transaction that applied the event, through the real path: ``cutover
produce`` (logical decoding) → Kafka → two ``cutover apply`` processes. Each applier observes
every event's latency into its ``cutover_apply_latency_seconds`` histogram (served with
``--metrics-port``); the benchmark scrapes both at the start and at the end of the measuring
window, subtracts, adds the two, and reads p50/p99 by linear interpolation inside the bucket
(buckets are 10-50 ms wide below 300 ms: the figures are good to about that). The workload
writes ``--rate`` transactions per second (about 3.5 change events each: the events/s actually
applied in the window are reported). One machine, so both commit times come from one clock.

Where the time goes (:mod:`bench.latency_stages`): the window's records are read back from Kafka
(topics switched to LogAppendTime before anything is produced) for per-event stages — legacy
COMMIT → producer built the event → broker append — and the CPU of every process (producer,
appliers, workload, both PostgreSQL clusters, the broker) and the load average are recorded for
the window, with the producer's cycles (events per cycle, peek/flush/record/advance ms).

Prints JSON and a Markdown table; writes ``bench/results/cdc_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import latency_stages as stages  # noqa: E402
from bench.e2e_throughput import _start, _wait_applied  # noqa: E402
from bench.producer_throughput import scratch, stack_env  # noqa: E402
from bench.vs_debezium import _create_topics  # noqa: E402
from devtools import harness, readback  # noqa: E402
from devtools.ports import free_port  # noqa: E402
from devtools.stack import load_state  # noqa: E402
from devtools.workload import prefill, run_workload  # noqa: E402

RESULTS = REPO / "bench" / "results" / "cdc_latency.json"
#: Change events per workload transaction, measured (events applied / transactions committed:
#: 1,221 events/s at 587 tx/s on the 5,000-order prefill); --events-rate divides by it.
EVENTS_PER_TX = 2.08
EXAMPLES = REPO / "examples" / "shop"
_BUCKET = re.compile(r'^cutover_apply_latency_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$')


def scrape(port: int) -> Counter[float]:
    """Cumulative bucket counts (upper bound -> events) of one applier's latency histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Counter[float] = Counter()
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if m:
            out[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = int(float(m[2]))
    if not out:
        raise SystemExit(f"no latency histogram on port {port}")
    return out


def quantile(cumulative: Counter[float], q: float) -> float:
    """The q-quantile (seconds) of a cumulative histogram, interpolated inside its bucket."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    if total <= 0:
        raise SystemExit("no event applied in the window")
    rank, lower, below = q * total, 0.0, 0
    for upper in bounds:
        count = cumulative[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def _wait_metrics(ports: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                scrape(port)
                break
            except (OSError, SystemExit):
                if time.monotonic() > deadline:
                    raise SystemExit(f"applier metrics on port {port} never answered") from None
                time.sleep(0.5)


def _wait_snapshots(source_dsn: str, slot: str, timeout: float) -> None:
    """Until every snapshot request of the slot is done (legacy ``cutover.snapshot_requests``)."""
    deadline = time.monotonic() + timeout
    query = (
        "SELECT count(*) FILTER (WHERE status <> 'done'), count(*)"
        " FROM cutover.snapshot_requests WHERE slot_name = %s"
    )
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(query, (slot,)).fetchone()
            if row is not None and row[1] > 0 and row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise SystemExit("the initial snapshot did not finish in time")
            time.sleep(0.5)


def _legacy_backends(source: str) -> dict[str, list[int]]:
    """The legacy backends worth their own line: the workload's (its writes, the write fence's
    trigger included) and the walsender that decodes for the producer."""
    query = (
        "SELECT pid, application_name = 'cutover-workload' FROM pg_stat_activity"
        " WHERE datname = current_database()"
        "   AND (application_name = 'cutover-workload' OR backend_type = 'walsender')"
    )
    with psycopg.connect(source, autocommit=True) as conn:
        rows = conn.execute(query).fetchall()
    return {
        "PostgreSQL legacy: workload's backend": [pid for pid, workload in rows if workload],
        "PostgreSQL legacy: walsender": [pid for pid, workload in rows if not workload],
    }


def _cpu_groups(procs: list[Any], source: str, target: str, bootstrap: str) -> dict[str, list[int]]:
    """The processes whose CPU the window reports (bench.latency_stages.CpuWindow)."""
    singled = _legacy_backends(source)
    apart = {pid for pids in singled.values() for pid in pids}
    legacy = [p for p in stages.process_tree(stages.postmaster_of(source)) if p not in apart]
    groups = {
        "producer": [procs[-1].pid],
        **{f"apply-{i}": [p.pid] for i, p in enumerate(procs[:-1])},
        # The generator's thread, and its --workers processes (multiprocessing children).
        "workload (this benchmark process)": [
            os.getpid(),
            *(p.pid for p in multiprocessing.active_children() if p.pid),
        ],
        **singled,
        "PostgreSQL legacy (other backends)": legacy,
        "PostgreSQL commerce (all backends)": stages.process_tree(stages.postmaster_of(target)),
    }
    state = load_state(REPO / ".stack")
    if state is not None and state.kafka_pid and bootstrap.endswith(f":{state.kafka_port}"):
        groups["Kafka broker"] = stages.process_tree(state.kafka_pid)
    return groups


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` flags to config values (int, float, true/false, else the text)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"expected KEY=VALUE, not {pair!r}")
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        out[key.strip()] = value
    return out


def consumer_section(settings: dict[str, Any]) -> str:
    """The ``[kafka.consumer]`` table for the config (the harness writes none)."""
    if not settings:
        return ""
    lines = ["[kafka.consumer]", *(f'"{k}" = {json.dumps(v)}' for k, v in settings.items())]
    return "\n".join(lines) + "\n"


def run(
    rate: float,
    warmup: float,
    window: float,
    orders: int,
    tuning: dict[str, dict[str, Any]] | None = None,
    *,
    workers: int = 1,
) -> dict[str, Any]:
    """One measured run; ``tuning`` holds config sections passed to the processes
    (``kafka`` = [kafka], ``producer`` = [kafka.producer], ``consumer`` = [kafka.consumer],
    ``apply`` = [apply])."""
    tuning = {k: v for k, v in (tuning or {}).items() if v}
    env = stack_env()
    workdir = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    bootstrap = env["CUTOVER_KAFKA_BOOTSTRAP"]
    with (
        scratch(env["CUTOVER_SOURCE_DSN"], EXAMPLES / "legacy.sql", "latlegacy") as source,
        scratch(env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "latcommerce") as target,
        harness.open_scenario(
            source,
            target,
            bootstrap,
            workdir,
            kafka_settings=tuning.get("kafka", {}),
            producer_settings=tuning.get("producer", {}),
            apply_settings=tuning.get("apply", {}),
        ) as sc,
    ):
        prefill(source, orders=orders, seed=11)
        harness.init(sc)
        # The processes below read this file as it is now (harness rewrites it per CLI call).
        with sc.config.open("a", encoding="utf-8") as config:
            config.write(consumer_section(tuning.get("consumer", {})))
        topics = sc.topics()
        # Before anything is produced: record timestamps = the broker's append time.
        _create_topics(bootstrap, topics, sc.partitions)
        ports = [free_port(), free_port()]
        procs = [_start(sc, f"apply-{i}", "apply", "--metrics-port", str(p)) for i, p in
                 enumerate(ports)]  # fmt: skip
        procs.append(_start(sc, "produce", "produce"))
        try:
            _wait_metrics(ports)
            # The initial snapshot of the prefill must be finished and applied: only streamed
            # changes are measured (a snapshot chunk in flight holds the checkpoints back).
            _wait_snapshots(source, sc.slot, 600)
            _wait_applied(sc, 600)
            duration = warmup + window + 5
            report: dict[str, Any] = {}
            writer = threading.Thread(
                target=lambda: report.update(
                    r=run_workload(source, rate=rate, duration=duration, seed=21, workers=workers)
                ),
                daemon=True,
            )
            writer.start()
            time.sleep(warmup)
            cpu = stages.CpuWindow(_cpu_groups(procs, source, target, bootstrap))
            before = [scrape(p) for p in ports]
            ends_before = stages.partition_ends(bootstrap, topics, sc.partitions)
            cpu.start()
            t0, wall0 = time.monotonic(), datetime.now(UTC)
            wal0, redecode0 = stages.slot_sample(source, sc.slot)
            time.sleep(window)
            wal1, redecode1 = stages.slot_sample(source, sc.slot)
            t1, wall1 = time.monotonic(), datetime.now(UTC)
            usage = cpu.stop(t1 - t0)
            after = [scrape(p) for p in ports]
            ends_after = stages.partition_ends(bootstrap, topics, sc.partitions)
            writer.join(duration + 60)
        finally:
            for proc in procs:
                harness.stop(proc)
            for proc in procs:
                if proc.returncode not in (0, None):
                    print(f"warning: a process exited {proc.returncode}", file=sys.stderr)
        # Read back after the processes stopped: no CPU taken from the window.
        store = readback.schema_store(bootstrap, f"{sc.prefix}.schemas")
        legs = stages.stage_latencies(bootstrap, store, ends_before, ends_after)
        cycles = stages.producer_cycles(workdir / "produce.log", wall0, wall1)
    delta: Counter[float] = Counter()
    for b, a in zip(before, after, strict=True):
        for bound in a:
            delta[bound] += a[bound] - b[bound]
    events = delta[float("inf")]
    workload = report.get("r")
    messages = sum(ends_after.values()) - sum(ends_before.values())
    return {
        "benchmark": "cdc_latency",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # The 1-minute load average at the end: on a shared 2-core machine it says how much of
        # the latency is waiting for a CPU rather than the pipeline's cadence.
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_1m": round(os.getloadavg()[0], 1),
        },
        "path": "legacy COMMIT -> cutover produce -> Kafka -> 2 x cutover apply -> commerce COMMIT",
        "settings": tuning,
        "asked_tx_per_s": rate,
        "workload_workers": workers,
        "workload_committed_tx": workload.committed if workload else None,
        "workload_tx_per_s": round(workload.committed / workload.elapsed_s) if workload else None,
        "window_s": round(t1 - t0, 1),
        "events_applied_in_window": events,
        "events_per_s_applied": round(events / (t1 - t0)),
        "kafka_messages_per_s": round(messages / (t1 - t0)),
        "p50_ms": round(quantile(delta, 0.50) * 1000),
        "p99_ms": round(quantile(delta, 0.99) * 1000),
        "target_p99_ms": 250,
        "stages": {
            **legs,
            "commit_to_commerce_commit": {
                "p50_ms": round(quantile(delta, 0.50) * 1000),
                "p99_ms": round(quantile(delta, 0.99) * 1000),
                "source": "appliers' histogram (bucket-interpolated)",
            },
        },
        "producer_cycles": {
            **cycles,
            "wal_bytes_per_s": round((wal1 - wal0) / (t1 - t0)),
            # Decoded again by every peek and every advance (bench.latency_stages.slot_sample).
            "redecoded_wal_bytes_start_end": [redecode0, redecode1],
        },
        "cpu": usage,
        # The primary figure on a shared machine (less sensitive to load than events/s).
        "cpu_us_per_event": {
            name: round(pct * 10_000 / (events / (t1 - t0))) if events else None
            for name, pct in usage["processes"].items()
        },
        "method": "per-event histogram of the appliers (source.ts_ms = source commit time), "
        "scraped before and after the window; quantiles interpolated inside buckets. Stages: "
        "the window's records read back (exact per-event quantiles)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=600, help="workload transactions/s")
    rate.add_argument(
        "--events-rate",
        type=float,
        default=None,
        help=f"change events/s to aim for instead (÷ {EVENTS_PER_TX} events per transaction)",
    )
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument("--window", type=float, default=45)
    parser.add_argument("--orders", type=int, default=5_000, help="prefill size")
    parser.add_argument("--workers", type=int, default=1, help="workload connections")
    for section, where in (
        ("kafka", "[kafka]"),
        ("producer", "[kafka.producer]"),
        ("consumer", "[kafka.consumer]"),
        ("apply", "[apply]"),
    ):
        parser.add_argument(
            f"--{section}",
            action="append",
            metavar="KEY=VALUE",
            help=f"a {where} setting for this run (repeat the flag for more)",
        )
    args = parser.parse_args()
    tx_rate = args.rate if args.events_rate is None else args.events_rate / EVENTS_PER_TX
    sections = ("kafka", "producer", "consumer", "apply")
    tuning = {s: parse_settings(getattr(args, s)) for s in sections}
    result = run(tx_rate, args.warmup, args.window, args.orders, tuning, workers=args.workers)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    """The figures as a Markdown table: the total, then each stage, then the CPU."""
    st, cpu = result["stages"], result["cpu"]
    load = f"load {cpu['load_1m_start']}–{cpu['load_1m_end']}"
    lines = [
        "| measure | p50 | p99 |",
        "|---|---:|---:|",
        f"| legacy COMMIT → producer built the event (`ts_ms`) "
        f"| {st['commit_to_producer_built']['p50_ms']} ms "
        f"| {st['commit_to_producer_built']['p99_ms']} ms |",
        f"| legacy COMMIT → Kafka broker append (LogAppendTime) "
        f"| {st['commit_to_broker_append']['p50_ms']} ms "
        f"| {st['commit_to_broker_append']['p99_ms']} ms |",
        f"| legacy COMMIT → commerce COMMIT (appliers' histogram) "
        f"| {result['p50_ms']} ms | {result['p99_ms']} ms |",
        "",
        f"{result['events_per_s_applied']:,} events/s applied ({result['asked_tx_per_s']:g} tx/s "
        f"asked, {result['workload_tx_per_s']} reached), {load}, machine busy "
        f"{cpu['machine_busy']} % of {cpu['machine_capacity']} %; CPU % of one core: "
        + ", ".join(f"{k} {v}" for k, v in cpu["processes"].items())
        + f", others {cpu['others']}",
        "CPU µs per applied event: "
        + ", ".join(f"{k} {v}" for k, v in result["cpu_us_per_event"].items()),
        "settings: "
        + (
            "; ".join(
                f"{section} " + ", ".join(f"{k}={v}" for k, v in values.items())
                for section, values in result.get("settings", {}).items()
            )
            or "defaults"
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
