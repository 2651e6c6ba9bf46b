"""The write cutover, pure parts: plan() for every state x action, the write gates (each
passing, each failing on its own, failing closed on empty evidence), the status counts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control import state as st
from control.gates import DeadLetterEvidence, LagEvidence, VerifyEvidence
from control.machine import RULES, plan
from control.state import DomainState
from control.write_gates import (
    WRITE_GATE_TABLE,
    FenceEvidence,
    WriteEvidence,
    evaluate_write,
)
from control.write_switch import ReversePath
from cutover.config import GateSettings
from cutover.control_store import IN_FLIGHT, STABLE, STATES

ACTIONS: tuple[st.Action, ...] = (
    "switch_reads",
    "rollback",
    "switch_writes",
    "rollback_writes",
    "complete",
)

# (state, action) -> (kind, to_state); every pair of STATES x ACTIONS is listed.
EXPECTED: dict[tuple[str, str], tuple[str, str | None]] = {
    ("replicating", "switch_reads"): ("start", "reads_switched"),
    ("replicating", "rollback"): ("noop", None),
    ("replicating", "switch_writes"): ("refuse", None),
    ("replicating", "rollback_writes"): ("refuse", None),
    ("replicating", "complete"): ("refuse", None),
    ("switching_reads", "switch_reads"): ("resume", "reads_switched"),
    ("switching_reads", "rollback"): ("start", "replicating"),
    ("switching_reads", "switch_writes"): ("refuse", None),
    ("switching_reads", "rollback_writes"): ("refuse", None),
    ("switching_reads", "complete"): ("refuse", None),
    ("reads_switched", "switch_reads"): ("noop", None),
    ("reads_switched", "rollback"): ("start", "replicating"),
    ("reads_switched", "switch_writes"): ("start", "writes_switched"),
    ("reads_switched", "rollback_writes"): ("noop", None),
    ("reads_switched", "complete"): ("refuse", None),
    ("rolling_back", "switch_reads"): ("refuse", None),
    ("rolling_back", "rollback"): ("resume", "replicating"),
    ("rolling_back", "switch_writes"): ("refuse", None),
    ("rolling_back", "rollback_writes"): ("refuse", None),
    ("rolling_back", "complete"): ("refuse", None),
    ("switching_writes", "switch_reads"): ("refuse", None),
    ("switching_writes", "rollback"): ("refuse", None),
    ("switching_writes", "switch_writes"): ("resume", "writes_switched"),
    ("switching_writes", "rollback_writes"): ("start", "reads_switched"),
    ("switching_writes", "complete"): ("refuse", None),
    ("writes_switched", "switch_reads"): ("refuse", None),
    ("writes_switched", "rollback"): ("refuse", None),
    ("writes_switched", "switch_writes"): ("noop", None),
    ("writes_switched", "rollback_writes"): ("start", "reads_switched"),
    ("writes_switched", "complete"): ("start", "completed"),
    ("rolling_back_writes", "switch_reads"): ("refuse", None),
    ("rolling_back_writes", "rollback"): ("refuse", None),
    ("rolling_back_writes", "switch_writes"): ("refuse", None),
    ("rolling_back_writes", "rollback_writes"): ("resume", "reads_switched"),
    ("rolling_back_writes", "complete"): ("refuse", None),
    ("completing", "switch_reads"): ("refuse", None),
    ("completing", "rollback"): ("refuse", None),
    ("completing", "switch_writes"): ("refuse", None),
    ("completing", "rollback_writes"): ("refuse", None),
    ("completing", "complete"): ("resume", "completed"),
    ("completed", "switch_reads"): ("refuse", None),
    ("completed", "rollback"): ("refuse", None),
    ("completed", "switch_writes"): ("refuse", None),
    ("completed", "rollback_writes"): ("refuse", None),
    ("completed", "complete"): ("noop", None),
}


def ds(state: str, **kw: object) -> DomainState:
    return DomainState("payment", state, 3, **kw)  # type: ignore[arg-type]


def test_the_table_covers_every_state_and_action() -> None:
    assert set(EXPECTED) == {(s, a) for s in STATES for a in ACTIONS}
    assert set(ACTIONS) == set(RULES)
    assert set(STATES) == STABLE | IN_FLIGHT and not STABLE & IN_FLIGHT


@pytest.mark.parametrize(("state", "action"), sorted(EXPECTED))
def test_plan_for_every_state_and_action(state: str, action: st.Action) -> None:
    kind, to = EXPECTED[(state, action)]
    got = plan(ds(state, transition_id="t1"), action)
    assert (got.kind, got.to_state) == (kind, to)
    if kind in ("refuse", "noop"):
        assert got.why and "payment" in got.why


def test_rollback_from_writes_switched_names_rollback_writes() -> None:
    got = plan(ds("writes_switched"), "rollback")
    assert got.kind == "refuse" and "cutover rollback-writes payment" in got.why


def test_rollback_writes_of_an_unfinished_switch_writes_abandons_it() -> None:
    got = plan(ds("switching_writes", transition_id="t9"), "rollback_writes")
    assert got.abandon == "t9" and got.via == "rolling_back_writes"


def test_an_unfinished_switch_writes_says_how_to_finish_or_undo_it() -> None:
    text = st.explain(
        ds(
            "switching_writes",
            transition_id="t1",
            from_state="reads_switched",
            to_state="writes_switched",
            pending_version=4,
            step="drain_forward",
        )
    )
    assert "cutover switch-writes payment" in text
    assert "cutover rollback-writes payment" in text
    assert "last step done: drain_forward" in text


def test_progress_counts_written_and_completed_domains_as_read() -> None:
    weights = {"payment": 60, "data": 20, "merchant": 20}
    states = {"payment": "writes_switched", "data": "completed", "merchant": "replicating"}
    assert st.progress(states, weights) == 80


# ---------------------------------------------------------------------------------------------
# The write gates
# ---------------------------------------------------------------------------------------------

LIMITS = GateSettings(min_reads_soak_minutes=60, min_writes_soak_minutes=1440)


def healthy(state: str = "reads_switched") -> WriteEvidence:
    return WriteEvidence(
        "payment",
        state=state,
        soak_s=2 * 86_400.0,
        verify=VerifyEvidence(run_id=7, passed=True, age_s=60.0),
        forward_lag=LagEvidence(topic="t", partitions={0: 0}, total=0),
        dead_letters=DeadLetterEvidence(open=0),
        fences=FenceEvidence(legacy=True, commerce=True),
        reverse=ReversePath(True, True, "ok", 1.0),
        reverse_lag=LagEvidence(topic="r", partitions={0: 0}, total=0),
    )


def test_healthy_evidence_passes_every_gate() -> None:
    assert all(g.passed for g in evaluate_write("switch_writes", healthy(), LIMITS))
    assert all(g.passed for g in evaluate_write("complete", healthy("writes_switched"), LIMITS))
    assert [g.name for g in evaluate_write("switch_writes", healthy(), LIMITS)] == [
        "reads_soak",
        "verify",
        "forward_lag",
        "dead_letters",
        "fences",
        "reverse_path",
    ]
    assert [n for n, _g in WRITE_GATE_TABLE["complete"]] == ["writes_soak", "verify", "reverse_lag"]


BREAKERS: dict[str, tuple[str, str, WriteEvidence, bool]] = {
    # name: (action, failing gate, evidence, critical)
    "short reads soak": (
        "switch_writes",
        "reads_soak",
        replace(healthy(), soak_s=59 * 60.0),
        False,
    ),
    "not reads_switched": (
        "switch_writes",
        "reads_soak",
        replace(healthy(), state="replicating"),
        False,
    ),
    "stale verify": (
        "switch_writes",
        "verify",
        replace(healthy(), verify=VerifyEvidence(run_id=7, passed=True, age_s=3600.0)),
        False,
    ),
    "failed verify": (
        "switch_writes",
        "verify",
        replace(healthy(), verify=VerifyEvidence(run_id=7, passed=False, age_s=1.0)),
        True,
    ),
    "more behind than the switch-reads limit": (
        "switch_writes",
        "forward_lag",
        replace(
            healthy(),
            forward_lag=LagEvidence(topic="t", partitions={0: 1001}, total=1001),
        ),
        False,
    ),
    "open dead letter": (
        "switch_writes",
        "dead_letters",
        replace(healthy(), dead_letters=DeadLetterEvidence(open=1, sample_ids=(4,))),
        False,
    ),
    "no fence on commerce": (
        "switch_writes",
        "fences",
        replace(healthy(), fences=FenceEvidence(legacy=True, commerce=False)),
        True,
    ),
    "no reverse slot": (
        "switch_writes",
        "reverse_path",
        replace(healthy(), reverse=ReversePath(False, False, "reverse slot x does not exist")),
        True,
    ),
    "stale reverse heartbeat": (
        "switch_writes",
        "reverse_path",
        replace(healthy(), reverse=ReversePath(False, True, "heartbeat 600 s old", 600.0)),
        False,
    ),
    "short writes soak": (
        "complete",
        "writes_soak",
        replace(healthy("writes_switched"), soak_s=60.0),
        False,
    ),
    "reverse lag": (
        "complete",
        "reverse_lag",
        replace(
            healthy("writes_switched"),
            reverse_lag=LagEvidence(topic="r", partitions={1: 3}, total=3),
        ),
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_each_write_gate_blocks_on_its_own(case: str) -> None:
    action, gate, ev, critical = BREAKERS[case]
    results = evaluate_write(action, ev, LIMITS)
    failing = [g for g in results if not g.passed]
    assert [g.name for g in failing] == [gate]
    assert failing[0].critical is critical
    assert failing[0].why


def test_soak_zero_allowed() -> None:
    limits = GateSettings(min_reads_soak_minutes=0, min_writes_soak_minutes=0)
    ev = replace(healthy(), soak_s=0.0)
    assert all(g.passed for g in evaluate_write("switch_writes", ev, limits))


@pytest.mark.parametrize("action", sorted(WRITE_GATE_TABLE))
def test_every_write_gate_fails_closed_on_empty_evidence(action: str) -> None:
    results = evaluate_write(action, WriteEvidence("payment"), LIMITS)
    assert results and not any(g.passed for g in results)


def test_action_gates_cover_every_action() -> None:
    assert set(st.ACTION_GATES) == set(RULES)
