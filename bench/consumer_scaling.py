"""Consumer scaling benchmark: 1, 2 and 4 appliers (``cutover apply`` processes of one consumer
group) draining the same backlog from domain topics of 12 partitions; events/s and lag.

Runs against the stack the environment names (``make up``, or ``make up BROKERS=3``; addresses
from ``CUTOVER_*`` or ``.stack/env``). For each applier count, on a fresh scratch commerce
database and fresh topics (12 partitions per domain, removed afterwards):

1. ``--events`` realistic change events of the reference shop (the apply benchmark's generator)
   are produced FIRST, so every run drains the same backlog;
2. N ``cutover apply`` processes are started in one group; Kafka spreads the 36 domain partitions
   over them (``[kafka] apply_assignment``; ``--assignment range`` splits each topic among them);
3. the offsets the appliers store in commerce (in the same transaction as the rows) are polled:
   lag = events produced − events applied, sampled every ``--sample-s``; the rate is measured from
   the first applied event to the last (the group join is reported apart).

Prints JSON and a Markdown table; writes ``bench/results/consumer_scaling.json``.

What to expect, and why: the apply path is CPU-bound Python (decode, map, build SQL) plus the
commerce PostgreSQL. On a 2-core machine that also runs Kafka and both databases, a second
applier can at best use the second core; a fourth adds only context switches and more
concurrent PostgreSQL transactions, so events/s stays flat or drops. On a machine with a core (or
a host) per applier and a database that has cores to spare, throughput grows close to linearly
with appliers up to the partition count (12 here), because partitions are independent: no lock
or ordering is shared between them, only the database's capacity.

    .venv/bin/python -m bench.consumer_scaling                 # 200,000 events per run
    .venv/bin/python -m bench.consumer_scaling --events 50000  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

from bench.apply_throughput import Synthetic  # noqa: E402
from cutover import logging as cutover_logging  # noqa: E402
from devtools.apply_support import (  # noqa: E402
    EXAMPLES,
    EventFactory,
    cli_env,
    delete_topics,
    init_control,
    make_topics,
    produce,
    publish_schemas,
    start_apply,
    stop_apply,
    total_offsets,
    write_config,
)
from devtools.scratch import scratch_database  # noqa: E402
from devtools.stack import read_env  # noqa: E402

PARTITIONS = 12


def run(
    env: dict[str, str],
    appliers: int,
    events: int,
    sample_s: float,
    assignment: str = "cooperative-sticky",
) -> dict[str, Any]:
    """One drain of ``events`` by ``appliers`` processes; rate, lag samples, group join time,
    and the events each applier applied (its ``apply.stopping`` log line)."""
    bootstrap = env["CUTOVER_KAFKA_BOOTSTRAP"]
    for dsn in scratch_database(env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "bench"):
        init_control(dsn)
        topics = make_topics(bootstrap, partitions=PARTITIONS)
        procs = []
        try:
            gen = Synthetic(EventFactory(topics.prefix, topics.partitions))
            publish_schemas(topics, gen.f)
            produced = produce(bootstrap, gen.messages(events))
            with tempfile.TemporaryDirectory() as tmp:
                group = f"bench-scaling-{appliers}"
                config = write_config(
                    Path(tmp),
                    topics,
                    group=group,
                    consumer={},
                    kafka={"apply_assignment": assignment},
                )
                env_cli = cli_env(dsn, bootstrap)
                started = time.monotonic()
                logs = [Path(tmp) / f"apply-{i}.log" for i in range(appliers)]
                procs = [start_apply(config, env_cli, log=log) for log in logs]
                result = _drain(dsn, group, produced, procs, started=started, sample_s=sample_s)
                for proc in procs:
                    stop_apply(proc)
                result["assignment"] = assignment
                result["events_per_applier"] = [_applied_by(log) for log in logs]
                return result
        finally:
            for proc in procs:
                stop_apply(proc)
            delete_topics(topics)
    raise AssertionError("unreachable")


def _applied_by(log: Path) -> int:
    events = 0
    for line in log.read_text().splitlines():
        if '"apply.stopping"' in line:
            events = int(json.loads(line).get("events", 0))
    return events


def _drain(
    dsn: str, group: str, produced: int, procs: list[Any], *, started: float, sample_s: float
) -> dict[str, Any]:
    samples: list[tuple[float, int]] = []  # (seconds since the first applied event, lag)
    first: tuple[float, int] | None = None
    while (done := total_offsets(dsn, group)) < produced:
        now = time.monotonic()
        if first is None and done > 0:
            first = (now, done)
        if first is not None and (not samples or now - first[0] - samples[-1][0] >= sample_s):
            samples.append((round(now - first[0], 1), produced - done))
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a cutover apply process exited (see its log)")
        time.sleep(0.2)
    end = time.monotonic()
    assert first is not None
    return {
        "appliers": len(procs),
        "partitions": PARTITIONS * 3,
        "events": produced,
        "group_join_s": round(first[0] - started, 1),
        "drain_s": round(end - first[0], 1),
        "events_per_s": round((produced - first[1]) / (end - first[0])),
        "max_lag": produced - first[1],
        "lag_samples": samples,
    }


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    base = runs[0]["events_per_s"]
    lines = [
        f"{result['machine']['cpus']} CPUs; {runs[0]['events']:,}-event backlog on "
        f"{runs[0]['partitions']} partitions (12 per domain topic)",
        "",
        "| appliers | events/s | speed-up | drain s | lag at 25 % / 50 % / 75 % of the drain |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        lags = [_lag_at(r, f) for f in (0.25, 0.5, 0.75)]
        lines.append(
            f"| {r['appliers']} | {r['events_per_s']:,} | {r['events_per_s'] / base:.2f}x "
            f"| {r['drain_s']} | {' / '.join(f'{lag:,}' for lag in lags)} |"
        )
    return "\n".join(lines)


def _lag_at(run: dict[str, Any], fraction: float) -> int:
    at = run["drain_s"] * fraction
    lags = [lag for t, lag in run["lag_samples"] if t <= at]
    return int(lags[-1] if lags else run["max_lag"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--appliers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sample-s", type=float, default=1.0)
    parser.add_argument(
        "--assignment", choices=("cooperative-sticky", "range"), default="cooperative-sticky",
        help="the appliers' [kafka] apply_assignment",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "consumer_scaling.json"
    )
    args = parser.parse_args()
    cutover_logging.configure(level="warning", json=True)
    env = read_env(REPO / ".stack", os.environ)
    if "CUTOVER_TARGET_DSN" not in env or "CUTOVER_KAFKA_BOOTSTRAP" not in env:
        raise SystemExit("no local stack: run `make up` first")
    result: dict[str, Any] = {
        "benchmark": "consumer_scaling",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "brokers": len(env["CUTOVER_KAFKA_BOOTSTRAP"].split(",")),
        "runs": [run(env, n, args.events, args.sample_s, args.assignment) for n in args.appliers],
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
