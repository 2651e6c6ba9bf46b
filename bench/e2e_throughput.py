"""End-to-end benchmarks, old DB to commerce DB: initial snapshot and a streamed backlog.

Run with the local stack up (``make up``)::

    .venv/bin/python -m bench.e2e_throughput [--orders 150000] [--transactions 290000]
        [--assignment cooperative-sticky|range]

(a) **snapshot**: a prefilled legacy shop (``--orders`` 150,000 ≈ 960,000 rows in 7 tables,
    the biggest ≈ 450,000 rows) is loaded by ``cutover produce``'s initial snapshot (DBLog
    chunks) while two ``cutover apply`` processes apply it. Reported: rows/s into Kafka (the
    producer's run) and rows/s until commerce holds every row.
(b) **backlog**: ``--transactions`` (290,000 ≈ 1,000,000 change events) of workload traffic
    are written while nothing runs; then the producer and two consumers start together.
    Reported: change events/s from the start until the consumers have applied everything the
    producer delivered.

Where the time goes: for each run, the CPU seconds of the producer, the two appliers, each
PostgreSQL cluster (postmaster and every backend, ended ones included) and the Kafka broker,
and the same per row or event in microseconds (:func:`cpu_profile`). On 2 cores, N events/s
end to end need a total under 2,000,000 / N µs per event.

Each run uses scratch databases, slot, publication and topic prefix, removed at the end. Prints
JSON and a Markdown table; writes ``bench/results/e2e.json``. Also reported: the appliers'
assignor (``[kafka] apply_assignment``), each applier's share of the events it applied (its
``apply.stopping`` log line) and the load average at the start and the end of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.latency_stages import postmaster_of, proc_cpu_s, tree_cpu_s  # noqa: E402
from bench.producer_throughput import scratch, stack_env  # noqa: E402
from devtools import harness  # noqa: E402
from devtools.harness import Scenario  # noqa: E402
from devtools.stack import load_state  # noqa: E402
from devtools.workload import prefill, run_workload  # noqa: E402

RESULTS = REPO / "bench" / "results" / "e2e.json"
EXAMPLES = REPO / "examples" / "shop"
TABLES = ("users", "merchants", "products", "orders", "order_items", "payments", "invoices")
COMMERCE = ("customers", "sellers", "listings", "orders", "order_lines", "payments", "invoices")


def _count(dsn: str, schema: str, tables: tuple[str, ...]) -> int:
    query = " + ".join(f"(SELECT count(*) FROM {schema}.{t})" for t in tables)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT {query}".encode()).fetchone()
    return int(row[0]) if row else 0


def _start(
    scenario: Scenario, name: str, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log = (scenario.workdir / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cli.entry", "--config", str(scenario.config), "--log-json",
         *args],
        env=scenario.env(extra_env), stdout=log, stderr=log,
    )  # fmt: skip


def _end_offsets(scenario: Scenario) -> int:
    consumer = Consumer({"bootstrap.servers": scenario.bootstrap, "group.id": "bench-probe"})
    try:
        total = 0
        for topic in scenario.topics():
            for p in range(scenario.partitions):
                total += consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        return total
    finally:
        consumer.close()


def _applied_offsets(scenario: Scenario) -> int:
    with psycopg.connect(scenario.target_dsn) as conn:
        row = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM cutover.consumer_offsets")
        value = row.fetchone()
    return int(value[0]) if value else 0


def _appliers_cpu(appliers: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    return {f"applier_{i}": proc_cpu_s(p.pid) or 0.0 for i, p in enumerate(appliers)}


def _wait_applied(scenario: Scenario, timeout: float) -> float:
    """Seconds until the consumers stored offsets up to every partition's end offset."""
    end = _end_offsets(scenario)
    deadline = time.monotonic() + timeout
    while _applied_offsets(scenario) < end:
        if time.monotonic() > deadline:
            raise SystemExit("consumers did not catch up in time")
        time.sleep(0.2)
    return time.monotonic()


class Servers:
    """CPU seconds used so far by the stack's servers (both PostgreSQL clusters, Kafka)."""

    def __init__(self, source: str, target: str) -> None:
        state = load_state(REPO / ".stack")
        self.groups = {
            "postgresql_legacy": postmaster_of(source),
            "postgresql_commerce": postmaster_of(target),
            **{
                f"kafka_{i}": pid
                for i, pid in enumerate(state.kafka_pids() if state else [])
                if pid is not None
            },
        }

    def sample(self) -> dict[str, float]:
        return {name: tree_cpu_s(pid) for name, pid in self.groups.items()}


def _children_cpu_s() -> float:
    """CPU of this process's reaped children (the synchronous ``cutover produce`` run)."""
    t = os.times()
    return t.children_user + t.children_system


def cpu_profile(
    before: dict[str, float], after: dict[str, float], clients: dict[str, float], units: int
) -> dict[str, Any]:
    """CPU seconds per component between two samples, and µs per unit (row or event)."""
    seconds = {k: after[k] - before[k] for k in after} | clients
    total = sum(seconds.values())
    return {
        "cpu_s": {k: round(v, 1) for k, v in seconds.items()},
        "cpu_us_per_unit": {k: round(v / units * 1e6, 1) for k, v in seconds.items()},
        "total_cpu_us_per_unit": round(total / units * 1e6, 1),
        "ceiling_on_2_cores_per_s": round(units * 2 / total) if total else None,
    }


def _shares(scenario: Scenario, names: list[str]) -> list[int]:
    """Events each applier applied, from its last ``apply.stopping`` log line (after SIGTERM)."""
    counts = []
    for name in names:
        events = 0
        for line in (scenario.workdir / f"{name}.log").read_text().splitlines():
            if '"apply.stopping"' in line:
                events = int(json.loads(line).get("events", 0))
        counts.append(events)
    return counts


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(orders: int, transactions: int, assignment: str) -> dict[str, Any]:
    env = stack_env()
    workdir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    kafka_settings = {"apply_assignment": assignment}
    with (
        scratch(env["CUTOVER_SOURCE_DSN"], EXAMPLES / "legacy.sql", "benchlegacy") as source,
        scratch(env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "benchcommerce") as target,
        harness.open_scenario(
            source, target, env["CUTOVER_KAFKA_BOOTSTRAP"], workdir, kafka_settings=kafka_settings
        ) as sc,
    ):
        prefill(source, orders=orders, seed=11)
        rows = _count(source, "shop", TABLES)
        harness.init(sc)

        servers = Servers(source, target)
        # (a) snapshot: producer alone (rows/s into Kafka), consumers started with it.
        load_start = _load()
        t0, cpu0, kids0 = time.monotonic(), servers.sample(), _children_cpu_s()
        appliers = [_start(sc, f"apply-{i}", "apply") for i in range(2)]
        done = sc.cli("produce", "--exit-when-idle", "--json", timeout=3600)
        produced_at, producer_cpu = time.monotonic(), _children_cpu_s() - kids0
        if done.returncode != 0:
            raise SystemExit(f"produce failed: {done.stderr[-2000:]}")
        applied_at = _wait_applied(sc, 1800)
        clients = {"producer": producer_cpu} | _appliers_cpu(appliers)
        snapshot = {
            "source_rows": rows,
            "produce_s": round(produced_at - t0, 2),
            "rows_per_s_into_kafka": round(rows / (produced_at - t0)),
            "end_to_end_s": round(applied_at - t0, 2),
            "rows_per_s_end_to_end": round(rows / (applied_at - t0)),
            "commerce_rows": _count(target, "commerce", COMMERCE),
            "where_the_time_goes": cpu_profile(cpu0, servers.sample(), clients, rows),
            "load_average_start_end": [load_start, _load()],
        }
        for p in appliers:
            harness.stop(p)
        snapshot["events_per_applier"] = _shares(sc, ["apply-0", "apply-1"])

        # (b) backlog: written while nothing runs, then drained end to end.
        before = _end_offsets(sc)
        report = run_workload(source, rate=1_000_000, max_transactions=transactions, seed=12)
        load_start = _load()
        t1, cpu1, kids1 = time.monotonic(), servers.sample(), _children_cpu_s()
        appliers = [_start(sc, f"apply-b{i}", "apply") for i in range(2)]
        done = sc.cli("produce", "--exit-when-idle", "--json", timeout=3600)
        producer_cpu = _children_cpu_s() - kids1
        if done.returncode != 0:
            raise SystemExit(f"produce failed: {done.stderr[-2000:]}")
        applied_at = _wait_applied(sc, 1800)
        events = _end_offsets(sc) - before
        clients = {"producer": producer_cpu} | _appliers_cpu(appliers)
        profile = cpu_profile(cpu1, servers.sample(), clients, events)
        load_end = _load()
        for p in appliers:
            harness.stop(p)
        backlog = {
            "source_transactions": report.committed,
            "kafka_messages": events,
            "note": "messages include heartbeats (a few per second per partition)",
            "end_to_end_s": round(applied_at - t1, 2),
            "events_per_s_end_to_end": round(events / (applied_at - t1)),
            "where_the_time_goes": profile,
            "events_per_applier": _shares(sc, ["apply-b0", "apply-b1"]),
            "load_average_start_end": [load_start, load_end],
        }
    return {
        "benchmark": "e2e",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "apply_assignment": assignment,
        "size": {"orders": orders, "transactions": transactions},
        "snapshot": snapshot,
        "backlog": backlog,
        "targets": {"snapshot_rows_per_s": 50_000, "backlog_events_per_s": 20_000},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=150_000)
    parser.add_argument("--transactions", type=int, default=290_000)
    parser.add_argument(
        "--assignment", choices=("cooperative-sticky", "range"), default="cooperative-sticky",
        help="the appliers' [kafka] apply_assignment",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON result's file")
    args = parser.parse_args()
    result = run(args.orders, args.transactions, args.assignment)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    s, b = result["snapshot"], result["backlog"]
    print("\n| measure | figure | target |\n|---|---|---|")
    print(f"| snapshot into Kafka | {s['rows_per_s_into_kafka']:,} rows/s | ≥ 50,000 |")
    print(f"| snapshot end to end | {s['rows_per_s_end_to_end']:,} rows/s | – |")
    print(f"| backlog end to end | {b['events_per_s_end_to_end']:,} events/s | ≥ 20,000 |")
    print("\n| CPU µs per row / event | snapshot | backlog |\n|---|---:|---:|")
    ps, pb = s["where_the_time_goes"], b["where_the_time_goes"]
    for name in pb["cpu_us_per_unit"]:
        print(f"| {name} | {ps['cpu_us_per_unit'][name]} | {pb['cpu_us_per_unit'][name]} |")
    print(f"| total | {ps['total_cpu_us_per_unit']} | {pb['total_cpu_us_per_unit']} |")


if __name__ == "__main__":
    main()
