"""The per-step breakdown bench/write_window.py reads from a write command's ``--json``."""

from __future__ import annotations

from bench.write_window import find_steps_ms, markdown, step_durations, step_figures

DOC = {
    "window_ms": 900,
    "detail": {
        "window_ms": 900,
        "steps_ms": {
            "fence_legacy": 2,
            "drain_forward": 300,
            "verify": 700,
            "reverse_ready": 720,
            "open_commerce": 750,
            "published": 900,
        },
    },
}


def test_each_step_is_its_end_minus_the_previous_end() -> None:
    shares = step_durations(find_steps_ms(DOC))
    assert shares == {
        "fence_legacy": 2,
        "drain_forward": 298,
        "verify": 400,
        "reverse_ready": 20,
        "open_commerce": 30,
        "published": 150,
    }
    assert sum(shares.values()) == DOC["window_ms"]


def test_a_command_without_steps_has_no_breakdown() -> None:
    assert find_steps_ms({"window_ms": 5}) == {}
    assert find_steps_ms({"detail": {"steps_ms": "x"}}) == {}
    assert step_durations({}) == {}


def test_figures_per_step_over_runs_keep_the_steps_order() -> None:
    runs = [{"drain": 100.0, "verify": 500.0}, {"drain": 300.0, "verify": 200.0}, {"drain": 200.0}]
    figures = step_figures(runs)
    assert list(figures) == ["drain", "verify"]
    assert figures["drain"] == {"p50_ms": 200.0, "p99_ms": 300.0}
    assert figures["verify"] == {"p50_ms": 200.0, "p99_ms": 500.0}


def test_the_table_shows_each_steps_share() -> None:
    result = {
        "rate_asked": 500.0,
        "domains": {
            "data": {
                "switch-writes": {
                    "p50_ms": 900.0,
                    "p99_ms": 900.0,
                    "max_ms": 900.0,
                    "steps_ms": step_figures([step_durations(find_steps_ms(DOC))]),
                }
            }
        },
        "workload": {
            "transactions": 10,
            "achieved_tx_s": 5.0,
            "refused_transactions": 1,
            "retries": 2,
            "max_retry_wait_s": 0.5,
        },
        "oracle": {"lost": False, "rows_differing_legacy": {}, "rows_differing_commerce": {}},
    }
    text = markdown(result)
    assert "* data switch-writes: fence_legacy 2 / 2, drain_forward 298 / 298" in text
    assert "verify 400 / 400" in text and "published 150 / 150" in text
