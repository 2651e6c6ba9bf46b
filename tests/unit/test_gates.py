"""Gate evaluation from evidence (pure): each gate passes and fails on its own, critical
failures cannot be forced, and a refusal names every failing gate with its evidence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from control.gates import (
    GATES,
    CaptureEvidence,
    DeadLetterEvidence,
    Evidence,
    HeartbeatEvidence,
    LagEvidence,
    SlotEvidence,
    VerifyEvidence,
    apply_lag,
    decide,
    evaluate,
)
from cutover.config import GateSettings

LIMITS = GateSettings(verify_max_age_minutes=15, max_apply_lag_events=100, max_heartbeat_age_s=60)

GOOD = Evidence(
    domain="payment",
    verify=VerifyEvidence(run_id=7, passed=True, age_s=120.0, finished_at="2024-01-01T00:00:00"),
    lag=LagEvidence(topic="shop.payment", partitions={0: 3, 1: 0}, total=3),
    dead_letters=DeadLetterEvidence(open=0),
    heartbeat=HeartbeatEvidence(age_s=2.0, producer="host:1"),
    slot=SlotEvidence(slot="cutover_slot", exists=True, wal_status="reserved", active=True),
    capture=CaptureEvidence(blocks=()),
)


def results(ev: Evidence) -> dict[str, tuple[bool, bool, str]]:
    return {r.name: (r.passed, r.critical, r.why) for r in evaluate(ev, LIMITS)}


def test_all_pass() -> None:
    got = evaluate(GOOD, LIMITS)
    assert [r.name for r in got] == list(GATES)
    assert all(r.passed for r in got)
    assert decide(got, force=False).allowed


BAD: dict[str, tuple[Evidence, bool, str]] = {  # case: (evidence, critical, why)
    # no verify ever ran: critical, --force must not switch to data no one compared
    "verify": (replace(GOOD, verify=VerifyEvidence()), True, "no verify run covers"),
    "verify_old": (
        replace(GOOD, verify=VerifyEvidence(run_id=7, passed=True, age_s=16 * 60.0)),
        False,
        "16.0 min old; the limit is 15 min",
    ),
    "verify_failed": (
        replace(GOOD, verify=VerifyEvidence(run_id=8, passed=False, age_s=60.0)),
        True,
        "found persistent differences",
    ),
    "apply_lag": (
        replace(GOOD, lag=LagEvidence(topic="shop.payment", partitions={0: 150, 1: 0}, total=150)),
        False,
        "150 events of shop.payment not applied yet (limit 100; p0=150)",
    ),
    "apply_lag_unknown": (
        replace(GOOD, lag=LagEvidence(topic="shop.payment", error="broker down")),
        False,
        "could not measure the apply lag: broker down",
    ),
    "dead_letters": (
        replace(GOOD, dead_letters=DeadLetterEvidence(open=2, sample_ids=(4, 9))),
        False,
        "2 open dead letters of payment (ids 4, 9)",
    ),
    "dead_letters_of_the_producer": (
        replace(GOOD, dead_letters=DeadLetterEvidence(open=0, producer_open=1, producer_ids=(3,))),
        False,
        "1 rows of payment withheld by the producer (ids p3)",
    ),
    "dead_letters_unreadable": (
        replace(GOOD, dead_letters=DeadLetterEvidence(error="no cutover.dead_letters table")),
        False,
        "could not read dead letters: no cutover.dead_letters table",
    ),
    "producer_heartbeat": (
        replace(GOOD, heartbeat=HeartbeatEvidence(age_s=61.0)),
        False,
        "last heartbeat is 61 s old (limit 60 s)",
    ),
    "producer_heartbeat_never": (
        replace(GOOD, heartbeat=HeartbeatEvidence(error="the producer never ran")),
        False,
        "the producer never ran",
    ),
    "slot_missing": (
        replace(GOOD, slot=SlotEvidence(slot="s", exists=False)),
        True,
        "does not exist",
    ),
    "slot_lost": (
        replace(GOOD, slot=SlotEvidence(slot="s", exists=True, wal_status="lost")),
        True,
        "wal_status lost",
    ),
    "capture_blocked": (
        replace(
            GOOD,
            capture=CaptureEvidence(blocks=(("shop.merchants", "the table left the publication"),)),
        ),
        True,
        "capture of shop.merchants is blocked: the table left the publication",
    ),
    "capture_unchecked": (
        replace(GOOD, capture=CaptureEvidence()),
        False,
        "could not compare the publication with the mapping",
    ),
    "slot_unreserved": (
        replace(GOOD, slot=SlotEvidence(slot="s", exists=True, wal_status="unreserved")),
        False,
        "unreserved",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_gate_blocks_on_its_own(case: str) -> None:
    ev, critical, why = BAD[case]
    got = evaluate(ev, LIMITS)
    failing = [r for r in got if not r.passed]
    assert len(failing) == 1, [r.line() for r in failing]
    gate = failing[0]
    assert gate.name == next(g for g in GATES if case.startswith(g))
    assert gate.critical is critical
    assert why in gate.why
    refused = decide(got, force=False)
    assert not refused.allowed
    assert gate.name in refused.refusal("payment") and why in refused.refusal("payment")
    forced = decide(got, force=True)
    assert forced.allowed is (not critical)
    assert [g.name for g in forced.overridden] == ([] if critical else [gate.name])


def test_evidence_goes_with_the_result() -> None:
    lag = {r.name: r for r in evaluate(BAD["apply_lag"][0], LIMITS)}["apply_lag"]
    assert lag.evidence["total"] == 150 and lag.evidence["partitions"] == {"0": 150, "1": 0}
    assert lag.to_json()["gate"] == "apply_lag"
    assert GOOD.to_json()["lag"]["partitions"] == {"0": 3, "1": 0}


def test_refusal_hints() -> None:
    mixed = evaluate(replace(BAD["slot_lost"][0], heartbeat=HeartbeatEvidence(age_s=999.0)), LIMITS)
    text = decide(mixed, force=False).refusal("payment")
    assert "refused by 2 gate(s)" in text
    assert "critical gates cannot be forced" in text
    assert "--force --reason TEXT overrides the others" in text
    forced = decide(mixed, force=True)
    assert not forced.allowed and [g.name for g in forced.blocking] == ["slot"]


def test_every_gate_fails_closed_on_empty_evidence() -> None:
    """Evidence no probe filled in (all None) never passes a gate."""
    empty = Evidence(
        domain="payment",
        verify=VerifyEvidence(),
        lag=LagEvidence(),
        dead_letters=DeadLetterEvidence(),
        heartbeat=HeartbeatEvidence(),
        slot=SlotEvidence(),
    )
    got = evaluate(empty, LIMITS)
    assert [r.name for r in got if r.passed] == []
    forced = decide(got, force=True)
    assert not forced.allowed and "verify" in [g.name for g in forced.blocking]


def test_apply_lag_per_partition() -> None:
    marks = {0: (0, 100), 1: (50, 80), 2: (0, 0)}
    # p0 at 90 -> 10 behind; p1 never consumed -> starts at its low watermark; p2 empty
    assert apply_lag(marks, {0: 90}) == {0: 10, 1: 30, 2: 0}
    assert apply_lag(marks, {0: 100, 1: 80, 2: 0}) == {0: 0, 1: 0, 2: 0}
