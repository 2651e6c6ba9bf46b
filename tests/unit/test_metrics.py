"""The metrics API: stable names, what each call records (no server, no services)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client import generate_latest

from cutover import metrics
from cutover.metrics import REGISTRY

DOCS = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"
OPS = Path(__file__).resolve().parents[2] / "ops"


def value(name: str, **labels: str) -> float:
    got = REGISTRY.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_counters_and_histograms() -> None:
    before = value("cutover_events_produced_total", domain="payment")
    metrics.events_produced("payment", 5)
    metrics.events_produced("payment")
    assert value("cutover_events_produced_total", domain="payment") == before + 6

    failures = value("cutover_delivery_failures_total")
    metrics.delivery_failed()
    assert value("cutover_delivery_failures_total") == failures + 1

    applied = value("cutover_events_applied_total", domain="data")
    batches = value("cutover_apply_batch_size_count")
    latency = value("cutover_apply_latency_seconds_count")
    commits = value("cutover_apply_commits_total")
    now = int(time.time() * 1000)
    metrics.batch_applied({"data": 3, "payment": 0}, [now - 200, now - 100, now], now)
    assert value("cutover_events_applied_total", domain="data") == applied + 3
    assert value("cutover_apply_batch_size_count") == batches + 1
    assert value("cutover_apply_latency_seconds_count") == latency + 3
    assert value("cutover_apply_commits_total") == commits + 1
    # 0.2 s falls into the 0.25 bucket and not the 0.1 one
    le_01 = value("cutover_apply_latency_seconds_bucket", le="0.1")
    le_025 = value("cutover_apply_latency_seconds_bucket", le="0.25")
    assert le_025 - le_01 >= 1

    letters = value("cutover_dead_letters_total", domain="unknown", error_class="DecodeError")
    metrics.dead_letter(None, "DecodeError")
    assert (
        value("cutover_dead_letters_total", domain="unknown", error_class="DecodeError")
        == letters + 1
    )


def test_gauges() -> None:
    metrics.set_slot_lag(12345)
    assert value("cutover_slot_lag_bytes") == 12345
    metrics.slot_advanced(0x16B3748)
    assert value("cutover_slot_advanced_lsn") == 0x16B3748
    metrics.set_apply_lag("shop.payment", 2, 17)
    assert value("cutover_apply_lag_messages", topic="shop.payment", partition="2") == 17
    # A revoked partition's lag is gone (not frozen at its last value), and dropping twice is fine.
    metrics.drop_apply_lag("shop.payment", 2)
    metrics.drop_apply_lag("shop.payment", 2)
    assert (
        REGISTRY.get_sample_value(
            "cutover_apply_lag_messages", {"topic": "shop.payment", "partition": "2"}
        )
        is None
    )
    metrics.heartbeat_seen("merchant", int(time.time() * 1000) - 5000)
    age = value("cutover_heartbeat_age_seconds", domain="merchant")
    assert 4.5 < age < 30
    metrics.heartbeat_seen("merchant", int(time.time() * 1000) - 60_000)  # older: ignored
    assert value("cutover_heartbeat_age_seconds", domain="merchant") < 30
    metrics.heartbeat_seen("merchant", int(time.time() * 1000))
    assert value("cutover_heartbeat_age_seconds", domain="merchant") < 2


def test_every_metric_is_documented_and_used_by_ops() -> None:
    exposed = generate_latest(REGISTRY).decode()
    # Counters also expose a <name>_created series of their own; not part of the contract.
    names = {
        n
        for n in re.findall(r"^# TYPE (cutover_\w+) ", exposed, re.M)
        if not n.endswith("_created")
    }
    assert "cutover_apply_latency_seconds" in names and "cutover_slot_lag_bytes" in names
    docs = DOCS.read_text()
    for name in names:
        # Counters are typed under their _total name by this client version.
        assert name in docs, f"{name} is not in docs/OPERATIONS.md"
    rules = (OPS / "prometheus-alerts.yml").read_text()
    dashboard = (OPS / "grafana-dashboard.json").read_text()
    for used in re.findall(r"cutover_\w+", rules + dashboard):
        base = re.sub(r"_(bucket|sum|count)$", "", used)
        assert base in names, f"ops/ uses {used}, which no metric provides"
