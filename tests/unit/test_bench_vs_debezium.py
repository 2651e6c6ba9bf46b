"""The pure parts of bench/vs_debezium.py: counting by append time, rate, the RATIO line."""

from __future__ import annotations

import pytest

from bench.vs_debezium import count_records, markdown, rate, ratio_line

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


def test_markdown_table_has_both_tools() -> None:
    tool = {"records": 10, "events_per_s": 5.0, "rss_mb": 60.0, "cpu_s": 1.0, "pg_cpu_s": 0.5}
    text = markdown({"ratio": "RATIO x", "cutover": tool, "debezium": tool, "settings": "s"})
    assert text.splitlines()[0] == "RATIO x"
    assert "| cutover | 10 | 5 | 60 | 1.0 | 0.5 |" in text
    assert "| debezium |" in text
