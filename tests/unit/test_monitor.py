"""Monitor figures without services: lag as kafka-consumer-groups computes it, rate, latency
percentiles, the report and its JSON, and the rendering."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from cli.commands.monitor import _bytes, render
from control.monitor import (
    KafkaReading,
    OffsetsRow,
    SlotReading,
    SourceReading,
    TargetReading,
    apply_rate,
    build_report,
    group_lag,
    latency_samples,
    monitored_domains,
    percentile,
)
from cutover.config import KafkaSettings, Settings, SourceSettings, TargetSettings
from cutover.errors import MappingError

SETTINGS = Settings(
    source=SourceSettings(dsn="dbname=legacy"),
    target=TargetSettings(dsn="dbname=commerce"),
    kafka=KafkaSettings(topic_prefix="shop"),
    mapping_path=Path("mapping.toml"),
)
NOW = 1_700_000_000_000


def test_lag_is_end_minus_committed() -> None:
    assert group_lag(100, 40) == 60
    assert group_lag(100, 100) == 0
    assert group_lag(100, None) is None  # "-" in kafka-consumer-groups
    assert group_lag(100, -1001) is None  # OFFSET_INVALID
    assert group_lag(5, 9) == 0  # a commit past a truncated log end


def test_percentiles_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(reversed(values), 100) == 100.0


def test_apply_rate_from_two_readings() -> None:
    before = {("shop.payment", 0): 100, ("shop.payment", 1): 50, ("shop.data", 0): 7}
    after = {("shop.payment", 0): 300, ("shop.payment", 1): 50, ("shop.data", 0): 9,
             ("shop.payment", 2): 1000}  # fmt: skip
    assert apply_rate(before, after, 2.0, "shop.payment") == 100.0  # a new row has no delta
    assert apply_rate(before, after, 2.0, "shop.data") == 1.0
    assert apply_rate(None, after, 2.0, "shop.data") is None
    assert apply_rate(before, after, 0.0, "shop.data") is None


def _row(
    p: int, next_offset: int, ts: int | None, applied: int, hb: int | None = None
) -> OffsetsRow:
    return OffsetsRow("shop.payment", p, next_offset, ts, hb, applied)


def test_latency_samples_skip_idle_and_stale_partitions() -> None:
    rows = [
        _row(0, 10, NOW - 1_250, NOW - 1_000),  # applied 250 ms after its commit
        _row(1, 10, NOW - 2_500, NOW - 2_000),  # 500 ms
        _row(2, 10, NOW - 600_000, NOW - 500),  # only heartbeats lately: idle, no sample
        _row(3, 10, NOW - 200_000, NOW - 120_000),  # applied long ago
        _row(4, 10, None, NOW),  # heartbeats only, ever
    ]
    assert latency_samples(rows, NOW) == [0.25, 0.5]


def test_report_and_json() -> None:
    kafka = KafkaReading(
        ends={("shop.payment", 0): 100, ("shop.payment", 1): 80, ("shop.data", 0): 5},
        committed={("shop.payment", 0): 90, ("shop.payment", 1): None, ("shop.data", 0): 5},
        missing={"shop.merchant": "topic shop.merchant does not exist"},
    )
    target = TargetReading(
        offsets=[
            OffsetsRow("shop.payment", 0, 95, NOW - 300, NOW - 100, NOW - 100),
            OffsetsRow("shop.data", 0, 5, None, NOW - 4_000, NOW - 4_000),
        ],
        open_dead_letters={"payment": 2, "": 1},
        now_ms=NOW,
        truncates={"shop.invoices": 2},
    )
    source = SourceReading(
        SlotReading("cutover_slot", True, True, "0/16B3748", 4096, "reserved", None),
        heartbeat_age_s=1.5,
        delivered_lsn=0x16B3748,
        producer="host:1",
    )
    report = build_report(
        SETTINGS,
        ["payment", "data", "merchant"],
        kafka,
        target,
        source,
        previous_applied={("shop.payment", 0): 45},
        seconds_since_previous=2.0,
        dlq_end_offset=3,
        taken_at=datetime(2025, 1, 1, tzinfo=UTC),
    )
    payment, data, merchant = report.topics
    assert [p.lag for p in payment.partitions] == [10, None]
    assert payment.lag == 10 and payment.end_offset == 180
    assert [p.applied_lag for p in payment.partitions] == [5, None]
    assert payment.apply_rate == 25.0
    assert payment.latency_p50_s == pytest.approx(0.2)
    assert payment.dead_letters_open == 2
    assert data.lag == 0 and data.heartbeat_applied_age_s == 4.0 and data.latency_samples == 0
    assert merchant.error == "topic shop.merchant does not exist" and merchant.partitions == []
    doc = report.as_json()
    assert doc["producer"] == {"heartbeat_age_s": 1.5, "delivered_lsn": "0/16B3748"}
    assert doc["slot"]["lag_bytes"] == 4096 and doc["slot"]["wal_status"] == "reserved"
    assert doc["dead_letters"] == {"open_total": 3, "open_by_domain": {"payment": 2, "": 1},
                                   "dlq_topic": "shop.dlq", "dlq_end_offset": 3}  # fmt: skip
    assert doc["topics"][0]["partitions"][1] == {
        "partition": 1, "end_offset": 80, "committed_offset": None, "lag": None,
        "applied_offset": None, "applied_lag": None,
    }  # fmt: skip
    console = Console(record=True, width=160)
    console.print(render(report))
    text = console.export_text()
    assert "shop.payment [1]" in text and "wal_status reserved" in text
    assert "topic shop.merchant does not exist" in text
    assert doc["truncates_applied"] == {"shop.invoices": 2}
    assert "shop.invoices ×2 carried" in text


def test_report_without_any_source() -> None:
    errors = ["kafka: down; check [kafka] bootstrap"]
    report = build_report(SETTINGS, ["payment"], None, None, None, errors=errors)
    assert report.topics[0].error == "kafka not read"
    assert report.as_json()["errors"] == errors
    console = Console(record=True, width=160)
    console.print(render(report, partitions=False))
    # An error naming a config section is text, not a markup tag rich would drop.
    assert "check [kafka] bootstrap" in console.export_text()


def test_byte_sizes_for_people() -> None:
    assert _bytes(None) == "-"
    assert _bytes(512) == "512 B"
    assert _bytes(2048) == "2.0 kB"
    assert _bytes(5 * 1024**3) == "5.0 GB"


def test_monitored_domains_come_from_the_mapping_file(tmp_path: Path) -> None:
    shop = Path(__file__).resolve().parents[2] / "examples" / "shop" / "mapping.toml"
    assert monitored_domains(replace(SETTINGS, mapping_path=shop)) == [
        "payment",
        "data",
        "merchant",
    ]
    # No built-in fallback list: a missing mapping is the usual configuration error (exit 2).
    with pytest.raises(MappingError):
        monitored_domains(replace(SETTINGS, mapping_path=tmp_path / "missing.toml"))
