"""Summarise bench/results/*.json into bench/results/summary.md: one table of the benchmark figures
against their targets, with the machine's description. `make bench` runs it last."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        pg = subprocess.run(
            ["/usr/lib/postgresql/15/bin/postgres", "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        pg = "PostgreSQL 15"
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {pg}, Apache Kafka 4.1.1 "
        "(KRaft, one node), everything on one machine"
    )


ROWS: list[tuple[str, str, tuple[str, ...], str, float | None, bool]] = [
    # (measure, file, path, unit, target, higher is better)
    ("end-to-end backlog, old DB → commerce DB", "e2e", ("backlog", "events_per_s_end_to_end"),
     "events/s", 20_000, True),
    ("initial snapshot into Kafka", "e2e", ("snapshot", "rows_per_s_into_kafka"), "rows/s",
     50_000, True),
    ("initial snapshot end to end", "e2e", ("snapshot", "rows_per_s_end_to_end"), "rows/s",
     None, True),
    ("producer: 1M-change backlog into Kafka", "producer", ("backlog", "events_per_s"),
     "events/s", 30_000, True),
    ("producer: streaming under full workload", "producer",
     ("streaming", "events_per_s_end_to_end"), "events/s", None, True),
    ("apply: 1M-event backlog, 1 process", "apply", ("backlog", "events_per_s"), "events/s",
     20_000, True),
    ("apply: 1M-event backlog, 2 processes", "apply", ("backlog_processes", "events_per_s"),
     "events/s", None, True),
    ("commit-to-applied p50, legacy COMMIT → commerce COMMIT (workload)", "cdc_latency",
     ("p50_ms",), "ms", None, False),
    ("commit-to-applied p99, legacy COMMIT → commerce COMMIT (workload)", "cdc_latency",
     ("p99_ms",), "ms", 250, False),
    ("CDC leg p50, legacy COMMIT → Kafka broker append (same run)", "cdc_latency",
     ("stages", "commit_to_broker_append", "p50_ms"), "ms", None, False),
    ("CDC leg p99, legacy COMMIT → Kafka broker append (same run)", "cdc_latency",
     ("stages", "commit_to_broker_append", "p99_ms"), "ms", None, False),
    ("apply leg only p50 (synthetic events in Kafka → commerce COMMIT) at 2,000 events/s",
     "apply", ("latency", "p50_ms"), "ms", None, False),
    ("apply leg only p99 (synthetic events in Kafka → commerce COMMIT) at 2,000 events/s",
     "apply", ("latency", "p99_ms"), "ms", 1000, False),
    ("verify, per side", "verify", ("median_rows_per_s_per_side",), "rows/s", 500_000, True),
    ("replay record", "replay", ("record", "events_per_s"), "events/s", 50_000, True),
    ("replay play to topic", "replay", ("play_to_topic", "events_per_s"), "events/s", 50_000,
     True),
    ("replay play to sandbox DB", "replay", ("play_to_target", "events_per_s"), "events/s",
     None, True),
    ("schema registry on: producer CPU per event, cost", "registry_overhead",
     ("producer", "cost_percent"), "%", 5, False),
    ("schema registry on: end-to-end CPU per event, cost", "registry_overhead",
     ("end_to_end", "cost_percent"), "%", 5, False),
    ("schema registry on: end-to-end events/s (median), cost", "registry_overhead",
     ("end_to_end", "wall_cost_percent"), "%", None, False),
    # bench/write_window.py: not in `make bench` (needs a deployment with the write switch).
    ("write window p99, switch-writes (worst domain)", "write_window",
     ("summary", "switch_p99_ms"), "ms", 2000, False),
    ("write window p99, rollback-writes (worst domain)", "write_window",
     ("summary", "rollback_p99_ms"), "ms", 2000, False),
    ("peak RSS producer, 1M-row transaction", "producer", ("big_transaction", "peak_rss_mb"),
     "MB", 300, False),
    ("peak RSS consumer, 1M-row transaction", "apply",
     ("big_transaction", "consumer_peak_rss_mb"), "MB", 300, False),
]  # fmt: skip


def table() -> str:
    lines = [
        f"Machine: {_machine()}.",
        "",
        "| measure | figure | target | met |",
        "|---|---:|---:|:-:|",
    ]
    for measure, name, path, unit, target, higher in ROWS:
        value = _get(_load(name), *path)
        if value is None:
            lines.append(f"| {measure} | not measured | – | – |")
            continue
        target_text = "–" if target is None else f"{'≥' if higher else '≤'} {target:,.0f} {unit}"
        met = "–" if target is None else ("yes" if (value >= target) == higher else "**no**")
        lines.append(f"| {measure} | {value:,.0f} {unit} | {target_text} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    text = table()
    (RESULTS / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
