"""The write cutover's control plane on the real stack, with a staged pipeline (no producer or
applier processes: their evidence is staged the way they leave it, like test_cutover_flow).

* the lifecycle of one domain: reads_switched → writes_switched → reads_switched
  (rollback-writes) → writes_switched → completed, the fences and the router following it;
* a stray write to fenced legacy is refused (SQLSTATE 25006) and leaves nothing behind;
* a crash at each step of switch-writes: the state never has both sides writable while readers
  follow writes_switched, and the next command (switch-writes again, or rollback-writes) resumes
  or undoes it;
* a failing step before the publication (the final verify finds a difference, the appliers do
  not reach the fence) lowers the fence and leaves the domain in reads_switched;
* completing the last domain drops the forward slot and publication.

Until the `reverse` helper's producer is on main, the reverse evidence is staged as a reverse
producer and applier would leave it: the reverse slot on commerce (pgoutput), its heartbeat
through the control store's producer-state functions, the reverse appliers' offsets in legacy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql

from control import write_switch
from control.machine import CrashPoint
from control.state import (
    CrashForTest,
    complete,
    load_states,
    open_control,
    rollback,
    rollback_writes,
    status_report,
    switch_reads,
    switch_writes,
)
from control.verify import VerifyOptions, run_verify
from control.write_switch import LEGACY_FENCE_SCHEMA, install_fences
from cutover import fence
from cutover.config import GateSettings, ReverseSettings, Settings
from cutover.control_store import COMMERCE_WRITES, ControlStore
from cutover.control_store import producer as producer_state
from cutover.errors import GateRefused, RuntimeFailure, VerifyMismatch
from cutover.routing import ReadRouter
from tests.integration.test_verify_support import (
    DOMAINS,
    PARTITIONS,
    beat,
    commerce,
    create_topics,
    legacy,
    mapping,
    scratch_pair,
    seed,
    stage_pipeline,
)

pytestmark = pytest.mark.integration

WEIGHTS = {"payment": 60, "data": 20, "merchant": 20}
FAR = 1 << 60  # a position past any fence LSN: "the appliers are caught up"
GATES = GateSettings(min_reads_soak_minutes=0, min_writes_soak_minutes=0)


def _reverse_topics(settings: Settings) -> list[str]:
    return [settings.kafka.reverse_topic(d) for d in DOMAINS]


def stage_reverse(settings: Settings) -> None:
    """What `cutover init` + `produce --reverse` + `apply --reverse` leave (see module doc)."""
    rev = settings.reverse
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [rev.slot])
        store = ControlStore(conn, settings.target.control_schema, "target")
        store.ensure("producer")
        producer_state.record_position(store, rev.slot, rev.publication, FAR, "test-reverse")
        conn.execute(
            sql.SQL(
                "CREATE PUBLICATION {} FOR TABLE commerce.customers, commerce.sellers, "
                "commerce.listings"
            ).format(sql.Identifier(rev.publication))
        )
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        ControlStore(conn, rev.control_schema, "source").ensure("consumer")
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap})
    new = [
        NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
        for t in _reverse_topics(settings)
    ]
    for fut in admin.create_topics(new, operation_timeout=30).values():
        fut.result(timeout=30)
    reverse_applied(settings, FAR)


def reverse_applied(settings: Settings, lsn: int) -> None:
    """The reverse appliers' positions in legacy (every partition at ``lsn``)."""
    rev = settings.reverse
    for d in DOMAINS:
        for p in range(PARTITIONS):
            legacy(
                settings,
                "INSERT INTO cutover.consumer_offsets (group_id, topic, kafka_partition, "
                "next_offset, last_source_lsn) VALUES (%s, %s, %s, 0, %s) ON CONFLICT "
                "(group_id, topic, kafka_partition) DO UPDATE SET last_source_lsn = "
                "EXCLUDED.last_source_lsn",
                [rev.group_id, settings.kafka.reverse_topic(d), p, lsn],
            )


def forward_delivered(settings: Settings, lsn: int) -> None:
    """The forward producer delivered (and, topics empty, the appliers applied) up to ``lsn``."""
    beat(settings)
    legacy(
        settings,
        "UPDATE cutover.producer_state SET delivered_lsn = %s WHERE slot_name = %s",
        [lsn, settings.source.slot],
    )


def unstage(settings: Settings) -> None:
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            [settings.reverse.slot],
        )
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap})
    for fut in admin.delete_topics(_reverse_topics(settings), operation_timeout=30).values():
        with suppress(Exception):
            fut.result(timeout=30)


@pytest.fixture(scope="module")
def staged(source_dsn: str, target_dsn: str, kafka_bootstrap: str) -> Iterator[Settings]:
    with scratch_pair(source_dsn, target_dsn, kafka_bootstrap, gates=GATES) as base:
        tag = base.source.slot.rsplit("_", 1)[-1]
        settings = replace(base, reverse=ReverseSettings(slot=f"vt_rev_{tag}"))
        seed(settings, orders=100)
        create_topics(settings)
        stage_pipeline(settings)
        install_fences(settings, mapping())
        stage_reverse(settings)
        forward_delivered(settings, FAR)
        report = run_verify(
            settings, mapping(), actor="t", options=VerifyOptions(recheck_timeout_s=5)
        )
        assert report.passed
        for d in DOMAINS:
            switch_reads(settings, list(DOMAINS), d, actor="t")
        try:
            yield settings
        finally:
            unstage(settings)


@pytest.fixture(autouse=True)
def heartbeats(staged: Settings) -> None:
    """Both producers "alive": the staged heartbeats are fresh at the start of every test."""
    forward_delivered(staged, FAR)
    rev = staged.reverse
    with psycopg.connect(staged.target.dsn, autocommit=True) as conn:
        store = ControlStore(conn, staged.target.control_schema, "target")
        producer_state.record_position(store, rev.slot, rev.publication, FAR, "test-reverse")


def fences(settings: Settings, domain: str) -> tuple[bool, bool]:
    """(legacy fenced, commerce fenced) for ``domain``."""
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        on_legacy = fence.fence_states(conn, LEGACY_FENCE_SCHEMA, side="source")[domain]
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        on_commerce = fence.fence_states(conn, "cutover", side="target")[domain]
    return on_legacy.fenced, on_commerce.fenced


def state_of(settings: Settings, domain: str) -> tuple[str, str]:
    """(state, effective state) of ``domain``."""
    conn = open_control(settings, list(DOMAINS))
    try:
        st = load_states(conn, "cutover")[domain]
    finally:
        conn.close()
    return st.state, st.effective()[0]


def assert_never_two_writable(settings: Settings, domain: str) -> None:
    """While readers follow a state where commerce takes the writes, legacy is fenced."""
    _state, effective = state_of(settings, domain)
    legacy_fenced, commerce_fenced = fences(settings, domain)
    if effective in COMMERCE_WRITES:
        assert legacy_fenced or commerce_fenced, (domain, effective)


def stray_write_is_refused(settings: Settings, state: str = "writes_switched") -> None:
    """A writer that missed the switch writes to legacy's fenced `data` table: refused, the
    refusal naming the state the domain reached."""
    before = legacy(settings, "SELECT count(*) FROM shop.users")[0][0]
    with psycopg.connect(settings.source.dsn) as app:
        with pytest.raises(psycopg.Error) as caught:
            app.execute(
                "INSERT INTO shop.users (id, handle, display_name, email, phone, "
                "follower_count, bio, created_at, updated_at) VALUES "
                "(999999, 'stray', 'n', 'e', 'p', 0, 'b', now(), now())"
            )
        app.rollback()
    assert caught.value.sqlstate == "25006" and fence.is_fence_refusal(caught.value)
    assert "data" in str(caught.value) and f"(state {state})" in str(caught.value)
    assert legacy(settings, "SELECT count(*) FROM shop.users")[0][0] == before


def test_lifecycle_of_one_domain(staged: Settings) -> None:
    domains = list(DOMAINS)
    router = ReadRouter(staged, "data", mode="table").start()
    try:
        assert router.write_database_for("data") == "legacy"
        dry = switch_writes(staged, domains, "data", actor="sre", dry_run=True)
        assert dry.outcome == "dry_run" and dry.allowed, [g.line() for g in dry.gates]
        assert fences(staged, "data") == (False, False)  # a dry run changes nothing

        out = switch_writes(staged, domains, "data", actor="sre")
        assert out.outcome == "done" and out.to_state == "writes_switched"
        assert isinstance(out.detail["window_ms"], int) and out.detail["window_ms"] >= 0
        assert out.to_json()["window_ms"] == out.detail["window_ms"]
        assert fences(staged, "data") == (True, False)
        assert router.wait_for("data", "writes_switched", 2.0)
        assert router.write_database_for("data") == "commerce"
        stray_write_is_refused(staged)
        audit = commerce(
            staged,
            "SELECT detail FROM cutover.audit WHERE command = 'switch-writes' AND outcome = 'done'"
            " ORDER BY audit_id DESC LIMIT 1",
        )
        assert audit[0][0]["window_ms"] == out.detail["window_ms"]

        report = status_report(staged, WEIGHTS, with_gates=False)
        assert report["writes_on_commerce"] == 1 and report["completed"] == 0

        with pytest.raises(GateRefused, match="rollback-writes data"):
            rollback(staged, domains, "data", actor="sre")

        back = rollback_writes(staged, domains, "data", actor="sre")
        assert back.outcome == "done" and back.to_state == "reads_switched"
        assert "window_ms" in back.detail
        assert fences(staged, "data") == (False, True)  # commerce closed, legacy open
        assert router.wait_for("data", "reads_switched", 2.0)
        assert router.write_database_for("data") == "legacy"

        again = switch_writes(staged, domains, "data", actor="sre")
        assert again.outcome == "done" and fences(staged, "data") == (True, False)

        done = complete(staged, domains, "data", actor="sre")
        assert done.outcome == "done" and done.to_state == "completed"
        # The reverse stream of data stops: its commerce table leaves the reverse publication.
        assert done.detail["unpublished"] == ["commerce.customers"]
        published = commerce(
            staged,
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1",
            [staged.reverse.publication],
        )
        assert [r[0] for r in published] == ["listings", "sellers"]
        assert fences(staged, "data") == (True, False)  # legacy read-only for good
        stray_write_is_refused(staged, "completed")
        assert router.wait_for("data", "completed", 2.0)
        assert router.write_database_for("data") == "commerce"
        report = status_report(staged, WEIGHTS, with_gates=False)
        assert report["writes_on_commerce"] == 1 and report["completed"] == 1
        with pytest.raises(GateRefused, match="completed"):
            rollback_writes(staged, domains, "data", actor="sre")
    finally:
        router.close()


STEPS: tuple[CrashPoint, ...] = (
    "after_intent",
    "after_fence",
    "after_drain",
    "after_verify",
    "after_reverse",
    "after_open",
    "after_publish",
)


@pytest.mark.parametrize("crash_at", STEPS)
@pytest.mark.parametrize("then", ["resume", "undo"])
def test_a_crash_at_each_step_of_switch_writes(staged: Settings, crash_at: str, then: str) -> None:
    domains, d = list(DOMAINS), "merchant"
    assert state_of(staged, d) == ("reads_switched", "reads_switched")
    with pytest.raises(CrashForTest):
        switch_writes(staged, domains, d, actor="sre", crash_at=crash_at)  # type: ignore[arg-type]
    state, effective = state_of(staged, d)
    assert state == "switching_writes"
    # Readers follow writes_switched only once it is published (after every step).
    assert effective == ("writes_switched" if crash_at == "after_publish" else "reads_switched")
    assert_never_two_writable(staged, d)
    if crash_at != "after_intent":
        assert fences(staged, d)[0], "legacy is fenced from step 1 on"
    if then == "resume":
        out = switch_writes(staged, domains, d, actor="sre")
        assert out.outcome == "resumed" and state_of(staged, d)[0] == "writes_switched"
        assert fences(staged, d) == (True, False)
        assert_never_two_writable(staged, d)
        back = rollback_writes(staged, domains, d, actor="sre")
        assert back.outcome == "done"
    else:
        back = rollback_writes(staged, domains, d, actor="sre")
        assert back.outcome == "done"
    assert state_of(staged, d) == ("reads_switched", "reads_switched")
    assert not fences(staged, d)[0], "legacy takes the writes again"
    assert_never_two_writable(staged, d)


def test_a_failed_final_verify_unfences_legacy_and_names_the_step(staged: Settings) -> None:
    domains, d = list(DOMAINS), "merchant"
    # A change the forward pipeline never carried (none runs here): commerce now differs.
    tamper = (
        "UPDATE shop.merchants SET shop_name = shop_name || %s "
        "WHERE id = (SELECT min(id) FROM shop.merchants)"
    )
    legacy(staged, tamper, ["x"])
    try:
        with pytest.raises(VerifyMismatch, match="step verify") as caught:
            switch_writes(staged, domains, d, actor="sre")
        assert caught.value.exit_code == 1
    finally:
        legacy(
            staged,
            "UPDATE shop.merchants SET shop_name = left(shop_name, -1) "
            "WHERE id = (SELECT min(id) FROM shop.merchants)",
        )
        # The gates of the next switch ask for a passing verify again.
        assert run_verify(staged, mapping(), domain=d, actor="t").passed
    assert state_of(staged, d) == ("reads_switched", "reads_switched")
    assert not fences(staged, d)[0]
    rows = commerce(
        staged,
        "SELECT status, step_detail->>'abandoned' FROM cutover.transitions WHERE domain = %s "
        "AND action = 'switch_writes' ORDER BY created_at DESC LIMIT 1",
        [d],
    )
    assert rows[0][0] == "abandoned" and "verify" in rows[0][1]


def test_appliers_not_reaching_the_fence_time_out_and_undo(
    staged: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    domains, d = list(DOMAINS), "merchant"
    monkeypatch.setattr(write_switch, "DRAIN_TIMEOUT_S", 1.0)
    forward_delivered(staged, 0)
    try:
        with pytest.raises(RuntimeFailure, match=r"step drain_forward.*is `cutover apply` running"):
            switch_writes(staged, domains, d, actor="sre")
    finally:
        forward_delivered(staged, FAR)
    assert state_of(staged, d) == ("reads_switched", "reads_switched")
    assert not fences(staged, d)[0]


def test_switch_writes_is_refused_without_a_reverse_path(staged: Settings) -> None:
    domains, d = list(DOMAINS), "merchant"
    commerce(
        staged,
        "UPDATE cutover.producer_state SET heartbeat_at = now() - interval '1 hour' "
        "WHERE slot_name = %s",
        [staged.reverse.slot],
    )
    try:
        with pytest.raises(GateRefused, match="reverse_path"):
            switch_writes(staged, domains, d, actor="sre")
    finally:
        commerce(
            staged,
            "UPDATE cutover.producer_state SET heartbeat_at = now() WHERE slot_name = %s",
            [staged.reverse.slot],
        )
    assert state_of(staged, d)[0] == "reads_switched" and not fences(staged, d)[0]
    with pytest.raises(GateRefused, match="switch-writes"):
        complete(staged, domains, d, actor="sre")


def test_completing_the_last_domain_drops_the_forward_slot(staged: Settings) -> None:
    domains = list(DOMAINS)
    for d in domains:
        if state_of(staged, d)[0] == "reads_switched":
            switch_writes(staged, domains, d, actor="sre")
        if state_of(staged, d)[0] == "writes_switched":
            out = complete(staged, domains, d, actor="sre")
            last = d == domains[-1]
            assert ("dropped_forward" in out.detail) is last, out.detail
    slots = legacy(
        staged, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [staged.source.slot]
    )
    pubs = legacy(
        staged, "SELECT 1 FROM pg_publication WHERE pubname = %s", [staged.source.publication]
    )
    assert not slots and not pubs
    report: dict[str, Any] = status_report(staged, WEIGHTS, with_gates=False)
    assert report["completed"] == 3 and report["progress_percent"] == 100


OLD_CONTROL_TABLES = """
CREATE SCHEMA old;
CREATE TABLE old.domain_state (
    domain text PRIMARY KEY,
    state text NOT NULL DEFAULT 'replicating'
          CHECK (state IN ('replicating', 'switching_reads', 'reads_switched',
                           'rolling_back', 'writes_switched')),
    version bigint NOT NULL DEFAULT 0,
    changed_at timestamptz NOT NULL DEFAULT now(),
    actor text,
    transition_id uuid
);
CREATE TABLE old.transitions (
    transition_id uuid PRIMARY KEY,
    domain text NOT NULL,
    action text NOT NULL CHECK (action IN ('switch_reads', 'rollback')),
    from_state text NOT NULL,
    to_state text NOT NULL,
    version bigint NOT NULL,
    status text NOT NULL DEFAULT 'intent'
           CHECK (status IN ('intent', 'published', 'done', 'abandoned')),
    actor text NOT NULL,
    reason text,
    forced boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    done_at timestamptz
);
INSERT INTO old.domain_state (domain) VALUES ('payment');
"""


def test_control_tables_of_an_older_version_take_the_new_states(fresh_commerce: str) -> None:
    with psycopg.connect(fresh_commerce, autocommit=True) as conn:
        conn.execute(OLD_CONTROL_TABLES)
        for _ in range(2):  # idempotent
            ControlStore(conn, "old", "target").ensure("commands")
        conn.execute("UPDATE old.domain_state SET state = 'completed'")
        conn.execute(
            "INSERT INTO old.transitions (transition_id, domain, action, from_state, to_state, "
            "version, actor, step) VALUES (gen_random_uuid(), 'payment', 'complete', "
            "'writes_switched', 'completed', 1, 't', 'fence_legacy')"
        )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE old.domain_state SET state = 'nonsense'")
