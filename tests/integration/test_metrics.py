"""The metrics endpoint of a running process, scraped over HTTP.

A small subprocess stands in for `cutover produce` / `cutover apply` (the lead wires the real
loops to cutover.metrics): it starts the server on a free port, records through the public API,
prints the port and waits. The test scrapes /metrics with urllib and reads the exposition.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import sys, time
    from cutover import metrics

    port = metrics.start_metrics_server(0, addr="127.0.0.1")
    now = int(time.time() * 1000)
    metrics.events_produced("payment", 120)
    metrics.events_produced("data", 7)
    metrics.delivery_failed()
    metrics.set_slot_lag(4096)
    metrics.batch_applied({"payment": 100, "data": 7}, [now - 50] * 107, now)
    metrics.dead_letter("payment", "UnmappableRow")
    metrics.heartbeat_seen("payment", now - 3000)
    metrics.set_apply_lag("shop.payment", 0, 42)
    print(port, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    """
)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_scrape_a_running_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert port > 0
        got = _scrape(port)
        assert got["cutover_events_produced_total{domain=payment}"] == 120
        assert got["cutover_events_produced_total{domain=data}"] == 7
        assert got["cutover_delivery_failures_total{}"] == 1
        assert got["cutover_slot_lag_bytes{}"] == 4096
        assert got["cutover_events_applied_total{domain=payment}"] == 100
        assert got["cutover_apply_batch_size_count{}"] == 1
        assert got["cutover_apply_batch_size_sum{}"] == 107
        assert got["cutover_apply_latency_seconds_count{}"] == 107
        assert got["cutover_apply_latency_seconds_bucket{le=0.05}"] == 107
        assert got["cutover_dead_letters_total{domain=payment,error_class=UnmappableRow}"] == 1
        assert got["cutover_apply_lag_messages{partition=0,topic=shop.payment}"] == 42
        assert 3 <= got["cutover_heartbeat_age_seconds{domain=payment}"] < 60
        assert got["process_resident_memory_bytes{}"] > 0
        # The age is computed at scrape time: it grows while no heartbeat arrives.
        time.sleep(1.1)
        later = _scrape(port)["cutover_heartbeat_age_seconds{domain=payment}"]
        assert later >= got["cutover_heartbeat_age_seconds{domain=payment}"] + 1
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
