"""The switch-reads gates on the real stack: each one blocks on its own (and shows why);
switch-reads is refused while a difference stands and allowed after the fix; --force overrides
only non-critical gates; every attempt is audited."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Producer
from psycopg import sql

from control.audit import list_entries
from control.state import CrashForTest, open_control, rollback, switch_reads
from control.verify import VerifyOptions, run_verify
from cutover.config import GateSettings, Settings
from cutover.errors import GateRefused, UsageError
from tests.integration.test_verify_support import (
    DOMAINS,
    beat,
    commerce,
    create_topics,
    drop_slot,
    legacy,
    mapping,
    published_table,
    scratch_pair,
    seed,
    stage_pipeline,
)

pytestmark = pytest.mark.integration

OPTIONS = VerifyOptions(recheck_timeout_s=5)


@pytest.fixture(scope="module")
def staged(source_dsn: str, target_dsn: str, kafka_bootstrap: str) -> Iterator[Settings]:
    """One small shop with a healthy-looking pipeline, shared by the tests of this module
    (each test restores what it breaks)."""
    gates = GateSettings(verify_max_age_minutes=15, max_apply_lag_events=5, max_heartbeat_age_s=60)
    with scratch_pair(source_dsn, target_dsn, kafka_bootstrap, gates=gates) as settings:
        seed(settings, orders=300)
        create_topics(settings)
        stage_pipeline(settings)
        yield settings


def verify_ok(settings: Settings, domain: str = "data") -> None:
    report = run_verify(settings, mapping(), domain=domain, actor="t", options=OPTIONS)
    assert report.passed, report.mismatch_summary()


def dry(settings: Settings, domain: str = "data") -> dict[str, tuple[bool, bool, str]]:
    beat(settings)
    out = switch_reads(settings, list(DOMAINS), domain, actor="t", dry_run=True)
    assert out.outcome == "dry_run"
    return {g.name: (g.passed, g.critical, g.why) for g in out.gates}


def failing(settings: Settings, domain: str = "data") -> list[str]:
    return [name for name, (ok, _c, _w) in dry(settings, domain).items() if not ok]


def _stale_verify(s: Settings) -> Callable[[], object]:
    commerce(s, "UPDATE cutover.verify_runs SET finished_at = finished_at - interval '20 minutes'")
    return lambda: verify_ok(s)


def _lag(s: Settings) -> Callable[[], object]:
    producer = Producer({"bootstrap.servers": s.kafka.bootstrap})
    for i in range(8):
        producer.produce(s.kafka.topic("data"), key=b"1", value=b"x%d" % i, partition=1)
    assert producer.flush(10) == 0

    def restore() -> None:
        commerce(
            s,
            "UPDATE cutover.consumer_offsets SET next_offset = 8 WHERE topic = %s AND "
            "kafka_partition = 1",
            [s.kafka.topic("data")],
        )

    return restore


def _dead_letter(s: Settings) -> Callable[[], object]:
    commerce(
        s,
        "INSERT INTO cutover.dead_letters (group_id, domain, topic, kafka_partition, kafka_offset,"
        " error_class, error_message) VALUES ('g', 'data', %s, 0, 42, 'UnmappableRow', 'bad')",
        [s.kafka.topic("data")],
    )
    return lambda: commerce(s, "UPDATE cutover.dead_letters SET status = 'resolved'")


def _heartbeat(s: Settings) -> Callable[[], object]:
    # The producer's row goes away (as if it never ran); dry() would otherwise write a fresh beat.
    legacy(s, "ALTER TABLE cutover.producer_state RENAME TO producer_state_gone")
    return lambda: legacy(s, "ALTER TABLE cutover.producer_state_gone RENAME TO producer_state")


def _slot(s: Settings) -> Callable[[], object]:
    drop_slot(s)
    return lambda: legacy(
        s, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [s.source.slot]
    )


def _capture(s: Settings) -> Callable[[], object]:
    pub = sql.Identifier(s.source.publication)
    legacy(s, sql.SQL("ALTER PUBLICATION {} DROP TABLE shop.users").format(pub))
    return lambda: legacy(
        s, sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, published_table("users"))
    )


BREAKERS: dict[str, tuple[Callable[[Settings], Callable[[], object]], bool, str]] = {
    "verify": (_stale_verify, False, "old; the limit is 15 min"),
    "apply_lag": (_lag, False, "8 events of"),
    "dead_letters": (_dead_letter, False, "1 open dead letters of data"),
    "producer_heartbeat": (_heartbeat, False, "no producer heartbeat"),
    "slot": (_slot, True, "does not exist"),
    "capture": (_capture, True, "capture of shop.users is blocked: the table left the publication"),
}


def test_all_gates_pass_on_a_healthy_pipeline(staged: Settings) -> None:
    verify_ok(staged)
    assert failing(staged) == []


@pytest.mark.parametrize("gate", list(BREAKERS))
def test_each_gate_blocks_on_its_own(staged: Settings, gate: str) -> None:
    verify_ok(staged)
    assert failing(staged) == []
    breaker, critical, why = BREAKERS[gate]
    restore = breaker(staged)
    try:
        gates = dry(staged) if gate != "producer_heartbeat" else _dry_no_beat(staged)
        assert [n for n, (ok, _c, _w) in gates.items() if not ok] == [gate]
        _ok, is_critical, text = gates[gate]
        assert is_critical is critical and why in text
        with pytest.raises(GateRefused) as refused:
            switch_reads(staged, list(DOMAINS), "data", actor="t", confirm=lambda _p: True)
        assert len(refused.value.failing) == 1 and refused.value.failing[0].startswith(gate)
        assert why in refused.value.message
        state = commerce(staged, "SELECT state FROM cutover.domain_state WHERE domain = 'data'")
        assert state == [("replicating",)]
    finally:
        restore()
    assert failing(staged) == [], "restore() must heal the gate"


def _dry_no_beat(settings: Settings) -> dict[str, tuple[bool, bool, str]]:
    out = switch_reads(settings, list(DOMAINS), "data", actor="t", dry_run=True)
    return {g.name: (g.passed, g.critical, g.why) for g in out.gates}


def test_switch_refused_while_a_difference_stands_allowed_after_the_fix(staged: Settings) -> None:
    domains = list(DOMAINS)
    commerce(staged, "UPDATE commerce.orders SET total_minor = total_minor + 5 WHERE order_id = 17")
    report = run_verify(staged, mapping(), domain="payment", actor="t", options=OPTIONS)
    assert not report.passed
    beat(staged)
    with pytest.raises(GateRefused) as refused:
        switch_reads(staged, domains, "payment", actor="sre-a", confirm=lambda _p: True)
    assert "verify: FAIL (critical)" in refused.value.message
    # a known difference cannot be forced away
    with pytest.raises(GateRefused):
        switch_reads(staged, domains, "payment", actor="sre-a", force=True, reason="hurry")
    # the fix, a new verify, and the switch goes through
    commerce(staged, "UPDATE commerce.orders SET total_minor = total_minor - 5 WHERE order_id = 17")
    verify_ok(staged, "payment")
    beat(staged)
    asked: list[str] = []

    def confirm(prompt: str) -> bool:
        asked.append(prompt)
        return True

    done = switch_reads(staged, domains, "payment", actor="sre-a", confirm=confirm)
    assert done.outcome == "done" and done.to_state == "reads_switched"
    assert asked and "payment" in asked[0]
    again = switch_reads(staged, domains, "payment", actor="sre-a")
    assert again.outcome == "noop"
    back = rollback(staged, domains, "payment", actor="sre-b")
    assert back.outcome == "done" and back.to_state == "replicating"
    conn = open_control(staged, domains)
    try:
        trail = [
            (e.actor, e.command, e.outcome, e.forced)
            for e in list_entries(conn, "cutover", domain="payment")
        ]
    finally:
        conn.close()
    assert trail == [
        ("sre-a", "switch-reads", "refused", False),
        ("sre-a", "switch-reads", "refused", True),
        ("sre-a", "switch-reads", "done", False),
        ("sre-a", "switch-reads", "noop", False),
        ("sre-b", "rollback", "done", False),
    ]


def test_force_overrides_a_non_critical_gate_and_is_audited(staged: Settings) -> None:
    domains = list(DOMAINS)
    verify_ok(staged, "merchant")
    beat(staged, age_s=3600)
    with pytest.raises(UsageError, match="--force needs --reason"):
        switch_reads(staged, domains, "merchant", actor="sre", force=True)
    with pytest.raises(GateRefused, match="producer_heartbeat"):
        switch_reads(staged, domains, "merchant", actor="sre")
    out = switch_reads(
        staged, domains, "merchant", actor="sre", force=True, reason="INC-42 producer restarting"
    )
    assert out.outcome == "done" and out.overridden == ("producer_heartbeat",)
    conn = open_control(staged, domains)
    try:
        last = list_entries(conn, "cutover", domain="merchant")[-1]
    finally:
        conn.close()
    assert last.forced and last.reason == "INC-42 producer restarting"
    hb = next(g for g in last.gates if g["gate"] == "producer_heartbeat")
    assert not hb["passed"] and hb["evidence"]["age_s"] >= 3600
    assert last.detail["overridden"] == ["producer_heartbeat"]
    beat(staged)
    assert rollback(staged, domains, "merchant", actor="sre").outcome == "done"


def test_a_missing_dead_letters_table_fails_the_gate(staged: Settings) -> None:
    """Fail closed: no table is no evidence that no letter is open (it used to count as 0)."""
    verify_ok(staged)
    commerce(staged, "ALTER TABLE cutover.dead_letters RENAME TO dead_letters_gone")
    try:
        gates = dry(staged)
        ok, critical, why = gates["dead_letters"]
        assert not ok and not critical
        assert "no cutover.dead_letters table" in why
        assert failing(staged) == ["dead_letters"]
    finally:
        commerce(staged, "ALTER TABLE cutover.dead_letters_gone RENAME TO dead_letters")
    assert failing(staged) == []


def test_a_switch_begun_before_the_slot_was_lost_does_not_complete_after(
    staged: Settings,
) -> None:
    """Resuming re-evaluates the gates: a critical failure since the intent refuses it, even
    forced; the way out is the rollback, which abandons the switch."""
    domains = list(DOMAINS)
    verify_ok(staged)
    beat(staged)
    with pytest.raises(CrashForTest):
        switch_reads(staged, domains, "data", actor="sre", crash_at="after_intent")
    assert commerce(staged, "SELECT state FROM cutover.domain_state WHERE domain = 'data'") == [
        ("switching_reads",)
    ]
    drop_slot(staged)
    try:
        beat(staged)
        with pytest.raises(GateRefused) as refused:
            switch_reads(staged, domains, "data", actor="sre", confirm=lambda _p: True)
        assert "slot: FAIL (critical)" in refused.value.message
        with pytest.raises(GateRefused):
            switch_reads(staged, domains, "data", actor="sre", force=True, reason="finish it")
        dry_out = switch_reads(staged, domains, "data", actor="sre", dry_run=True)
        assert not dry_out.allowed and dry_out.exit_code == 1
        assert commerce(staged, "SELECT state FROM cutover.domain_state WHERE domain = 'data'") == [
            ("switching_reads",)
        ]
        back = rollback(staged, domains, "data", actor="sre")
        assert back.outcome == "done" and back.to_state == "replicating"
    finally:
        legacy(
            staged,
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
            [staged.source.slot],
        )
    conn = open_control(staged, domains)
    try:
        trail = [(e.command, e.outcome) for e in list_entries(conn, "cutover", domain="data")][-4:]
    finally:
        conn.close()
    assert trail == [
        ("switch-reads", "refused"),
        ("switch-reads", "refused"),
        ("switch-reads", "dry_run"),
        ("rollback", "done"),
    ]


def test_a_resumed_switch_completes_when_the_gates_still_hold(staged: Settings) -> None:
    domains = list(DOMAINS)
    verify_ok(staged, "merchant")
    beat(staged)
    with pytest.raises(CrashForTest):
        switch_reads(staged, domains, "merchant", actor="sre", crash_at="after_intent")
    # a non-critical failure since the intent does not block the resume (it was accepted then)
    beat(staged, age_s=3600)
    out = switch_reads(staged, domains, "merchant", actor="sre")
    assert out.outcome == "resumed" and out.to_state == "reads_switched"
    assert [g.name for g in out.gates if not g.passed] == ["producer_heartbeat"]
    beat(staged)
    assert rollback(staged, domains, "merchant", actor="sre").outcome == "done"
