"""What the Confluent wire format costs the producer: events/s with the schema registry on vs off.

Run with the local stack and its registry up (``make up REGISTRY=1``)::

    .venv/bin/python -m bench.registry_overhead [--changes 100000] [--rounds 2]

Each round writes the same backlog (orders of 8 lines and an update: 10 changes per source
transaction, as in ``bench/producer_throughput.py``) into two fresh scratch databases and drains
each with ``cutover produce --exit-when-idle``: once single-object encoded, once Confluent-framed
with every writer schema registered in the registry (``CUTOVER_SCHEMA_REGISTRY_URL``). The
rounds alternate the order (off/on, then on/off) so that the machine's drift hits both alike.

Two figures per mode: events/s (wall clock of the producer's run, best of the rounds) and the
producer process's CPU time per event (user + system, median of the rounds). On a shared machine
the wall clock mostly measures the neighbours (one mode's runs varied 2x here), so the cost is
taken from the CPU time per event; both are printed. Prints JSON and a short Markdown table;
writes ``bench/results/registry_overhead.json``.

``--encoder-only`` times the hot path alone, in this process (no stack): the compiled encoder
with the 10-byte single-object header vs the 5-byte Confluent one, on a products change event.
The process-level CPU figure also holds fixed costs of the registry mode: importing the registry
client (httpx, authlib, ...) and one registration round trip per writer schema at start.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.producer_throughput import pipeline, stack_env, write_backlog  # noqa: E402
from devtools.harness import Scenario  # noqa: E402
from devtools.registry_stack import ENV_VAR  # noqa: E402

RESULTS = REPO / "bench" / "results" / "registry_overhead.json"


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def drain(scenario: Scenario, extra_env: dict[str, str]) -> dict[str, Any]:
    cpu_before = _children_cpu_s()
    result = scenario.cli(
        "produce", "--exit-when-idle", "--no-initial-snapshot", "--json",
        extra_env=extra_env, timeout=3600,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"produce failed ({result.returncode}): {result.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    report["cpu_s"] = _children_cpu_s() - cpu_before  # the produce process alone
    return report


def one_run(env: dict[str, str], workdir: Path, changes: int, registry: bool) -> dict[str, Any]:
    extra = {ENV_VAR: env[ENV_VAR]} if registry else {}
    with pipeline(env, workdir) as scenario:
        write_backlog(scenario.source_dsn, changes)
        report = drain(scenario, extra)
    return {
        "registry": registry,
        "events": report["events"],
        "produce_s": round(report["elapsed_s"], 2),
        "events_per_s": round(report["events"] / report["elapsed_s"]),
        "cpu_us_per_event": round(1e6 * report["cpu_s"] / max(1, report["events"]), 1),
    }


def encoder_cost(events: int = 100_000, rounds: int = 5) -> dict[str, float]:
    """Best µs per encoded event, single-object vs Confluent header (same compiled body)."""
    import dataclasses
    from datetime import UTC, datetime
    from decimal import Decimal

    from cutover import codec
    from producers.fast_avro import encoder_for

    spec = codec.ColumnSpec
    cols = [spec("id", 20, -1), spec("title", 25, -1), spec("price_idr", 1700, (14 << 16) + 6),
            spec("stock", 23, -1), spec("updated_at", 1184, -1)]  # fmt: skip
    writer = codec.writer_schema(codec.envelope_schema("shop", "products", cols))
    after = {"id": 1, "title": "Kopi", "price_idr": Decimal("12500.00"), "stock": 3,
             "updated_at": datetime(2026, 11, 29, tzinfo=UTC)}  # fmt: skip
    record: dict[str, Any] = {"before": None, "after": after, "op": "u", "ts_ms": 1,
              "transaction": None, "unchanged_toast": [],
              "source": {"version": "0", "connector": "c", "name": "n", "ts_ms": 1,
                         "snapshot": "false", "db": "d", "schema": "shop", "table": "products",
                         "txId": 1, "lsn": 1, "seq": 1}}  # fmt: skip
    encoders = {
        "off": encoder_for(writer),
        "on": encoder_for(dataclasses.replace(writer, header=codec.confluent_header(7))),
    }
    best = {mode: float("inf") for mode in encoders}
    for _ in range(rounds):
        for mode, encode in encoders.items():
            started = time.process_time()
            for _i in range(events):
                encode(record)
            best[mode] = min(best[mode], 1e6 * (time.process_time() - started) / events)
    return {mode: round(us, 2) for mode, us in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--encoder-only", action="store_true")
    args = parser.parse_args(argv)
    encoder = encoder_cost()
    print(json.dumps({"encoder_us_per_event": encoder}), file=sys.stderr, flush=True)
    if args.encoder_only:
        return 0
    env = stack_env()
    if ENV_VAR not in env:
        raise SystemExit(f"{ENV_VAR} is not set: run `make up REGISTRY=1` first")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            order = (False, True) if round_no % 2 == 0 else (True, False)
            for registry in order:
                runs.append(one_run(env, Path(tmp), args.changes, registry))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    best = {
        mode: max(r["events_per_s"] for r in runs if r["registry"] is on)
        for mode, on in (("off", False), ("on", True))
    }
    cpu = {
        mode: statistics.median(r["cpu_us_per_event"] for r in runs if r["registry"] is on)
        for mode, on in (("off", False), ("on", True))
    }
    cost = round(100.0 * (cpu["on"] - cpu["off"]) / cpu["off"], 1)
    wall_cost = round(100.0 * (best["off"] - best["on"]) / best["off"], 1)
    doc = {
        "benchmark": "registry_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "changes_per_run": args.changes,
        "runs": runs,
        "best_events_per_s": best,
        "median_cpu_us_per_event": cpu,
        "encoder_us_per_event": encoder,
        "cost_percent": cost,
        "wall_cost_percent": wall_cost,
        "target_percent": 5.0,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print("\n| producer (backlog drain) | events/s (best) | CPU µs/event (median) |")
    print("|---|---|---|")
    print(f"| single-object (registry off) | {best['off']} | {cpu['off']} |")
    print(f"| Confluent wire format (registry on) | {best['on']} | {cpu['on']} |")
    print(f"| cost | {wall_cost} % | {cost} % (target < 5 %) |")
    print(f"\nencoder alone (µs/event, best): off {encoder['off']}, on {encoder['on']}")
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
