"""Benchmark: the workload generator's achieved rate against the asked rate, and prefill speed.

Creates a scratch database on the legacy cluster, loads examples/shop/legacy.sql, prefills it
(100,000 orders by default, timed), then runs the workload for ``--duration`` seconds at each
asked rate (and once unthrottled, to show the ceiling), one after the other on the growing data
set. Prints the results as JSON and as a Markdown table, and writes the JSON to
bench/results/workload_rate.json. The scratch database is dropped afterwards.

    CUTOVER_SOURCE_DSN='host=127.0.0.1 port=5432 user=postgres dbname=postgres' \\
        .venv/bin/python -m bench.workload_rate

The DSN comes from --dsn, else $CUTOVER_SOURCE_DSN, else .stack/env (``make up``); it must be
allowed to CREATE DATABASE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

from bench.latency_stages import postmaster_of, tree_cpu_s
from devtools.stack import read_env
from devtools.workload import prefill, run_workload

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "workload_rate.json"
UNTHROTTLED = 1_000_000.0


def _default_dsn() -> str | None:
    return read_env(REPO / ".stack", os.environ).get("CUTOVER_SOURCE_DSN")


def _with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def _own_cpu_s() -> float:
    """This process and its reaped children (the --workers processes)."""
    return sum(
        u.ru_utime + u.ru_stime
        for u in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def bench(
    admin_dsn: str, rates: list[float], duration: float, orders: int, seed: int, *, workers: int = 1
) -> dict[str, Any]:
    name = f"bench_workload_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        server = conn.execute("SHOW server_version").fetchone()
    dsn = _with_dbname(admin_dsn, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute((REPO / "examples" / "shop" / "legacy.sql").read_text())
        print(f"prefilling {orders:,} orders ...", file=sys.stderr)
        filled = prefill(dsn, orders=orders, seed=seed)
        runs = []
        postmaster = postmaster_of(dsn)
        for rate in [*rates, UNTHROTTLED]:
            label = "unthrottled" if rate == UNTHROTTLED else f"{rate:g} tx/s"
            print(f"running {label} for {duration:g} s ...", file=sys.stderr)
            # CPU per transaction: this process is the client; the server side is the whole
            # cluster (the workload's backend, the WAL writer, ...: nothing else uses it).
            client0, cluster0 = _own_cpu_s(), tree_cpu_s(postmaster)
            report = run_workload(dsn, rate=rate, duration=duration, seed=seed, workers=workers)
            time.sleep(0.5)  # the backend exits and is reaped: its CPU moves to the postmaster
            client, cluster = _own_cpu_s() - client0, tree_cpu_s(postmaster) - cluster0
            per_tx = 1e6 / max(report.transactions, 1)
            runs.append(
                {
                    "asked_tx_s": None if rate == UNTHROTTLED else rate,
                    "achieved_tx_s": round(report.achieved_rate, 1),
                    "ratio": None if rate == UNTHROTTLED else round(report.achieved_rate / rate, 4),
                    "transactions": report.transactions,
                    "rolled_back": report.rolled_back,
                    "statements": report.statements,
                    "statements_s": round(report.statements / report.elapsed_s, 1),
                    "elapsed_s": round(report.elapsed_s, 3),
                    "max_behind_s": round(report.max_behind_s, 3),
                    "bulk_reprices": report.counts.get("product.bulk_reprice", 0),
                    "client_cpu_us_per_tx": round(client * per_tx),
                    "postgresql_cpu_us_per_tx": round(cluster * per_tx),
                    "load_1m": round(os.getloadavg()[0], 1),
                }
            )
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    return {
        "benchmark": "workload_rate",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "postgresql": server[0] if server else None,
        },
        "seed": seed,
        "workers": workers,
        "duration_s": duration,
        "prefill": filled.to_dict(),
        "runs": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    fill = result["prefill"]
    lines = [
        f"Prefill: {fill['rows']['orders']:,} orders ({fill['total_rows']:,} rows) in "
        f"{fill['elapsed_s']:.1f} s ({fill['rows_per_s']:,} rows/s)",
        "",
        "| asked tx/s | achieved tx/s | ratio | statements/s | worst lateness s "
        "| client CPU µs/tx | PostgreSQL CPU µs/tx | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        asked = "unthrottled" if run["asked_tx_s"] is None else f"{run['asked_tx_s']:,.0f}"
        ratio = "" if run["ratio"] is None else f"{run['ratio']:.3f}"
        lines.append(
            f"| {asked} | {run['achieved_tx_s']:,.1f} | {ratio} | {run['statements_s']:,.0f} |"
            f" {run['max_behind_s']:.3f} | {run['client_cpu_us_per_tx']} |"
            f" {run['postgresql_cpu_us_per_tx']} | {run['load_1m']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dsn", default=_default_dsn(), help="admin DSN of the legacy cluster")
    parser.add_argument("--rates", default="250,500,1000,1500,2000", help="asked rates (tx/s)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--orders", type=int, default=100_000, help="prefill size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="workload connections")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("no DSN: pass --dsn, set CUTOVER_SOURCE_DSN, or run `make up`")
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    result = bench(args.dsn, rates, args.duration, args.orders, args.seed, workers=args.workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
