"""The cutover state machine (pure): plans per state and action, effective state, progress."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from control import state as st
from control.state import DomainState


def ds(state: str, **kw: object) -> DomainState:
    return DomainState("payment", state, 3, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "action", "kind", "to"),
    [
        ("replicating", "switch_reads", "start", "reads_switched"),
        ("switching_reads", "switch_reads", "resume", "reads_switched"),
        ("reads_switched", "switch_reads", "noop", None),
        ("rolling_back", "switch_reads", "refuse", None),
        ("writes_switched", "switch_reads", "refuse", None),
        ("reads_switched", "rollback", "start", "replicating"),
        ("rolling_back", "rollback", "resume", "replicating"),
        ("switching_reads", "rollback", "start", "replicating"),
        ("replicating", "rollback", "noop", None),
        ("writes_switched", "rollback", "refuse", None),
    ],
)
def test_plan_table(state: str, action: st.Action, kind: str, to: str | None) -> None:
    got = st.plan(ds(state, transition_id="t1"), action)
    assert got.kind == kind
    assert got.to_state == to
    if kind in ("refuse", "noop"):
        assert got.why


def test_rollback_of_an_unfinished_switch_abandons_it() -> None:
    got = st.plan(ds("switching_reads", transition_id="t1"), "rollback")
    assert got.abandon == "t1" and got.via == "rolling_back"


def test_refusal_says_how_to_get_unstuck() -> None:
    got = st.plan(ds("rolling_back"), "switch_reads")
    assert "cutover rollback payment" in got.why


def test_effective_state_follows_publication() -> None:
    pending = dict(
        transition_id="t1", from_state="replicating", to_state="reads_switched", pending_version=4
    )
    assert ds("switching_reads", **pending).effective() == ("replicating", 3)
    assert ds("switching_reads", published=True, **pending).effective() == ("reads_switched", 4)
    assert ds("reads_switched").effective() == ("reads_switched", 3)


def test_explain_in_flight() -> None:
    s = ds(
        "switching_reads",
        transition_id="t1",
        from_state="replicating",
        to_state="reads_switched",
        pending_version=4,
        actor="sre",
        transition_created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    text = st.explain(s)
    assert "did not finish" in text and "not yet published" in text
    assert "cutover switch-reads payment" in text and "cutover rollback payment" in text
    assert "already follow reads_switched" in st.explain(replace(s, published=True))
    assert st.explain(ds("replicating")).startswith("legacy serves reads")


def test_progress_is_weighted() -> None:
    weights = {"payment": 60, "data": 20, "merchant": 20}
    assert st.progress({"payment": "replicating"}, weights) == 0
    assert st.progress({"payment": "reads_switched"}, weights) == 60
    assert st.progress({"payment": "reads_switched", "data": "writes_switched"}, weights) == 80
    assert st.progress({"payment": "switching_reads"}, weights) == 0


def test_state_message_shape() -> None:
    msg = st.state_message(
        domain="data",
        state="reads_switched",
        version=2,
        actor="sre",
        transition_id="t",
        changed_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    assert msg == {
        "domain": "data",
        "state": "reads_switched",
        "version": 2,
        "changed_at": "2024-01-01T00:00:00+00:00",
        "actor": "sre",
        "transition_id": "t",
    }


def test_control_plane_ddl_is_idempotent_text() -> None:
    ddl = st.control_plane_ddl()
    creates = [line for line in ddl.splitlines() if line.startswith("CREATE")]
    assert creates and all("IF NOT EXISTS" in line for line in creates)
    assert "cutover." not in ddl.replace("control.state", "")  # unqualified: search_path decides


def test_a_resumed_transition_is_refused_only_by_critical_gates() -> None:
    from control.gates import GateResult

    slot = GateResult("slot", False, "slot lost", critical=True)
    beat = GateResult("producer_heartbeat", False, "old beat")
    ok = GateResult("verify", True, "fine")
    # resuming: a non-critical failure does not block, and is not reported as forced past
    resumed = st.gate_decision("resume", [ok, beat], force=False)
    assert resumed.allowed and resumed.overridden == ()
    # a critical failure since the intent blocks the resume, forced or not
    for force in (False, True):
        blocked = st.gate_decision("resume", [ok, beat, slot], force=force)
        assert not blocked.allowed and [g.name for g in blocked.blocking] == ["slot"]
    # starting: every failure blocks unless forced
    assert not st.gate_decision("start", [ok, beat], force=False).allowed
    forced = st.gate_decision("start", [ok, beat], force=True)
    assert forced.allowed and [g.name for g in forced.overridden] == ["producer_heartbeat"]
