"""The quantiles bench/cdc_latency.py reads from the appliers' cumulative latency histogram."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.cdc_latency import quantile

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
