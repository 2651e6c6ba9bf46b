"""The quantiles bench/cdc_latency.py reads from the appliers' cumulative latency histogram,
the settings it passes to a run, and the pure parts of its stage breakdown
(bench/latency_stages.py)."""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from bench.cdc_latency import consumer_section, parse_settings, quantile
from bench.latency_stages import cycle_stats, exact_quantile

INF = float("inf")


def test_interpolates_inside_the_bucket() -> None:
    # 100 events: 50 in (0, 0.1], 40 in (0.1, 0.2], 10 in (0.2, 0.5].
    hist = Counter({0.1: 50, 0.2: 90, 0.5: 100, INF: 100})
    assert quantile(hist, 0.5) == pytest.approx(0.1)
    assert quantile(hist, 0.7) == pytest.approx(0.15)
    assert quantile(hist, 0.99) == pytest.approx(0.2 + 0.3 * 0.9)


def test_beyond_the_last_finite_bucket_reports_its_bound() -> None:
    hist = Counter({0.1: 0, 1.0: 1, INF: 10})
    assert quantile(hist, 0.99) == 1.0


def test_empty_window_is_an_error() -> None:
    with pytest.raises(SystemExit):
        quantile(Counter({0.1: 0, INF: 0}), 0.5)


def test_exact_quantile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100, unsorted input must not matter
    assert exact_quantile(list(reversed(values)), 0.5) == pytest.approx(50.5)
    assert exact_quantile(values, 0.99) == pytest.approx(99.01)
    assert exact_quantile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        exact_quantile([], 0.5)


def _line(when: str, events: int, peek: float) -> str:
    return json.dumps(
        {"event": "producer.batch_delivered", "timestamp": when, "events": events,
         "peek_ms": peek, "flush_ms": 1.0}
    )  # fmt: skip


def test_cycle_stats_counts_only_the_window() -> None:
    lines = [
        _line("2026-11-29T10:00:00.500000Z", 999, 99.0),  # before the window
        _line("2026-11-29T10:00:01.000000Z", 100, 10.0),
        '{"event": "slot.advanced", "timestamp": "2026-11-29T10:00:01.100000Z"}',
        _line("2026-11-29T10:00:02.000000Z", 300, 30.0),
        _line("2026-11-29T10:00:03.000000Z", 999, 99.0),  # at the end: excluded
    ]
    start = datetime(2026, 11, 29, 10, 0, 1, tzinfo=UTC)
    stats = cycle_stats(lines, start, start + timedelta(seconds=2))
    assert stats["cycles"] == 2
    assert stats["cycles_per_s"] == 1.0
    assert stats["events_per_cycle_p50"] == 200
    assert stats["peek_ms_mean"] == 20.0
    assert "advance_ms_mean" not in stats


def test_cpu_profile_gives_seconds_and_microseconds_per_unit() -> None:
    from bench.e2e_throughput import cpu_profile

    out = cpu_profile({"pg": 1.0}, {"pg": 3.0}, {"producer": 2.0}, units=1_000_000)
    assert out["cpu_s"] == {"pg": 2.0, "producer": 2.0}
    assert out["cpu_us_per_unit"] == {"pg": 2.0, "producer": 2.0}
    assert out["total_cpu_us_per_unit"] == 4.0
    assert out["ceiling_on_2_cores_per_s"] == 500_000  # 2 cores / 4 µs per event


def test_tree_cpu_counts_children_that_have_ended() -> None:
    """A PostgreSQL backend that ended still counts (through its parent's reaped time)."""
    import os
    import subprocess
    import sys

    from bench.latency_stages import tree_cpu_s

    before = tree_cpu_s(os.getpid())
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert tree_cpu_s(os.getpid()) - before >= 0.3


def test_settings_flags_become_typed_config_values() -> None:
    parsed = parse_settings(["linger.ms=5", "x=0.5", "enable=true", "mode=range", "s=a=b"])
    assert parsed == {"linger.ms": 5, "x": 0.5, "enable": True, "mode": "range", "s": "a=b"}
    assert parse_settings(None) == {}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_settings(["linger.ms"])


def test_consumer_settings_are_a_toml_table_under_kafka() -> None:
    text = consumer_section({"fetch.wait.max.ms": 10, "client.rack": "a"})
    config = tomllib.loads("[kafka]\npartitions = 6\n" + text)
    assert config["kafka"]["consumer"] == {"fetch.wait.max.ms": 10, "client.rack": "a"}
    assert consumer_section({}) == ""
