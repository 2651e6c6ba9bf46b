"""What the Confluent wire format costs the producer: events/s with the schema registry on vs off.

Run with the local stack and its registry up (``make up REGISTRY=1``)::

    .venv/bin/python -m bench.registry_overhead [--changes 100000] [--rounds 2]

Each round writes the same backlog (orders of 8 lines and an update: 10 changes per source
transaction, as in ``bench/producer_throughput.py``) into two fresh scratch databases and drains
each with ``cutover produce --exit-when-idle``: once single-object encoded, once Confluent-framed
with every writer schema registered in the registry (``CUTOVER_SCHEMA_REGISTRY_URL``). The
rounds alternate the order (off/on, then on/off) so that the machine's drift hits both alike;
the best events/s of each mode is compared. Prints JSON and a short Markdown table; writes
``bench/results/registry_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def drain(scenario: Scenario, extra_env: dict[str, str]) -> dict[str, Any]:
    result = scenario.cli(
        "produce", "--exit-when-idle", "--no-initial-snapshot", "--json",
        extra_env=extra_env, timeout=3600,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"produce failed ({result.returncode}): {result.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
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
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
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
    cost = round(100.0 * (best["off"] - best["on"]) / best["off"], 1)
    doc = {
        "benchmark": "registry_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "changes_per_run": args.changes,
        "runs": runs,
        "best_events_per_s": best,
        "cost_percent": cost,
        "target_percent": 5.0,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print("\n| producer (backlog drain) | events/s (best) |\n|---|---|")
    print(f"| single-object (registry off) | {best['off']} |")
    print(f"| Confluent wire format (registry on) | {best['on']} |")
    print(f"| cost | {cost} % (target < 5 %) |")
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
