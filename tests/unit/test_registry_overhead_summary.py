"""How bench/registry_overhead.py turns alternated on/off runs into medians and costs."""

from __future__ import annotations

from typing import Any

from bench.registry_overhead import markdown, summarize


def _run(registry: bool, rate: int, cpu: float) -> dict[str, Any]:
    return {"registry": registry, "events_per_s": rate, "cpu_us_per_event": cpu}


RUNS = [
    _run(False, 1000, 100.0),
    _run(True, 900, 104.0),
    _run(True, 980, 103.0),
    _run(False, 500, 101.0),  # a neighbour's burst: the median keeps it out
    _run(False, 1010, 99.0),
    _run(True, 950, 110.0),
]


def test_medians_per_mode_and_costs() -> None:
    s = summarize(RUNS, best=True)
    assert s["median_events_per_s"] == {"off": 1000, "on": 950}
    assert s["median_cpu_us_per_event"] == {"off": 100.0, "on": 104.0}
    assert s["cost_percent"] == 4.0  # more CPU per event with the registry on
    assert s["wall_cost_percent"] == 5.0  # fewer events/s with the registry on
    assert s["best_events_per_s"] == {"off": 1010, "on": 980}
    assert s["best_wall_cost_percent"] == 3.0
    assert "best_events_per_s" not in summarize(RUNS, best=False)


def test_markdown_has_a_row_per_measured_part() -> None:
    doc = {
        "producer": summarize(RUNS, best=True),
        "end_to_end": None,
        "encoder_us_per_event": {"off": 12.0, "on": 13.0},
    }
    text = markdown(doc)
    assert "| producer (backlog drain) | 1,000 → 950 | 100.0 → 104.0 | 5.0 % / 4.0 %" in text
    assert "end to end" not in text
    doc["end_to_end"] = summarize(RUNS[:2], best=False)
    assert "| end to end | 1,000 → 900 |" in markdown(doc)
