"""Pure replay logic: filters, ranges, times, rates and pacing."""

from __future__ import annotations

import pytest

from consumers.replay import (
    Filters,
    Pacer,
    Rate,
    make_filters,
    parse_rate,
    parse_time,
    plan_ranges,
    table_of_schema,
)
from cutover.errors import UsageError


def test_times_are_iso_and_utc_by_default() -> None:
    assert parse_time("1970-01-01T00:00:01Z", "--from-time") == 1000
    assert parse_time("1970-01-01T00:00:01", "--from-time") == 1000
    assert parse_time("1970-01-01T02:00:01+02:00", "--from-time") == 1000
    with pytest.raises(UsageError, match="--to-time 'yesterday' is not an ISO 8601 time"):
        parse_time("yesterday", "--to-time")


def test_filters_refuse_contradictions() -> None:
    with pytest.raises(UsageError, match="not both"):
        make_filters(from_offset=1, from_time="2025-01-01")
    with pytest.raises(UsageError, match="greater than --from-offset"):
        make_filters(from_offset=5, to_offset=5)
    with pytest.raises(UsageError, match="later than"):
        make_filters(from_time="2025-01-02", to_time="2025-01-01")
    with pytest.raises(UsageError, match="0 or more"):
        make_filters(from_offset=-1)


def test_position_filter_is_half_open() -> None:
    f = make_filters(partitions=[1], from_offset=10, to_offset=20)
    assert f.position(1, 10, 0) and f.position(1, 19, 0)
    assert not f.position(1, 20, 0) and not f.position(1, 9, 0)
    assert not f.position(0, 15, 0)
    t = Filters(from_time_ms=100, to_time_ms=200)
    assert t.position(0, 0, 100) and not t.position(0, 0, 200) and not t.position(0, 0, 99)


def test_content_filter_by_key_and_table() -> None:
    f = make_filters(keys=["42"], tables=["orders", "shop.payments"])
    assert f.by_content
    assert f.content(b"42", ("shop", "orders"))
    assert f.content(b"42", ("shop", "payments"))
    assert not f.content(b"42", ("other", "payments"))
    assert not f.content(b"43", ("shop", "orders"))
    assert not f.content(b"42", None)  # heartbeats and raw values are not of a table
    assert Filters().content(None, None)
    assert table_of_schema("cutover.shop.orders.Envelope") == ("shop", "orders")
    assert table_of_schema("cutover.Heartbeat") is None


def test_plan_ranges_clamps_to_the_log() -> None:
    marks = {0: (0, 100), 1: (50, 60), 2: (0, 0)}
    assert plan_ranges([0, 1, 2], marks, Filters()) == {0: (0, 100), 1: (50, 60), 2: (0, 0)}
    f = Filters(from_offset=55, to_offset=90)
    assert plan_ranges([0, 1, 2], marks, f) == {0: (55, 90), 1: (55, 60), 2: (0, 0)}
    assert plan_ranges([0, 1], marks, Filters(partitions=frozenset({1}))) == {1: (50, 60)}
    # Times: -1 from Kafka means "no message at or after that time".
    starts = {0: 30, 1: -1}
    ends = {0: 40, 1: -1}
    t = Filters(from_time_ms=1, to_time_ms=2)
    assert plan_ranges([0, 1], marks, t, starts, ends) == {0: (30, 40), 1: (60, 60)}
    # A start past the end never yields a negative range.
    assert plan_ranges([1], marks, Filters(from_offset=70)) == {1: (60, 60)}


def test_rates() -> None:
    assert parse_rate(None) == Rate()
    assert parse_rate("max") == Rate()
    assert parse_rate("5000") == Rate("events", 5000)
    assert parse_rate("2x") == Rate("realtime", 2)
    assert parse_rate("0.5X") == Rate("realtime", 0.5)
    for bad in ["0", "-3", "fast", "x", "nanx", "inf"]:
        with pytest.raises(UsageError, match="--rate"):
            parse_rate(bad)


def test_pacer_schedules() -> None:
    now = [100.0]
    per_s = Pacer(Rate("events", 10), clock=lambda: now[0])
    assert per_s.delay(0, 0) == 0
    assert per_s.delay(5, 0) == pytest.approx(0.5)
    now[0] = 100.6
    assert per_s.delay(5, 0) == 0
    real = Pacer(Rate("realtime", 2), clock=lambda: now[0])
    assert real.due(0, 10_000) == 0
    assert real.due(1, 12_000) == pytest.approx(1.0)  # 2 s recorded, twice as fast
    assert real.due(2, 9_000) == 0  # another partition's earlier message: at once
    assert Pacer(Rate()).delay(10**6, 0) == 0
