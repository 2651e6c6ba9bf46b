"""Benchmark: the write-unavailability window of ``switch-writes`` / ``rollback-writes`` (issue 11).

With the workload writing through the router (``cutover workload --router``, here in-process) at
``--rate`` (500 tx/s), every domain is switched and rolled back ``--repeats`` times through the
CLI (``cutover switch-writes D --yes --json``, ``cutover rollback-writes D --yes --json``; their
JSON carries the measured window as ``window_ms``). Reported per domain and direction: p50/p99
of the window; for the workload: transactions, achieved rate, fence refusals and retries, the
longest a transaction waited; and the oracle check that no write was lost.

The oracle: before the run, legacy's shop tables are copied into a scratch database; afterwards
the same plan prefix (same seed, same number of transactions) runs there with the plain
workload. After the last rollback every write is on legacy (the reverse stream drained) and the
forward pipeline carries it to commerce, so legacy and commerce, mapped, must both equal the
oracle mapped (``copy_mapped_rows``), table by table, bookkeeping columns left out.

Needs a running deployment described by ``--config`` (default: as the CLI, ``$CUTOVER_CONFIG``
or ./cutover.toml): forward and reverse pipelines up, every domain in ``reads_switched`` and the
write gates passable (``[gates] min_reads_soak_minutes = 0``). Not part of ``make bench``::

    .venv/bin/python -m bench.write_window --config cutover.toml [--repeats 10] [--rate 500]

Prints JSON and a Markdown table; writes ``bench/results/write_window.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from control.verify import copy_mapped_rows  # noqa: E402
from cutover.config import Settings, environ_snapshot, load_settings  # noqa: E402
from cutover.control_store import load_states  # noqa: E402
from cutover.errors import CutoverError  # noqa: E402
from cutover.mapping import MappingSpec, load_mapping  # noqa: E402
from cutover.routing import ReadRouter  # noqa: E402
from devtools import workload  # noqa: E402
from devtools.scratch import scratch_database  # noqa: E402
from devtools.workload_router import run_routed_workload  # noqa: E402

RESULTS = REPO / "bench" / "results" / "write_window.json"
EXAMPLES = REPO / "examples" / "shop"
COMMANDS = ("switch-writes", "rollback-writes")


class BenchError(Exception):
    """The bench cannot run (a missing command, a domain in the wrong state) or a step failed."""


def _cli(config: Path | None, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cfg = ["--config", str(config)] if config is not None else []
    return subprocess.run(
        [sys.executable, "-m", "cli.entry", *cfg, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    """The line of the output that says what went wrong (argparse: its ``error:`` line)."""
    lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
    return next((line for line in lines if "error:" in line), lines[-1])[:300]


def preflight(config: Path | None, settings: Settings, mapping: MappingSpec) -> None:
    """The write-switch commands exist, and every domain is in reads_switched."""
    for command in COMMANDS:
        done = _cli(config, command, "--help", timeout=60)
        if done.returncode != 0:
            raise BenchError(
                f"`cutover {command}` is not available in this checkout (exit "
                f"{done.returncode}: {_last_line(done)}). The write "
                "switch (issue 11) must be merged before this benchmark can run."
            )
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        states = load_states(conn, settings.target.control_schema)
    wrong = {
        d: states[d].effective()[0] if d in states else "unknown"
        for d in mapping.domains
        if d not in states or states[d].effective()[0] != "reads_switched"
    }
    if wrong:
        raise BenchError(
            f"every domain must be in reads_switched before the benchmark; found {wrong}"
        )


def find_window_ms(doc: Any) -> float | None:
    """``window_ms`` anywhere in the command's JSON (top level or nested)."""
    if isinstance(doc, dict):
        if isinstance(doc.get("window_ms"), int | float):
            return float(doc["window_ms"])
        for value in doc.values():
            found = find_window_ms(value)
            if found is not None:
                return found
    if isinstance(doc, list):
        for value in doc:
            found = find_window_ms(value)
            if found is not None:
                return found
    return None


def find_steps_ms(doc: Any) -> dict[str, float]:
    """``detail.steps_ms`` of the command's JSON: ms from the fence to the end of each step."""
    detail = doc.get("detail") if isinstance(doc, dict) else None
    steps = detail.get("steps_ms") if isinstance(detail, dict) else None
    if not isinstance(steps, dict):
        return {}
    return {str(k): float(v) for k, v in steps.items() if isinstance(v, int | float)}


def step_durations(steps_ms: dict[str, float]) -> dict[str, float]:
    """Each step's own share of the window: its end minus the previous step's end (the fence
    itself ends at 0, when ``fenced_at`` is taken)."""
    out: dict[str, float] = {}
    previous = 0.0
    for step, at in sorted(steps_ms.items(), key=lambda kv: kv[1]):
        out[step] = at - previous
        previous = at
    return out


def switch(config: Path | None, command: str, domain: str) -> tuple[float, dict[str, float]]:
    """Run one command; its window (ms) and each step's share of it (ms)."""
    done = _cli(config, command, domain, "--yes", "--json")
    if done.returncode != 0:
        raise BenchError(
            f"`cutover {command} {domain}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-500:]}"
        )
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        doc = None
    window = find_window_ms(doc)
    if window is None:
        raise BenchError(f"`cutover {command} {domain} --json` printed no window_ms")
    return window, step_durations(find_steps_ms(doc))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


# -- the oracle ------------------------------------------------------------------------------


def clone_shop(source_dsn: str, clone_dsn: str) -> None:
    """Copy legacy's shop rows into ``clone_dsn`` (loaded with legacy.sql)."""
    with psycopg.connect(source_dsn) as src, psycopg.connect(clone_dsn) as dst:
        for table in workload.TABLES:
            rel = sql.Identifier("shop", table)
            with (
                src.cursor().copy(sql.SQL("COPY {} TO STDOUT").format(rel)) as out,
                dst.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(rel)) as into,
            ):
                for chunk in out:
                    into.write(chunk)
        dst.commit()


def _rows(dsn: str, schema: str, table: str) -> set[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = %s AND column_name NOT IN ('_src_lsn', '_src_seq') "
                "ORDER BY ordinal_position",
                [schema, table],
            ).fetchall()
        ]
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in cols), sql.Identifier(schema, table)
        )
        return set(conn.execute(query).fetchall())


def differences(left: str, right: str, mapping: MappingSpec) -> dict[str, int]:
    """Rows in one commerce-shaped database and not the other, per table (0 everywhere: equal)."""
    out = {}
    for t in mapping.tables.values():
        a = _rows(left, mapping.target_schema, t.target_table)
        b = _rows(right, mapping.target_schema, t.target_table)
        out[t.target_table] = len(a ^ b)
    return out


@contextmanager
def _scratch(admin: str, ddl: str, prefix: str) -> Iterator[str]:
    gen = scratch_database(admin, EXAMPLES / ddl, prefix)
    try:
        yield next(gen)
    finally:
        next(gen, None)


def oracle_check(
    settings: Settings, mapping: MappingSpec, oracle: str, report: workload.WorkloadReport,
    *, seed: int, catch_up_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Run the plan prefix on the oracle; compare it (mapped) with commerce and legacy (mapped)."""
    workload.run_workload(oracle, rate=1e6, seed=seed, max_transactions=report.transactions)
    with (
        _scratch(settings.target.dsn, "commerce.sql", "bench_ww_expected") as expected,
        _scratch(settings.target.dsn, "commerce.sql", "bench_ww_legacy") as legacy_mapped,
    ):
        copy_mapped_rows(oracle, expected, mapping)
        copy_mapped_rows(settings.source.dsn, legacy_mapped, mapping)
        on_legacy = differences(legacy_mapped, expected, mapping)
        deadline = time.monotonic() + catch_up_s  # the forward pipeline may still be applying
        while True:
            on_commerce = differences(settings.target.dsn, expected, mapping)
            if not any(on_commerce.values()) or time.monotonic() > deadline:
                break
            time.sleep(2.0)
    return {
        "transactions": report.transactions,
        "rows_differing_legacy": on_legacy,
        "rows_differing_commerce": on_commerce,
        "lost": any(on_legacy.values()) or any(on_commerce.values()),
    }


# -- the run ---------------------------------------------------------------------------------


def bench(
    config: Path | None, *, rate: float, repeats: int, settle_s: float, seed: int,
    catch_up_s: float,
) -> dict[str, Any]:  # fmt: skip
    settings = load_settings(config, environ_snapshot())
    mapping = load_mapping(settings.mapping_path)
    domains = list(mapping.domains)
    preflight(config, settings, mapping)
    windows: dict[str, dict[str, list[float]]] = {d: {c: [] for c in COMMANDS} for d in domains}
    steps: dict[str, dict[str, list[dict[str, float]]]] = {
        d: {c: [] for c in COMMANDS} for d in domains
    }
    with _scratch(settings.source.dsn, "legacy.sql", f"bench_ww_{uuid.uuid4().hex[:6]}") as oracle:
        clone_shop(settings.source.dsn, oracle)
        router = ReadRouter(settings, domains).start()
        stop = threading.Event()
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["report"] = run_routed_workload(
                    router, settings.source.dsn, settings.target.dsn, mapping, rate=rate,
                    duration=24 * 3600.0, seed=seed, stop=stop.is_set,
                )  # fmt: skip
            except BaseException as exc:  # reported below
                result["error"] = exc

        thread = threading.Thread(target=run, name="workload", daemon=True)
        thread.start()
        try:
            time.sleep(settle_s)
            for i in range(repeats):
                for domain in domains:
                    for command in COMMANDS:
                        if "error" in result:
                            raise BenchError(f"the workload failed: {result['error']}")
                        ms, shares = switch(config, command, domain)
                        windows[domain][command].append(ms)
                        steps[domain][command].append(shares)
                        parts = ", ".join(f"{k} {v:.0f}" for k, v in shares.items())
                        print(
                            f"[{i + 1}/{repeats}] {command} {domain}: {ms:.0f} ms ({parts})",
                            file=sys.stderr,
                        )
                        time.sleep(settle_s)
        finally:
            stop.set()
            thread.join(timeout=120)
            router.close()
        if "error" in result:
            raise BenchError(f"the workload failed: {result['error']}")
        report: workload.WorkloadReport = result["report"]
        oracle_result = oracle_check(
            settings, mapping, oracle, report, seed=seed, catch_up_s=catch_up_s
        )
    result = _result(windows, report, oracle_result, rate=rate, repeats=repeats, seed=seed)
    for d, by_command in steps.items():
        for c, runs in by_command.items():
            result["domains"][d][c]["steps_ms"] = step_figures(runs)
    return result


def step_figures(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """p50/p99 of each step's share of the window over the runs, in the steps' order."""
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {
        name: {
            "p50_ms": percentile([r[name] for r in runs if name in r], 50),
            "p99_ms": percentile([r[name] for r in runs if name in r], 99),
        }
        for name in names
    }


def _result(
    windows: dict[str, dict[str, list[float]]], report: workload.WorkloadReport,
    oracle: dict[str, Any], *, rate: float, repeats: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    per_domain: dict[str, dict[str, dict[str, Any]]] = {
        d: {
            c: {
                "p50_ms": percentile(v, 50),
                "p99_ms": percentile(v, 99),
                "max_ms": max(v, default=None),
                "windows_ms": v,
            }
            for c, v in by_command.items()
        }
        for d, by_command in windows.items()
    }

    def worst(command: str) -> float | None:
        values = [percentile(windows[d][command], 99) for d in windows]
        return max((v for v in values if v is not None), default=None)

    routed = report.to_dict().get("router", {})
    return {
        "benchmark": "write_window",
        "rate_asked": rate,
        "repeats": repeats,
        "seed": seed,
        "summary": {
            "switch_p99_ms": worst("switch-writes"),
            "rollback_p99_ms": worst("rollback-writes"),
            "target_p99_ms": 2000,
        },
        "domains": per_domain,
        "workload": {
            "transactions": report.transactions,
            "achieved_tx_s": round(report.achieved_rate, 1),
            "retries": routed.get("retries"),
            "refused_transactions": routed.get("refused_transactions"),
            "max_retry_wait_s": routed.get("max_retry_wait_s"),
            "written": routed.get("written"),
        },
        "oracle": oracle,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| domain | command | p50 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|",
    ]
    for domain, by_command in result["domains"].items():
        for command, figures in by_command.items():
            cells = [figures[k] for k in ("p50_ms", "p99_ms", "max_ms")]
            text = " | ".join("–" if v is None else f"{v:,.0f}" for v in cells)
            lines.append(f"| {domain} | {command} | {text} |")
    lines += ["", "Each step's share of the window (p50 / p99 ms):", ""]
    for domain, by_command in result["domains"].items():
        for command, figures in by_command.items():
            shares = figures.get("steps_ms") or {}
            text = ", ".join(
                f"{name} {f['p50_ms'] or 0:,.0f} / {f['p99_ms'] or 0:,.0f}"
                for name, f in shares.items()
            )
            lines.append(f"* {domain} {command}: {text or '–'}")
    wl, oracle = result["workload"], result["oracle"]
    lines += [
        "",
        f"Workload: {wl['transactions']:,} transactions at {wl['achieved_tx_s']:,.1f} tx/s "
        f"(asked {result['rate_asked']:,.0f}); {wl['refused_transactions']} refused by a fence, "
        f"{wl['retries']} retries, longest wait {wl['max_retry_wait_s']} s.",
        f"Oracle: {'WRITES LOST OR CHANGED' if oracle['lost'] else 'no write lost'} "
        f"(legacy {sum(oracle['rows_differing_legacy'].values())}, commerce "
        f"{sum(oracle['rows_differing_commerce'].values())} rows differing).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", type=Path, default=None, help="the deployment's config file")
    parser.add_argument("--rate", type=float, default=500.0, help="workload tx/s (default 500)")
    parser.add_argument("--repeats", type=int, default=10, help="switches per domain (10)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between commands (5)")
    parser.add_argument("--catch-up", type=float, default=120.0, help="seconds for commerce to "
                        "catch up before the oracle check (120)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        result = bench(
            args.config, rate=args.rate, repeats=args.repeats, settle_s=args.settle,
            seed=args.seed, catch_up_s=args.catch_up,
        )  # fmt: skip
    except (BenchError, CutoverError) as exc:
        print(f"bench.write_window: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
    return 1 if result["oracle"]["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
