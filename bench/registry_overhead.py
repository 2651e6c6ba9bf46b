"""What the Confluent wire format costs: events/s with the schema registry on vs off, for the
producer alone and end to end (old DB to commerce: producer and appliers).

Run with the local stack and its registry up (``make up REGISTRY=1``)::

    .venv/bin/python -m bench.registry_overhead [--changes 100000] [--e2e-changes 50000]
        [--rounds 2]

Each round writes the same backlog (orders of 8 lines and an update: 10 changes per source
transaction, as in ``bench/producer_throughput.py``) into fresh scratch databases, once per mode:
single-object encoded (registry off) and Confluent-framed with every writer schema registered in
the registry (``CUTOVER_SCHEMA_REGISTRY_URL``, on). The rounds alternate the order (off/on, then
on/off) so that the machine's drift hits both modes alike.

* **producer**: ``cutover produce --exit-when-idle`` drains the backlog alone. Events/s (wall
  clock of the producer's run, best and median of the rounds) and the producer process's CPU
  time per event (user + system, median).
* **end to end** (``--e2e-changes``, 0 skips it): two ``cutover apply`` processes start with the
  producer (both given the registry URL in the "on" mode); from their start until the appliers
  stored offsets up to every partition's end: change events/s (median) and the CPU time of the
  producer and both appliers per event (median).

On a shared machine the wall clock mostly measures the neighbours (one mode's runs varied 2x
here), so the cost is best read from the CPU time per event; both are printed. Prints JSON and a
short Markdown table; writes ``bench/results/registry_overhead.json``.

``--encoder-only`` times the hot path alone, in this process (no stack): the compiled encoder
with the 10-byte single-object header vs the 5-byte Confluent one, on a products change event.
The process-level CPU figures also hold fixed costs of the registry mode: importing the registry
client (httpx, authlib, ...) and one registration round trip per writer schema at start, and
in the appliers one schema lookup per registry id.
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

from bench.e2e_throughput import EXAMPLES, _start, _wait_applied  # noqa: E402
from bench.producer_throughput import pipeline, stack_env, write_backlog  # noqa: E402
from devtools.harness import Scenario, stop  # noqa: E402
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


def e2e_run(env: dict[str, str], workdir: Path, changes: int, registry: bool) -> dict[str, Any]:
    """The backlog drained end to end: the producer and two appliers, started together."""
    extra = {ENV_VAR: env[ENV_VAR]} if registry else {}
    with pipeline(env, workdir, target_ddl=EXAMPLES / "commerce.sql") as scenario:
        write_backlog(scenario.source_dsn, changes)
        cpu_before = _children_cpu_s()
        started = time.monotonic()
        appliers = [_start(scenario, f"apply-{i}", "apply", extra_env=extra) for i in range(2)]
        try:
            report = drain(scenario, extra)
            applied_at = _wait_applied(scenario, 1800)
        finally:
            codes = [stop(a) for a in appliers]
        if any(codes):
            raise SystemExit(f"an applier failed ({codes}): see {scenario.workdir}/apply-*.log")
        cpu_s = _children_cpu_s() - cpu_before  # the producer and both appliers
    elapsed = applied_at - started
    return {
        "registry": registry,
        "events": report["events"],
        "end_to_end_s": round(elapsed, 2),
        "events_per_s": round(report["events"] / elapsed),
        "cpu_us_per_event": round(1e6 * cpu_s / max(1, report["events"]), 1),
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


def _median(runs: list[dict[str, Any]], key: str, on: bool) -> float:
    return float(statistics.median(r[key] for r in runs if r["registry"] is on))


def _cost(off: float, on: float, higher_is_better: bool) -> float:
    return round(100.0 * ((off - on) if higher_is_better else (on - off)) / off, 1)


def summarize(runs: list[dict[str, Any]], best: bool) -> dict[str, Any]:
    """Medians per mode (and the best events/s with ``best``); the costs in percent."""
    modes = (("off", False), ("on", True))
    rate = {m: _median(runs, "events_per_s", on) for m, on in modes}
    cpu = {m: _median(runs, "cpu_us_per_event", on) for m, on in modes}
    out: dict[str, Any] = {
        "runs": runs,
        "median_events_per_s": rate,
        "median_cpu_us_per_event": cpu,
        "cost_percent": _cost(cpu["off"], cpu["on"], higher_is_better=False),
        "wall_cost_percent": _cost(rate["off"], rate["on"], higher_is_better=True),
    }
    if best:
        top = {m: max(r["events_per_s"] for r in runs if r["registry"] is on) for m, on in modes}
        out["best_events_per_s"] = top
        out["best_wall_cost_percent"] = _cost(top["off"], top["on"], higher_is_better=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--e2e-changes", type=int, default=50_000)
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
    e2e: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(args.rounds):
            order = (False, True) if round_no % 2 == 0 else (True, False)
            for registry in order:
                runs.append(one_run(env, Path(tmp), args.changes, registry))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            for registry in order if args.e2e_changes > 0 else ():
                e2e.append(e2e_run(env, Path(tmp), args.e2e_changes, registry))
                print(json.dumps({"e2e": e2e[-1]}), file=sys.stderr, flush=True)
    doc = {
        "benchmark": "registry_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "changes_per_run": args.changes,
        "e2e_changes_per_run": args.e2e_changes,
        "producer": summarize(runs, best=True),
        "end_to_end": summarize(e2e, best=False) if e2e else None,
        "encoder_us_per_event": encoder,
        "target_percent": 5.0,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "| registry off → on | events/s (median) | CPU µs/event (median) | cost: wall / CPU |",
        "|---|---|---|---|",
    ]
    for name, key in (("producer (backlog drain)", "producer"), ("end to end", "end_to_end")):
        s = doc[key]
        if s is None:
            continue
        rate, cpu = s["median_events_per_s"], s["median_cpu_us_per_event"]
        lines.append(
            f"| {name} | {rate['off']:,.0f} → {rate['on']:,.0f} | {cpu['off']} → {cpu['on']} "
            f"| {s['wall_cost_percent']} % / {s['cost_percent']} % (target < 5 %) |"
        )
    enc = doc["encoder_us_per_event"]
    lines.append(f"\nencoder alone (µs/event, best): off {enc['off']}, on {enc['on']}")
    return "\n".join(lines)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
