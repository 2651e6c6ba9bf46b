"""Benchmark: ``cutover verify`` rows/s per side on consistent data (target >= 500,000 rows/s).

Creates a scratch legacy database (examples/shop/legacy.sql) and a scratch commerce database
(examples/shop/commerce.sql), prefills legacy with ``devtools.workload.prefill`` (150,000 orders
by default: about 960,000 rows over the seven tables), copies it into commerce through the
mapping's SQL (:func:`control.verify.copy_mapped_rows`: COPY out of legacy, COPY into
commerce, no Kafka), then runs a full verify ``--runs`` times. Both databases work in parallel;
"rows/s per side" is the legacy rows compared divided by the time of the comparison pass
(planning included; the lag-aware recheck has nothing to do on consistent data). Prints JSON and
a Markdown table and writes bench/results/verify.json. The scratch databases are dropped.

    .venv/bin/python -m bench.verify_throughput                 # uses .stack/env (make up)
    .venv/bin/python -m bench.verify_throughput --orders 50000 --runs 5

The DSNs come from $CUTOVER_SOURCE_DSN / $CUTOVER_TARGET_DSN, else .stack/env; both must be
allowed to CREATE DATABASE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo, sql

from control.verify import VerifyOptions, copy_mapped_rows, run_verify
from cutover.config import KafkaSettings, Settings, SourceSettings, TargetSettings
from cutover.mapping import load_mapping
from devtools.stack import read_env
from devtools.workload import prefill

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "shop"
RESULTS = REPO / "bench" / "results" / "verify.json"
TARGET_ROWS_S = 500_000


def _stack_env() -> dict[str, str]:
    return read_env(REPO / ".stack", os.environ)


def _with_dbname(dsn: str, dbname: str) -> str:
    params = conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def _create(admin: str, name: str, ddl: Path) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _with_dbname(admin, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl.read_text().encode())
    return dsn


def _drop(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def bench(source_admin: str, target_admin: str, orders: int, runs: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    legacy_db, commerce_db = f"bench_verify_legacy_{tag}", f"bench_verify_commerce_{tag}"
    try:
        legacy = _create(source_admin, legacy_db, EXAMPLES / "legacy.sql")
        commerce = _create(target_admin, commerce_db, EXAMPLES / "commerce.sql")
        mapping = load_mapping(EXAMPLES / "mapping.toml")
        filled = prefill(legacy, orders=orders, seed=1)
        t0 = time.monotonic()
        copied = copy_mapped_rows(legacy, commerce, mapping)
        copy_s = time.monotonic() - t0
        with psycopg.connect(commerce, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        with psycopg.connect(legacy, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        settings = Settings(
            source=SourceSettings(dsn=legacy),
            target=TargetSettings(dsn=commerce),
            kafka=KafkaSettings(topic_prefix=f"bench{tag}"),
            mapping_path=EXAMPLES / "mapping.toml",
        )
        results: list[dict[str, Any]] = []
        for _ in range(runs):
            report = run_verify(settings, mapping, actor="bench", options=VerifyOptions())
            if not report.passed:
                raise SystemExit(f"verify found differences on a copy: {report.mismatch_summary()}")
            results.append(
                {
                    "rows_per_side": report.legacy_rows,
                    "compare_s": round(report.first_pass_s, 3),
                    "elapsed_s": round(report.elapsed_s, 3),
                    "rows_per_s_per_side": round(report.rows_per_s()),
                    "tables": {
                        t.table: {
                            "rows": t.legacy_rows + t.absent_by_mapping,
                            "s": round(t.seconds, 3),
                        }
                        for t in report.tables
                    },
                }
            )
        with psycopg.connect(legacy) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        rates = [r["rows_per_s_per_side"] for r in results]
        return {
            "benchmark": "verify_throughput",
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "postgresql": row[0] if row else None,
            },
            "orders": orders,
            "legacy_rows": filled.total_rows,
            "commerce_rows": sum(copied.values()),
            "copy_mapped_s": round(copy_s, 3),
            "runs": results,
            "median_rows_per_s_per_side": round(statistics.median(rates)),
            "best_rows_per_s_per_side": max(rates),
            "target_rows_per_s_per_side": TARGET_ROWS_S,
            "meets_target": statistics.median(rates) >= TARGET_ROWS_S,
        }
    finally:
        _drop(source_admin, legacy_db)
        _drop(target_admin, commerce_db)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| run | rows per side | compare s | total s | rows/s per side |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(result["runs"], start=1):
        lines.append(
            f"| {i} | {r['rows_per_side']:,} | {r['compare_s']:.3f} | {r['elapsed_s']:.3f} | "
            f"{r['rows_per_s_per_side']:,} |"
        )
    verdict = "meets" if result["meets_target"] else "MISSES"
    lines.append("")
    lines.append(
        f"median {result['median_rows_per_s_per_side']:,} rows/s per side on "
        f"{result['machine']['cpus']} cores ({verdict} the {TARGET_ROWS_S:,} target)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=150_000, help="orders to prefill")
    parser.add_argument("--runs", type=int, default=3, help="verify runs (median reported)")
    args = parser.parse_args(argv)
    env = _stack_env()
    if "CUTOVER_SOURCE_DSN" not in env or "CUTOVER_TARGET_DSN" not in env:
        print("no DSNs: run `make up` or set CUTOVER_SOURCE_DSN and CUTOVER_TARGET_DSN")
        return 2
    result = bench(env["CUTOVER_SOURCE_DSN"], env["CUTOVER_TARGET_DSN"], args.orders, args.runs)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
