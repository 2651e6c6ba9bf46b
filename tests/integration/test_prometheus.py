"""The ops files against what really runs: a real `cutover produce` and `cutover apply` (metrics
on, port 0) carry a small workload and one poison message; their /metrics must hold every metric
that the Grafana dashboard and the alert rules name; a real Prometheus (Debian's package, started
by devtools.prometheus_stack in a private folder) discovers both from target files, scrapes them,
and loads the rules.

One pipeline for the whole module (set up once, ~30 s on a quiet machine).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from devtools import prometheus_stack
from devtools.harness import Scenario, init, open_scenario, stop
from devtools.scratch import scratch_database
from devtools.workload import prefill, run_workload
from tests.integration.conftest import EXAMPLES, REPO, skip_or_fail

pytestmark = pytest.mark.integration

OPS = REPO / "ops"
# Only exported while something is wrong (a table's capture blocked): declared, never sampled here.
ONLY_WHEN_BROKEN = {"cutover_capture_blocked"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


@dataclass
class Pipeline:
    scenario: Scenario
    ports: dict[str, int]  # job -> metrics port


def _wait_for(what: str, done: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.5)


def _logged_port(log: Path) -> int | None:
    """The port a process logged as it started serving /metrics (``metrics.serving``)."""
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        if line.startswith("{") and (event := json.loads(line)).get("event") == "metrics.serving":
            return int(event["port"])
    return None


def _has_port(log: Path) -> bool:
    return _logged_port(log) is not None


def _scrape(port: int) -> str:
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _exported(text: str) -> tuple[set[str], set[str]]:
    """(names declared, names with at least one sample) in an exposition, as PromQL sees them."""
    declared: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared |= {family.name + s for s in _SUFFIXES.get(family.type, ("",))}
        sampled |= {sample.name for sample in family.samples}
    return declared | sampled, sampled


def _expressions() -> list[str]:
    """Every PromQL expression of the dashboard (its targets) and of the alert rules."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            exprs.extend(v for k, v in node.items() if k == "expr" and isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads((OPS / "grafana-dashboard.json").read_text()))
    rules = (OPS / "prometheus-alerts.yml").read_text()
    # `expr: ...` on one line, or a folded block (`>-`) of deeper-indented lines.
    for one_line, block in re.findall(r"expr: (?:>-\n((?:\s{10,}\S.*\n)+)|(.+)\n)", rules):
        exprs.append(block or one_line)
    return exprs


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:cutover|process)_[a-z_]+\b", expr))


def _poison(scenario: Scenario) -> str:
    """Not Avro at all, on a domain topic: the applier dead-letters it (DecodeError)."""
    topic = scenario.topics()[0]
    producer = Producer({"bootstrap.servers": scenario.bootstrap})
    producer.produce(topic, value=b"not avro at all", key=b"1", partition=0)
    assert producer.flush(30) == 0
    return topic.rsplit(".", 1)[1]


@pytest.fixture(scope="module")
def pipeline(
    source_dsn: str, target_dsn: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("prometheus")
    with contextlib.ExitStack() as dbs:
        legacy = dbs.enter_context(contextmanager(scratch_database)(
            source_dsn, EXAMPLES / "legacy.sql", "legacy"))  # fmt: skip
        commerce = dbs.enter_context(contextmanager(scratch_database)(
            target_dsn, EXAMPLES / "commerce.sql", "commerce"))  # fmt: skip
        prefill(legacy, orders=50, seed=11)
        with open_scenario(legacy, commerce, kafka_bootstrap, tmp, partitions=2) as scenario:
            init(scenario)
            producer = scenario.start_produce("--metrics-port", "0")
            apply_log = tmp / "apply.log"
            with apply_log.open("ab") as log:
                applier = subprocess.Popen(
                    [sys.executable, "-m", "cli.entry", "--config", str(scenario.config),
                     "--log-json", "apply", "--metrics-port", "0"],
                    env=scenario.env(), stdout=log, stderr=log,
                )  # fmt: skip
            try:
                for path in (scenario.log_path, apply_log):
                    _wait_for(f"a metrics port in {path}", partial(_has_port, path))
                ports = {
                    "cutover-produce": _logged_port(scenario.log_path) or 0,
                    "cutover-apply": _logged_port(apply_log) or 0,
                }
                run_workload(legacy, rate=50, duration=2, seed=12)
                domain = _poison(scenario)
                dead = f'cutover_dead_letters_total{{domain="{domain}",error_class="DecodeError"}}'
                _wait_for(
                    "events applied, a heartbeat seen and the poison message dead-lettered",
                    lambda: all(
                        s in _scrape(ports["cutover-apply"])
                        for s in ("cutover_events_applied_total{", "cutover_heartbeat_age", dead)
                    ),
                    timeout=240,
                )
                yield Pipeline(scenario, ports)
            finally:
                codes = (stop(applier), stop(producer))
            assert codes == (0, 0)


def _both(pipeline: Pipeline) -> tuple[set[str], set[str]]:
    declared: set[str] = set()
    sampled: set[str] = set()
    for port in pipeline.ports.values():
        d, s = _exported(_scrape(port))
        declared |= d
        sampled |= s
    return declared, sampled


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(pipeline: Pipeline) -> None:
    exprs = _expressions()
    assert len(exprs) >= 20  # every panel's targets and every rule were found
    used = set().union(*map(_metric_names, exprs))
    assert {"cutover_dead_letters_total", "cutover_apply_latency_seconds_bucket"} <= used
    # Some are set periodically (lag once a second, slot lag per status round): poll a while.
    deadline = time.monotonic() + 60
    while used - (sampled := _both(pipeline)[1]) - ONLY_WHEN_BROKEN and time.monotonic() < deadline:
        time.sleep(0.5)
    declared, sampled = _both(pipeline)
    assert used - declared == set(), "named in ops/ but exported by neither process"
    assert used - sampled - ONLY_WHEN_BROKEN == set(), "exported but never given a value"


def test_a_real_prometheus_scrapes_both_processes_and_loads_the_rules(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    if shutil.which("prometheus") is None:
        skip_or_fail("prometheus missing: apt-get install prometheus")
    root = tmp_path / "stack"
    base = prometheus_stack.start(root)
    try:
        folder = prometheus_stack.targets_dir(root)
        for job, port in pipeline.ports.items():
            prometheus_stack.add_target(folder, job, pipeline.scenario.tag, port)

        def answers(promql: str) -> Callable[[], bool]:
            return lambda: bool(prometheus_stack.query(base, promql))

        _wait_for("both jobs up", answers('sum(up{job=~"cutover-(produce|apply)"}) == 2'), 90)
        assert prometheus_stack.query(base, 'up{job="cutover-apply"} == 1')
        applied = prometheus_stack.query(base, "sum(cutover_events_applied_total)")
        assert float(applied[0]["value"][1]) > 0  # type: ignore[index]
        _wait_for("the heartbeat age", answers("cutover_heartbeat_age_seconds < 60"), 60)

        with urlopen(f"{base}/api/v1/rules", timeout=10) as reply:
            groups = json.loads(reply.read())["data"]["groups"]
        alerts = {rule["name"] for group in groups for rule in group["rules"]}
        assert "CutoverApplyStalled" in alerts and len(alerts) == 10

        # A removed target file: Prometheus stops scraping it (no stale `up == 0`).
        prometheus_stack.remove_target(folder, "cutover-produce", pipeline.scenario.tag)
        _wait_for("the producer's target gone", lambda: not prometheus_stack.query(
            base, 'up{job="cutover-produce"}'), 60)  # fmt: skip
    finally:
        prometheus_stack.stop(root)
    assert not prometheus_stack.env(root)
