"""The pure parts of bench/vs_debezium.py: counting by append time, rate, the RATIO line."""

from __future__ import annotations

import pytest

from bench.vs_debezium import Count, count_records, markdown, rate, ratio_line

LOG_APPEND_TIME = 2
CREATE_TIME = 1


def test_count_records_takes_first_and_last_append_time() -> None:
    count = count_records([(LOG_APPEND_TIME, 1_500), (LOG_APPEND_TIME, 1_000), (2, 4_000)])
    assert (count.records, count.first_ms, count.last_ms) == (3, 1_000, 4_000)


def test_count_records_refuses_create_time() -> None:
    # A producer's CreateTime would time the client, not the broker.
    with pytest.raises(ValueError, match="LogAppendTime"):
        count_records([(LOG_APPEND_TIME, 1), (CREATE_TIME, 2)])


def test_rate_runs_from_the_start_to_the_last_append() -> None:
    assert rate(10_000, start_ms=1_000, last_ms=3_000) == 5_000.0
    assert rate(0, start_ms=1_000, last_ms=None) == 0.0
    assert rate(5, start_ms=3_000, last_ms=3_000) == 0.0


def test_ratio_line_format() -> None:
    line = ratio_line(52_000.4, 40_000.0, 1_000_000)
    assert line == "RATIO cutover/debezium = 1.30 (52,000 ev/s, 40,000 ev/s, N=1,000,000)"
    assert ratio_line(1.0, 0.0, 10).startswith("RATIO cutover/debezium = inf (")


def test_ratio_line_names_the_backlog() -> None:
    line = ratio_line(30_000.0, 10_000.0, 313_000, "workload")
    assert line == "RATIO cutover/debezium = 3.00 (30,000 ev/s, 10,000 ev/s, N=313,000, workload)"


def test_second_half_rate_leaves_the_warm_up_out() -> None:
    count = Count()
    # A slow first half (2 records over 10 s), then a fast second half (2 records in 1 s).
    for ms in (0, 10_000, 10_500, 11_000):
        count.add(ms)
    # The second half runs from the last record of the first half (10,000) to the last (11,000).
    assert count.second_half_rate() == 2.0  # 2 records in 1 s
    assert rate(count.records, 0, count.last_ms) < count.second_half_rate()
    assert Count().second_half_rate() == 0.0


def test_markdown_table_has_both_tools_per_backlog() -> None:
    tool = {"records": 10, "events_per_s": 5.0, "second_half_events_per_s": 7.0,
            "rss_mb": 60.0, "cpu_s": 1.0, "pg_cpu_s": 0.5}  # fmt: skip
    runs = {kind: {"ratio": f"RATIO {kind}", "cutover": tool, "debezium": tool}
            for kind in ("synthetic", "workload")}  # fmt: skip
    text = markdown({"backlogs": runs, "settings": "s"})
    assert text.splitlines()[:2] == ["RATIO synthetic", "RATIO workload"]
    assert "| synthetic | cutover | 10 | 5 | 7 | 60 | 1.0 | 100000 | 0.5 |" in text
    assert "| workload | debezium |" in text
