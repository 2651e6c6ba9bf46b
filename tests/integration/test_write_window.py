"""The write window's measurement and what is paid before the fence (issue 11, "Measured").

On the staged pipeline of test_write_switch (its module fixture, shared):

* every step of switch-writes and rollback-writes records when it ended, in ms since the fence
  went up (``steps_ms``, in the transition's row and the command's detail), ending with the
  publication, which is the window;
* the final verify (step 3) runs on a verifier prepared BEFORE the fence (connections and Kafka
  client up), is still a full verify of the domain (every table, stored as a run) and leaves
  nothing open;
* the drain's position reader is warm (its Kafka client made) before the fence goes up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from control import write_switch
from control.state import rollback_writes, switch_writes
from control.verify import prepared_verifier, run_verify
from control.verify_engine import Verifier
from control.write_switch import WriteSteps
from cutover.config import Settings
from tests.integration.test_verify_support import DOMAINS, commerce, mapping
from tests.integration.test_write_switch import fences, heartbeats, staged, state_of

pytestmark = pytest.mark.integration
__all__ = ["heartbeats", "staged"]  # the shared fixtures

SWITCH_STEPS = ["fence_legacy", "drain_forward", "verify", "reverse_ready", "open_commerce"]
ROLLBACK_STEPS = ["fence_commerce", "drain_reverse", "verify", "open_legacy"]


def _timed(detail: dict[str, Any], steps: list[str]) -> None:
    timed = detail["steps_ms"]
    assert list(timed) == [*steps, "published"]
    values = list(timed.values())
    assert values == sorted(values) and values[0] >= 0
    assert timed["published"] == detail["window_ms"]


def _in_order(steps_ms: dict[str, int]) -> list[str]:
    return [name for name, _at in sorted(steps_ms.items(), key=lambda kv: kv[1])]


def _recorded(settings: Settings, transition_id: str | None) -> dict[str, Any]:
    rows = commerce(
        settings,
        "SELECT step_detail FROM cutover.transitions WHERE transition_id = %s",
        [transition_id],
    )
    detail: dict[str, Any] = rows[0][0]
    return detail


def test_each_step_records_when_it_ended_since_the_fence(staged: Settings) -> None:
    domains, d = list(DOMAINS), "data"
    out = switch_writes(staged, domains, d, actor="sre")
    assert out.outcome == "done"
    _timed(dict(out.detail), SWITCH_STEPS)
    # The row keeps the map of every step (merged whole, not overwritten by the last step;
    # jsonb orders keys its own way, the times give the order).
    assert _in_order(_recorded(staged, out.transition_id)["steps_ms"]) == SWITCH_STEPS

    back = rollback_writes(staged, domains, d, actor="sre")
    assert back.outcome == "done"
    _timed(dict(back.detail), ROLLBACK_STEPS)
    assert _in_order(_recorded(staged, back.transition_id)["steps_ms"]) == ROLLBACK_STEPS
    assert state_of(staged, d) == ("reads_switched", "reads_switched")


def test_the_final_verify_is_prepared_before_the_fence_and_still_full(
    staged: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    domains, d = list(DOMAINS), "merchant"
    seen: dict[str, Any] = {}

    @contextmanager
    def spy_prepared(settings: Settings, spec: Any, domain: str) -> Iterator[Verifier]:
        with prepared_verifier(settings, spec, domain) as v:
            seen["fenced_when_prepared"] = fences(staged, d)
            seen["consumer_warm"] = v.positions._consumer is not None
            seen["prepared"] = v
            yield v

    def spy_run(*args: Any, **kwargs: Any) -> Any:
        seen["fenced_when_run"] = fences(staged, d)
        seen["given"] = kwargs.get("verifier")
        report = run_verify(*args, **kwargs)
        seen["report"] = report
        return report

    monkeypatch.setattr(write_switch, "prepared_verifier", spy_prepared)
    monkeypatch.setattr(write_switch, "run_verify", spy_run)
    out = switch_writes(staged, domains, d, actor="sre")
    assert out.outcome == "done"
    assert not seen["fenced_when_prepared"][0]  # legacy still open: before the fence
    assert seen["consumer_warm"]
    assert seen["fenced_when_run"][0]  # the verify itself: inside the window
    assert seen["given"] is seen["prepared"]
    report = seen["report"]
    assert report.passed and report.domains == [d]
    assert sorted(t.table for t in report.tables) == sorted(
        t.source_table for t in mapping().tables_of(d)
    )
    assert out.detail["verify_run"] == report.run_id
    assert seen["prepared"].legacy.closed and seen["prepared"].commerce.closed
    assert rollback_writes(staged, domains, d, actor="sre").outcome == "done"


def test_a_prepared_verifier_gives_the_runs_own_result(staged: Settings) -> None:
    with prepared_verifier(staged, mapping(), "data") as v:
        first = run_verify(staged, mapping(), domain="data", actor="t", verifier=v)
        assert not v.legacy.closed  # its owner closes it
        again = run_verify(staged, mapping(), domain="data", actor="t", verifier=v)
    fresh = run_verify(staged, mapping(), domain="data", actor="t")
    assert v.legacy.closed
    assert first.run_id != again.run_id != fresh.run_id
    for r in (first, again):
        assert r.passed == fresh.passed and r.domains == fresh.domains
        assert [(t.table, t.legacy_rows, t.commerce_rows) for t in r.tables] == [
            (t.table, t.legacy_rows, t.commerce_rows) for t in fresh.tables
        ]


def test_the_drain_reader_is_warm_before_the_fence(staged: Settings) -> None:
    steps = WriteSteps(staged, mapping(), actor="t")
    with (
        steps._legacy() as lg,
        steps._commerce() as cm,
        steps._positions(lg, cm, "payment", reverse=False) as reader,
    ):
        assert reader._consumer is not None
        assert not fences(staged, "payment")[0]  # nothing fenced by warming
    assert reader._consumer is None  # closed with the step
