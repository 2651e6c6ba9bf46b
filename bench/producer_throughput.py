"""Producer benchmarks: backlog drain, steady streaming, memory on a 1,000,000-row transaction.

Run with the local stack up (``make up``)::

    .venv/bin/python bench/producer_throughput.py [--changes 1000000] [--profile]

(a) **backlog**: 1,000,000 changes in 100,000 source transactions (an order, 8 lines, an update
    of the order: 10 changes each) are written while no producer runs; then ``cutover produce
    --exit-when-idle`` drains them. Reported: events/s over the producer's run (decoding by
    PostgreSQL included), peak RSS.
(b) **streaming**: the workload generator writes realistic shop traffic at full speed for a
    fixed time while the producer runs; reported: events/s delivered while the workload ran,
    and how long the producer needed after the workload stopped to be caught up.
(c) **big transaction**: one INSERT of 1,000,000 order lines; reported: seconds and peak RSS of
    the producer process (``ru_maxrss``).

Each case uses its own scratch database, slot, publication and topic prefix, all removed at the
end. Prints a JSON document and a Markdown table; writes ``bench/results/producer.json``.
``--profile`` runs (a) in-process under cProfile instead and prints where the time goes.
``--read-mode sql|stream`` sets ``[source] read_mode`` for every case. ``--compare-modes`` runs
only (a), once per read mode on two slots created before the one backlog, one mode after the
other, with the CPU of the PostgreSQL backends serving each (sampled from /proc); it writes
``bench/results/producer_read_modes.json``. ``--cpu`` runs only (a) and a shop workload backlog
(``--workload-transactions``) and prints the CPU per event of the producer, of the PostgreSQL
backends serving it and of the broker (all sampled from /proc): less sensitive to a shared
machine's load than events/s.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cutover import logging as cutover_logging  # noqa: E402
from devtools import harness  # noqa: E402
from devtools.harness import Scenario  # noqa: E402
from devtools.stack import read_env  # noqa: E402
from devtools.workload import prefill, run_workload  # noqa: E402
from producers.producer import run_producer  # noqa: E402
from producers.run_options import ProducerOptions  # noqa: E402

RESULTS = REPO / "bench" / "results" / "producer.json"
LEGACY_SQL = REPO / "examples" / "shop" / "legacy.sql"

BACKLOG_PROC = """
CREATE OR REPLACE PROCEDURE pg_temp.backlog(txs int) LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..txs LOOP
    INSERT INTO shop.orders (id, buyer_id, merchant_id, status, total_idr)
      VALUES (i, i % 5000, i % 97, 'created', 800.00);
    INSERT INTO shop.order_items (order_id, line_no, product_id, qty, unit_price_idr)
      SELECT i, l, (i * 8 + l) % 20000, 1 + l % 3, 100.00 FROM generate_series(1, 8) l;
    UPDATE shop.orders SET status = 'paid', updated_at = now() WHERE id = i;
    COMMIT;
  END LOOP;
END $$;
"""


def stack_env() -> dict[str, str]:
    env = read_env(REPO / ".stack", os.environ)
    for key in ("CUTOVER_SOURCE_DSN", "CUTOVER_TARGET_DSN", "CUTOVER_KAFKA_BOOTSTRAP"):
        if key not in env:
            raise SystemExit(f"{key} is not set and .stack/env is missing: run `make up` first")
    return env


@contextmanager
def scratch(admin_dsn: str, ddl: Path | None, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo.conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    dsn = conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    try:
        if ddl is not None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(ddl.read_text().encode())
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def pipeline(
    env: dict[str, str], workdir: Path, target_ddl: Path | None = None, **kwargs: Any
) -> Iterator[Scenario]:
    """An initialised scenario on scratch databases (commerce empty unless ``target_ddl``)."""
    with (
        scratch(env["CUTOVER_SOURCE_DSN"], LEGACY_SQL, "benchlegacy") as source,
        scratch(env["CUTOVER_TARGET_DSN"], target_ddl, "benchcommerce") as target,
        harness.open_scenario(
            source, target, env["CUTOVER_KAFKA_BOOTSTRAP"], workdir, **kwargs
        ) as scenario,
    ):
        harness.init(scenario)
        yield scenario


def produce(scenario: Scenario) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    result = scenario.cli("produce", "--exit-when-idle", "--no-initial-snapshot", "--json",
                          timeout=3600)  # fmt: skip
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"produce failed ({result.returncode}): {result.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report, wall


def write_backlog(dsn: str, changes: int) -> float:
    txs = max(1, changes // 10)
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BACKLOG_PROC)
        conn.execute("CALL pg_temp.backlog(%s)", (txs,))
    return time.monotonic() - started


def compare_modes(env: dict[str, str], workdir: Path, changes: int) -> dict[str, Any]:
    """(a) in both read modes: the same WAL (both slots exist before the backlog is written)."""
    out: dict[str, Any] = {"changes": changes, "load_1m_before": round(os.getloadavg()[0], 1)}
    with pipeline(env, workdir, read_mode="sql") as sql_mode:
        stream_mode = Scenario(
            sql_mode.source_dsn, sql_mode.target_dsn, sql_mode.bootstrap, workdir,
            read_mode="stream",
        )  # fmt: skip
        try:
            harness.init(stream_mode)
            out["write_s"] = round(write_backlog(sql_mode.source_dsn, changes), 2)
            for scenario in (sql_mode, stream_mode):
                out[str(scenario.read_mode)] = measured_produce(scenario, workdir)
        finally:
            stream_mode.drop_slot()
    return out


def cpu_per_event(
    env: dict[str, str], workdir: Path, changes: int, transactions: int
) -> dict[str, Any]:
    """CPU per event of the producer, PostgreSQL and the broker draining (a) the synthetic
    backlog and (w) a shop workload backlog of ``transactions`` (timestamptz, numeric, text)."""
    out: dict[str, Any] = {"load_1m_before": round(os.getloadavg()[0], 1)}
    with pipeline(env, workdir) as scenario:
        # The fixed cost (imports, connections, topic metadata, the final flush): a run over
        # an empty slot, subtracted in the *_net figures.
        fixed = measured_produce(scenario, workdir)["producer_cpu_s"]
        out["producer_fixed_cpu_s"] = fixed
        out["write_s"] = round(write_backlog(scenario.source_dsn, changes), 2)
        out["synthetic"] = _net(measured_produce(scenario, workdir), fixed)
    if transactions:
        with scratch(env["CUTOVER_SOURCE_DSN"], LEGACY_SQL, "benchlegacy") as source:
            prefill(source, orders=2_000, seed=11)
            with (
                scratch(env["CUTOVER_TARGET_DSN"], None, "benchcommerce") as target,
                harness.open_scenario(
                    source, target, env["CUTOVER_KAFKA_BOOTSTRAP"], workdir
                ) as scenario,
            ):
                harness.init(scenario)
                run_workload(source, rate=1_000_000, max_transactions=transactions, seed=12)
                out["workload"] = _net(measured_produce(scenario, workdir), fixed)
    return out


def _net(measured: dict[str, Any], fixed_cpu_s: float) -> dict[str, Any]:
    net = (measured["producer_cpu_s"] - fixed_cpu_s) / max(1, measured["events"]) * 1e6
    return {**measured, "producer_cpu_us_per_event_net": round(net, 1)}


def _broker_pids() -> list[int]:
    state = json.loads((REPO / ".stack" / "state.json").read_text())
    return [int(p) for p in [state.get("kafka_pid"), *state.get("more_pids", [])] if p]


def measured_produce(scenario: Scenario, workdir: Path) -> dict[str, Any]:
    """One ``produce --exit-when-idle`` in a subprocess, with the CPU of the producer, of the
    PostgreSQL backends serving it and of the broker (sampled from /proc)."""
    from bench.vs_debezium import Usage

    load = os.getloadavg()[0]
    report_path = workdir / f"report-{scenario.tag}.json"
    config = str(scenario.write_config())
    cmd = [sys.executable, "-m", "cli.entry", "--config", config, "produce",
           "--exit-when-idle", "--no-initial-snapshot", "--json"]  # fmt: skip
    broker = Usage()
    broker.sample(_broker_pids())
    broker_before = broker.cpu_s
    with report_path.open("wb") as stdout, scenario.log_path.open("ab") as log:
        tool = subprocess.Popen(cmd, env=scenario.env(), stdout=stdout, stderr=log)
        usage, backends = _watch_backends(tool, scenario.source_dsn)
    if tool.wait() != 0:
        raise SystemExit(f"produce failed: see {scenario.log_path}")
    broker.sample(_broker_pids())
    report = json.loads(report_path.read_text())
    events = max(1, report["events"])
    # Autovacuum (listed by backend) serves no reader: the backlog was just written.
    pg_cpu = sum(u.cpu_s for name, u in backends.items() if name != "autovacuum worker")
    broker_cpu = broker.cpu_s - broker_before
    return {
        "events": report["events"],
        "produce_s": round(report["elapsed_s"], 2),
        "events_per_s": round(report["events"] / report["elapsed_s"]),
        "producer_cpu_s": round(usage.cpu_s, 2),
        "producer_cpu_us_per_event": round(usage.cpu_s / events * 1e6, 1),
        "broker_cpu_s": round(broker_cpu, 2),
        "broker_cpu_us_per_event": round(broker_cpu / events * 1e6, 1),
        "postgres_cpu_s": round(pg_cpu, 2),
        "postgres_cpu_us_per_change": round(pg_cpu / events * 1e6, 2),
        "postgres_cpu_s_by_backend": {
            name: round(u.cpu_s, 2) for name, u in sorted(backends.items())
        },
        "peak_rss_mb": round(report["peak_rss_kb"] / 1024, 1),
        "load_1m_start": round(load, 1),
        "load_1m_end": round(os.getloadavg()[0], 1),
    }


def _watch_backends(tool: subprocess.Popen[bytes], dsn: str) -> tuple[Any, dict[str, Any]]:
    """CPU of ``tool`` and of the backends of ``dsn``'s database by application name, sampled
    from /proc every 0.1 s until ``tool`` exits (the sampling session itself left out)."""
    from bench.vs_debezium import Usage

    ours, backends = Usage(), dict[str, Usage]()
    with psycopg.connect(dsn, autocommit=True) as conn:
        me = conn.info.backend_pid
        while tool.poll() is None:
            rows = conn.execute(
                "SELECT pid, coalesce(nullif(application_name, ''), backend_type)"
                " FROM pg_stat_activity WHERE datname = current_database() AND pid <> %s",
                (me,),
            ).fetchall()
            for pid, name in rows:
                backends.setdefault(str(name), Usage()).sample([pid])
            ours.sample([tool.pid])
            time.sleep(0.1)
    return ours, backends


def bench_backlog(env: dict[str, str], workdir: Path, changes: int) -> dict[str, Any]:
    with pipeline(env, workdir) as scenario:
        written = write_backlog(scenario.source_dsn, changes)
        report, wall = produce(scenario)
    return {
        "changes": report["events"],
        "transactions": report["transactions"],
        "write_s": round(written, 2),
        "produce_s": round(report["elapsed_s"], 2),
        "process_wall_s": round(wall, 2),
        "events_per_s": round(report["events"] / report["elapsed_s"]),
        "peak_rss_mb": round(report["peak_rss_kb"] / 1024, 1),
    }


def bench_streaming(env: dict[str, str], workdir: Path, seconds: float) -> dict[str, Any]:
    with pipeline(env, workdir) as scenario:
        prefill(scenario.source_dsn, orders=20_000, seed=1)
        proc = scenario.start_produce("--no-initial-snapshot")
        # Let the producer deliver the prefill (one big transaction) before measuring.
        time.sleep(2)
        result: dict[str, Any] = {}

        def write() -> None:
            report = run_workload(scenario.source_dsn, rate=100_000, duration=seconds, seed=3)
            result["workload"] = report

        def delivered() -> int:
            return sum(
                e["events"] for e in scenario.log_events()
                if e["event"] == "producer.batch_delivered"
            )  # fmt: skip

        base = delivered()
        writer = threading.Thread(target=write)
        started = time.monotonic()
        writer.start()
        writer.join()
        during = delivered() - base
        workload_s = time.monotonic() - started
        # Caught up: the slot reaches the WAL position of the workload's end.
        with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
            while True:
                row = conn.execute(
                    "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (target, scenario.slot),
                ).fetchone()
                if row and row[0]:
                    break
                if time.monotonic() - started > seconds + 600:
                    raise SystemExit("the producer did not catch up")
                time.sleep(0.1)
        caught_up = time.monotonic() - started - workload_s
        total = delivered() - base
        harness.stop(proc)
    wl = result["workload"]
    return {
        "workload_s": round(workload_s, 1),
        "workload_tx_per_s": round(wl.achieved_rate),
        "events_delivered": total,
        "events_per_s_while_writing": round(during / workload_s),
        "events_per_s_end_to_end": round(total / (workload_s + caught_up)),
        "catch_up_after_workload_s": round(caught_up, 2),
    }


def bench_big_transaction(env: dict[str, str], workdir: Path, rows: int) -> dict[str, Any]:
    with pipeline(env, workdir) as scenario:
        with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO shop.order_items (order_id, line_no, product_id, qty,"
                " unit_price_idr) SELECT g / 8, g %% 8, g %% 997, 1 + g %% 5,"
                " (g %% 100000) / 100.0 FROM generate_series(0, %s - 1) g",
                (rows,),
            )
        report, _ = produce(scenario)
    return {
        "rows": report["events"],
        "produce_s": round(report["elapsed_s"], 2),
        "events_per_s": round(report["events"] / report["elapsed_s"]),
        "peak_rss_mb": round(report["peak_rss_kb"] / 1024, 1),
    }


def profile_backlog(env: dict[str, str], workdir: Path, changes: int) -> None:
    with pipeline(env, workdir) as scenario:
        write_backlog(scenario.source_dsn, changes)
        settings = scenario.settings()
        cutover_logging.configure(level="warning", json=True)
        profiler = cProfile.Profile()
        started = time.monotonic()
        profiler.enable()
        report = run_producer(
            settings, ProducerOptions(exit_when_idle=True, initial_snapshot=False)
        )
        profiler.disable()
        elapsed = time.monotonic() - started
    print(f"{report.events} events in {elapsed:.1f} s: {report.events / elapsed:,.0f}/s")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(25)


def markdown(results: dict[str, Any]) -> str:
    a, b, c = results["backlog"], results["streaming"], results["big_transaction"]
    rows = [
        "| case | figure | target |",
        "|---|---|---|",
        f"| (a) backlog drain, {a['changes']:,} changes in {a['transactions']:,} txs "
        f"| **{a['events_per_s']:,} events/s** ({a['produce_s']} s), RSS {a['peak_rss_mb']} MB "
        "| >= 30,000 events/s |",
        f"| (b) streaming, workload at {b['workload_tx_per_s']:,} tx/s for {b['workload_s']} s "
        f"| {b['events_per_s_while_writing']:,} events/s while writing, caught up "
        f"{b['catch_up_after_workload_s']} s after | keeps up |",
        f"| (c) one transaction of {c['rows']:,} rows | {c['produce_s']} s "
        f"({c['events_per_s']:,} events/s), **peak RSS {c['peak_rss_mb']} MB** | <= 300 MB |",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--stream-seconds", type=float, default=30.0)
    parser.add_argument("--big-rows", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="profile (a) with cProfile")
    parser.add_argument("--read-mode", choices=["sql", "stream"], help="[source] read_mode")
    parser.add_argument(
        "--compare-modes", action="store_true", help="(a) in both read modes, PostgreSQL's CPU"
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="CPU per event (producer, PostgreSQL, broker): (a) and a workload backlog",
    )
    parser.add_argument(
        "--workload-transactions", type=int, default=30_000, help="workload backlog for --cpu"
    )
    args = parser.parse_args()
    env = stack_env()
    if args.read_mode:
        # Scenario reads it (devtools.harness.READ_MODE_ENV) for every case below.
        os.environ[harness.READ_MODE_ENV] = args.read_mode
    with tempfile.TemporaryDirectory(prefix="bench-producer-") as tmp:
        workdir = Path(tmp)
        if args.compare_modes:
            compared = compare_modes(env, workdir, args.changes)
            path = RESULTS.with_name("producer_read_modes.json")
            path.write_text(json.dumps(compared, indent=2) + "\n")
            print(json.dumps(compared, indent=2))
            return
        if args.cpu:
            measured = cpu_per_event(env, workdir, args.changes, args.workload_transactions)
            print(json.dumps(measured, indent=2))
            return
        if args.profile:
            profile_backlog(env, workdir, args.changes)
            return
        results = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "backlog": bench_backlog(env, workdir, args.changes),
            "streaming": bench_streaming(env, workdir, args.stream_seconds),
            "big_transaction": bench_big_transaction(env, workdir, args.big_rows),
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print()
    print(markdown(results))


if __name__ == "__main__":
    _ = subprocess  # the commands run through devtools.harness (subprocess)
    main()
