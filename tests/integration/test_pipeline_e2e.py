"""The whole pipeline on the real stack: legacy → `cutover produce` → Kafka → two `cutover apply`
→ commerce, while the workload writes; then an independent comparison and `cutover verify`."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from devtools.harness import Scenario, changes, init, open_scenario, stop
from devtools.ports import free_port
from devtools.workload import prefill, run_workload
from tests.integration.shop_compare import assert_commerce_matches_legacy, compare

CANARY = "canary-social-7f3a91"


def _start_apply(scenario: Scenario, name: str, port: int) -> subprocess.Popen[bytes]:
    log = (scenario.workdir / f"apply-{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cli.entry", "--config", str(scenario.config), "--log-json",
         "apply", "--metrics-port", str(port)],
        env=scenario.env(), stdout=log, stderr=log,
    )  # fmt: skip


def _scrape(port: int, metric: str) -> float:
    """Sum of every sample of ``metric`` on the process's /metrics endpoint (it must be there)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    pattern = re.compile(rf"^{metric}(?:{{[^}}]*}})? ([-0-9.e+]+)$", re.MULTILINE)
    values = pattern.findall(text)
    assert values, f"{metric} is not served on port {port}"
    return sum(float(value) for value in values)


def _scrape_until(port: int, metric: str, done: Callable[[float], bool], timeout: float) -> float:
    """Scrape ``metric`` until ``done(value)`` (or the timeout); the last value."""
    deadline = time.monotonic() + timeout
    value = _scrape(port, metric)
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.5)
        value = _scrape(port, metric)
    return value


def _wait_equal(legacy: str, commerce: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.ok for d in compare(legacy, commerce)):
            return
        time.sleep(1.0)
    assert_commerce_matches_legacy(legacy, commerce)  # fails with the differences


@pytest.mark.integration
def test_live_workload_reaches_commerce_exactly(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefill(fresh_legacy, orders=2_000, seed=3)
    with open_scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=3
    ) as scenario:
        init(scenario)
        ports = [free_port() for _ in range(3)]
        producer = scenario.start_produce("--metrics-port", str(ports[0]))
        appliers = [_start_apply(scenario, "a", ports[1]), _start_apply(scenario, "b", ports[2])]
        try:
            # Social canaries written while the pipeline runs must reach nothing downstream.
            with psycopg.connect(fresh_legacy, autocommit=True) as conn:
                conn.execute(
                    "UPDATE shop.users SET bio = %s, handle = handle || %s"
                    " WHERE id IN (SELECT id FROM shop.users ORDER BY id LIMIT 5)",
                    (CANARY, CANARY),
                )
            errors: list[BaseException] = []

            def traffic() -> None:
                try:
                    run_workload(fresh_legacy, rate=300, duration=6, seed=5)
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            writer = threading.Thread(target=traffic)
            writer.start()
            writer.join(timeout=120)
            assert not errors, errors
            _wait_equal(fresh_legacy, fresh_commerce, timeout=180)
            # The real processes serve their metrics while they run.
            # The producer counts the streamed change events Kafka acknowledged (not the
            # snapshot rows, not heartbeats): exactly the c/u/d events in the topics.
            streamed = sum(1 for e in changes(scenario.read()) if e.record["op"] != "r")
            produced = _scrape_until(
                ports[0], "cutover_events_produced_total", lambda v: v == streamed, 30
            )
            assert produced == streamed > 0
            applied = sum(_scrape(p, "cutover_events_applied_total") for p in ports[1:])
            assert applied >= produced  # applied counts heartbeats and the snapshot too
            # Caught up, the slot is advanced by every heartbeat: it holds back next to nothing.
            lag = _scrape_until(ports[0], "cutover_slot_lag_bytes", lambda v: 0 <= v < 2**20, 30)
            assert 0 <= lag < 2**20
            assert sum(_scrape(p, "cutover_apply_latency_seconds_count") for p in ports[1:]) > 0
        finally:
            codes = [stop(p) for p in appliers]
            produce_code = stop(producer)
        assert codes == [0, 0]
        assert produce_code == 0

        assert not any(CANARY.encode() in raw for raw in scenario.raw_values())
        with psycopg.connect(fresh_commerce) as conn:
            dump = conn.execute(
                "SELECT string_agg(c::text, '|') FROM commerce.customers c"
            ).fetchone()
        assert dump is not None and CANARY not in (dump[0] or "")

        verify = scenario.cli("verify", "--json")
        assert verify.returncode == 0, verify.stdout + verify.stderr
