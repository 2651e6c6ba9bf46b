"""The cutover state machine of each domain (DESIGN §6), its control tables, and its transitions.

States::

    replicating ──switch-reads──▶ switching_reads ──▶ reads_switched
         ▲                                                  │
         └──────────── replicating ◀── rolling_back ◀──rollback
    (writes_switched: reserved for the next version; nothing enters it yet)

``switching_reads`` and ``rolling_back`` are in-flight states: a transition was decided (the
intent is written) and is being carried out. Every transition runs the same protocol, whose
steps are numbered where they happen (:func:`execute`):

1. **intent**: in one commerce transaction, lock the domain's row, decide with the pure
   :func:`plan`, insert the ``transitions`` row (status ``intent``, version = current + 1) and set
   the domain to the in-flight state naming it;
2. **publish** the target state to the compacted control topic (key = domain, value JSON
   ``{domain, state, version, changed_at, actor, transition_id}``), wait for the acknowledgement,
   then mark the transition ``published``;
3. **done**: set the domain to the target state and the transition ``done``.

A crash between two steps leaves a row that :func:`explain` describes and that re-running the same
command resumes (publishing the same version twice is harmless: readers order by version). A
rollback of an unfinished switch abandons the switch's transition.

Readers (:mod:`cutover.routing`) see the *effective* state (:meth:`DomainState.effective`): the
target of a transition once it is published, the state it started from before that; so routers
following the topic and routers polling the table agree.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeAlias

import psycopg
from psycopg import sql

from control.gates import GateResult, collect, decide, evaluate
from cutover.config import Settings
from cutover.control_store import (
    COMMERCE_READS,
    IN_FLIGHT,
    READS_SWITCHED,
    REPLICATING,
    ROLLING_BACK,
    STABLE,
    STATES,
    SWITCHING_READS,
    WRITES_SWITCHED,
    Conn,
    DomainState,
    control_plane_ddl,
    db_error,
    ensure_control_plane,
    ensure_domains,
    load_states,
    qualified,
)
from cutover.errors import DatabaseError, GateRefused, KafkaError, UsageError
from cutover.logging import get_logger

__all__ = [
    "COMMERCE_READS",
    "IN_FLIGHT",
    "STABLE",
    "STATES",
    "Action",
    "CommandOutcome",
    "CrashForTest",
    "DomainState",
    "KafkaPublisher",
    "Plan",
    "Publisher",
    "TransitionResult",
    "control_plane_ddl",
    "ensure_control_plane",
    "ensure_domains",
    "execute",
    "explain",
    "load_states",
    "open_control",
    "plan",
    "progress",
    "rollback",
    "rollback_sanity",
    "state_message",
    "status_report",
    "switch_reads",
]

log = get_logger("control.state")

Action: TypeAlias = Literal["switch_reads", "rollback"]


# ---------------------------------------------------------------------------------------------
# Control plane DDL
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The pure state machine
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What a command does from the current state.

    ``kind``: ``start`` a new transition (``abandon`` names an unfinished one it replaces),
    ``resume`` the in-flight one, ``noop`` (already there), or ``refuse`` (``why`` says why).
    """

    kind: Literal["start", "resume", "noop", "refuse"]
    action: Action
    from_state: str
    via: str | None = None  # the in-flight state
    to_state: str | None = None
    why: str = ""
    abandon: str | None = None


def plan(current: DomainState, action: Action) -> Plan:
    """Decide what ``action`` does from ``current`` (pure; the table in the module doc)."""
    s = current.state
    d = current.domain
    if action == "switch_reads":
        if s == REPLICATING:
            return Plan("start", action, s, SWITCHING_READS, READS_SWITCHED)
        if s == SWITCHING_READS:
            return Plan(
                "resume", action, current.from_state or REPLICATING, SWITCHING_READS, READS_SWITCHED
            )
        if s == READS_SWITCHED:
            return Plan("noop", action, s, why=f"reads of {d} are already switched to commerce")
        if s == ROLLING_BACK:
            return Plan(
                "refuse",
                action,
                s,
                why=f"a rollback of {d} is in progress: run `cutover rollback {d}` to finish it "
                "first",
            )
        return Plan("refuse", action, s, why=f"{d} is in state {s}; switch-reads does not apply")
    if s == READS_SWITCHED:
        return Plan("start", action, s, ROLLING_BACK, REPLICATING)
    if s == ROLLING_BACK:
        return Plan(
            "resume", action, current.from_state or READS_SWITCHED, ROLLING_BACK, REPLICATING
        )
    if s == SWITCHING_READS:
        # Abort a switch that did not finish: readers may already follow it (if published), so
        # the way back is a new, higher version saying replicating.
        return Plan(
            "start",
            action,
            s,
            ROLLING_BACK,
            REPLICATING,
            why="abandons the unfinished switch",
            abandon=current.transition_id,
        )
    if s == REPLICATING:
        return Plan("noop", action, s, why=f"{d} is already replicating (reads on legacy)")
    return Plan(
        "refuse",
        action,
        s,
        why=f"{d} is in state {s}; rolling back writes is not supported by this version",
    )


def progress(states: Mapping[str, str], weights: Mapping[str, int]) -> int:
    """Migration progress in percent: Σ weight of the domains whose reads commerce serves."""
    return sum(w for d, w in weights.items() if states.get(d) in COMMERCE_READS)


def explain(state: DomainState) -> str:
    """A sentence for ``status``: what the state means and, in flight, how to finish it."""
    d = state.domain
    if state.state == REPLICATING:
        return "legacy serves reads; CDC keeps commerce in sync"
    if state.state == READS_SWITCHED:
        return "commerce serves reads; CDC keeps commerce in sync"
    if state.state == WRITES_SWITCHED:
        return "commerce serves reads and writes"
    command = "switch-reads" if state.state == SWITCHING_READS else "rollback"
    when = (
        state.transition_created_at.isoformat(timespec="seconds")
        if state.transition_created_at
        else "?"
    )
    if state.published:
        seen = (
            f"published: routers already follow {state.to_state} (version {state.pending_version})"
        )
    else:
        seen = f"not yet published: routers still follow {state.from_state}"
    hint = f"run `cutover {command} {d}` to complete it"
    if state.state == SWITCHING_READS:
        hint += f", or `cutover rollback {d}` to abandon it"
    return (
        f"transition {state.transition_id} ({state.from_state} -> {state.to_state}) started "
        f"{when} by {state.actor or '?'} did not finish; {seen}; {hint}"
    )


# ---------------------------------------------------------------------------------------------
# Reading the state
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Publishing to the control topic
# ---------------------------------------------------------------------------------------------


class Publisher(Protocol):
    """Publishes a domain's state to the control topic and waits for the acknowledgement."""

    def publish(self, domain: str, value: Mapping[str, object]) -> None: ...


class KafkaPublisher:
    """Publishes to ``settings.kafka.control_topic`` (idempotent producer, acks=all).

    Creates the topic (compacted, 1 partition) when it is missing, so a switch never depends on a
    broker's auto-creation defaults (which would not compact).
    """

    def __init__(self, settings: Settings, timeout_s: float = 15.0) -> None:
        from confluent_kafka import Producer

        self.settings = settings
        self.topic = settings.kafka.control_topic
        self.timeout_s = timeout_s
        conf: dict[str, object] = {
            **settings.kafka.producer,
            "bootstrap.servers": settings.kafka.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": int(timeout_s * 1000),
        }
        self._producer = Producer(conf)
        self._checked = False

    def _ensure_topic(self) -> None:
        if self._checked:
            return
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        admin = AdminClient(
            {**self.settings.kafka.producer, "bootstrap.servers": self.settings.kafka.bootstrap}
        )
        meta = admin.list_topics(timeout=self.timeout_s)
        if self.topic not in meta.topics:
            futures = admin.create_topics(
                [
                    NewTopic(
                        self.topic,
                        num_partitions=1,
                        replication_factor=self.settings.kafka.replication_factor,
                        config={"cleanup.policy": "compact"},
                    )
                ]
            )
            for fut in futures.values():
                try:
                    fut.result()
                except Exception as exc:  # already created by a concurrent run is fine
                    if "TOPIC_ALREADY_EXISTS" not in str(exc):
                        raise
        self._checked = True

    def publish(self, domain: str, value: Mapping[str, object]) -> None:
        try:
            self._ensure_topic()
        except Exception as exc:
            raise KafkaError(f"creating control topic {self.topic}: {exc}") from None
        errors: list[str] = []
        done = threading.Event()

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            done.set()

        self._producer.produce(
            self.topic,
            key=domain.encode(),
            value=json.dumps(dict(value), sort_keys=True).encode(),
            partition=0,
            on_delivery=on_delivery,
        )
        remaining = self._producer.flush(self.timeout_s)
        if remaining or not done.is_set():
            raise KafkaError(
                f"control topic {self.topic}: the state of {domain} was not acknowledged within "
                f"{self.timeout_s:g} s"
            )
        if errors:
            raise KafkaError(f"control topic {self.topic}: publishing {domain}: {errors[0]}")


def state_message(
    *, domain: str, state: str, version: int, actor: str, transition_id: str, changed_at: datetime
) -> dict[str, object]:
    """The control-topic value (also what routers parse)."""
    return {
        "domain": domain,
        "state": state,
        "version": version,
        "changed_at": changed_at.astimezone(UTC).isoformat(),
        "actor": actor,
        "transition_id": transition_id,
    }


# ---------------------------------------------------------------------------------------------
# Executing a transition
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransitionResult:
    """How :func:`execute` ended."""

    outcome: Literal["done", "resumed", "noop"]
    domain: str
    from_state: str
    to_state: str
    version: int
    transition_id: str | None
    message: str


class CrashForTest(Exception):
    """Raised at a named crash point (``crash_at``) to simulate a kill in fault tests."""


CrashPoint: TypeAlias = Literal["after_intent", "after_publish"] | None


def execute(
    conn: Conn,
    settings: Settings,
    domain: str,
    action: Action,
    *,
    actor: str,
    publisher: Publisher,
    reason: str | None = None,
    forced: bool = False,
    on_intent: Callable[[Plan, DomainState], None] | None = None,
    crash_at: CrashPoint = None,
) -> TransitionResult:
    """Run (or resume) ``action`` on ``domain`` through steps 1-3 of the module doc.

    ``on_intent`` is called inside step 1's transaction once the plan is known (the caller
    refuses there by raising; nothing is written then). Raises :class:`UsageError` when the plan
    refuses, :class:`KafkaError` when publishing fails (the intent stays: re-run to complete).
    """
    schema = settings.target.control_schema
    # (1) intent, under the domain row's lock
    try:
        with conn.transaction():
            current = load_states(conn, schema, lock_domain=domain).get(domain)
            if current is None:
                raise UsageError(f"unknown domain {domain!r}")
            decided = plan(current, action)
            if on_intent is not None:
                on_intent(decided, current)
            if decided.kind == "refuse":
                raise UsageError(decided.why)
            if decided.kind == "noop":
                return TransitionResult(
                    "noop", domain, current.state, current.state, current.version, None, decided.why
                )
            if decided.kind == "resume":
                transition_id = current.transition_id
                assert transition_id is not None and current.pending_version is not None
                version = current.pending_version
                to_state = decided.to_state or current.to_state or ""
                changed_at = current.transition_created_at or datetime.now(UTC)
                t_actor = current.actor or actor
            else:
                transition_id = str(uuid.uuid4())
                version = max(current.version, current.pending_version or 0) + 1
                to_state = decided.to_state or ""
                changed_at = datetime.now(UTC)
                t_actor = actor
                if decided.abandon is not None:
                    conn.execute(
                        sql.SQL(
                            "UPDATE {} SET status = 'abandoned', done_at = now() "
                            "WHERE transition_id = %s AND status IN ('intent', 'published')"
                        ).format(qualified(schema, "transitions")),
                        [decided.abandon],
                    )
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (transition_id, domain, action, from_state, to_state, "
                        "version, actor, reason, forced, created_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ).format(qualified(schema, "transitions")),
                    [
                        transition_id,
                        domain,
                        action,
                        _stable_from(current, decided),
                        to_state,
                        version,
                        actor,
                        reason,
                        forced,
                        changed_at,
                    ],
                )
                conn.execute(
                    sql.SQL(
                        "UPDATE {} SET state = %s, transition_id = %s, actor = %s WHERE domain = %s"
                    ).format(qualified(schema, "domain_state")),
                    [decided.via, transition_id, actor, domain],
                )
    except psycopg.Error as exc:
        raise db_error(exc, f"writing the {action} intent of {domain}") from None
    log.info(
        "cutover.transition_intent",
        domain=domain,
        action=action,
        transition_id=transition_id,
        version=version,
        resumed=decided.kind == "resume",
    )
    if crash_at == "after_intent":
        raise CrashForTest("after_intent")
    # (2) publish the target state, then record that it was acknowledged
    publisher.publish(
        domain,
        state_message(
            domain=domain,
            state=to_state,
            version=version,
            actor=t_actor,
            transition_id=transition_id,
            changed_at=changed_at,
        ),
    )
    try:
        conn.execute(
            sql.SQL(
                "UPDATE {} SET status = 'published', published_at = COALESCE(published_at, now()) "
                "WHERE transition_id = %s AND status = 'intent'"
            ).format(qualified(schema, "transitions")),
            [transition_id],
        )
    except psycopg.Error as exc:
        raise db_error(exc, f"recording the publication of {domain}'s state") from None
    if crash_at == "after_publish":
        raise CrashForTest("after_publish")
    # (3) done: the domain is in the target state
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET state = %s, version = %s, changed_at = now(), actor = %s, "
                    "transition_id = NULL WHERE domain = %s AND transition_id = %s"
                ).format(qualified(schema, "domain_state")),
                [to_state, version, t_actor, domain, transition_id],
            )
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET status = 'done', done_at = now() WHERE transition_id = %s"
                ).format(qualified(schema, "transitions")),
                [transition_id],
            )
    except psycopg.Error as exc:
        raise db_error(exc, f"completing the {action} of {domain}") from None
    event = "cutover.reads_switched" if to_state == READS_SWITCHED else "cutover.rolled_back"
    log.info(event, domain=domain, version=version, transition_id=transition_id, actor=t_actor)
    outcome: Literal["done", "resumed"] = "resumed" if decided.kind == "resume" else "done"
    return TransitionResult(
        outcome,
        domain,
        decided.from_state,
        to_state,
        version,
        transition_id,
        f"{domain}: {decided.from_state} -> {to_state} (version {version})",
    )


def _stable_from(current: DomainState, decided: Plan) -> str:
    """The state readers follow before the new transition is published (its ``from_state``)."""
    if current.in_flight:
        return current.effective()[0]
    return decided.from_state


# ---------------------------------------------------------------------------------------------
# The commands' cores: switch-reads, rollback, status
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """How switch-reads or rollback ended (``refused`` raises GateRefused instead)."""

    command: str
    domain: str
    outcome: Literal["done", "resumed", "noop", "dry_run", "cancelled"]
    message: str
    from_state: str
    to_state: str | None = None
    version: int | None = None
    transition_id: str | None = None
    gates: tuple[GateResult, ...] = ()
    allowed: bool = True
    forced: bool = False
    overridden: tuple[str, ...] = ()
    audit_id: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when done, resumed, already there, or a dry run that would go ahead; else 1."""
        if self.outcome == "cancelled":
            return 1
        if self.outcome == "dry_run":
            return 0 if self.allowed else 1
        return 0

    def to_json(self) -> dict[str, object]:
        return {
            "command": self.command,
            "domain": self.domain,
            "outcome": self.outcome,
            "message": self.message,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "version": self.version,
            "transition_id": self.transition_id,
            "allowed": self.allowed,
            "forced": self.forced,
            "overridden": list(self.overridden),
            "gates": [g.to_json() for g in self.gates],
            "audit_id": self.audit_id,
        }


def _control_conn(settings: Settings) -> Conn:
    try:
        conn = psycopg.connect(
            settings.target.dsn, autocommit=True, connect_timeout=10, application_name="cutover"
        )
    except psycopg.Error as exc:
        raise db_error(exc, "connecting to the commerce database") from None
    return conn


def open_control(settings: Settings, domains: Sequence[str]) -> Conn:
    """A commerce connection with the control plane created and every domain initialised."""
    conn = _control_conn(settings)
    try:
        ensure_control_plane(conn, settings.target.control_schema)
        ensure_domains(conn, settings.target.control_schema, domains)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_domain(domains: Sequence[str], domain: str) -> None:
    if domain not in domains:
        raise UsageError(f"unknown domain {domain!r}; the mapping declares: {', '.join(domains)}")


def _transition_command(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    action: Action,
    *,
    actor: str,
    gate_results: Callable[[], list[GateResult]],
    dry_run: bool,
    force: bool,
    reason: str | None,
    confirm: Callable[[str], bool] | None,
    publisher: Publisher | None,
    crash_at: CrashPoint,
) -> CommandOutcome:
    """The shared flow of switch-reads and rollback: plan, gates, confirm, execute, audit."""
    from control import audit

    command = "switch-reads" if action == "switch_reads" else "rollback"
    _check_domain(domains, domain)
    if force and not (reason and reason.strip()):
        raise UsageError("--force needs --reason TEXT: the override is audited with it")
    schema = settings.target.control_schema
    conn = open_control(settings, domains)
    try:

        def write_audit(outcome: str, **kw: Any) -> int:
            return audit.record(
                conn, schema, actor=actor, command=command, domain=domain, outcome=outcome, **kw
            )

        current = load_states(conn, schema)[domain]
        decided = plan(current, action)
        if decided.kind == "noop":
            audit_id = write_audit("noop", from_state=current.state, detail={"why": decided.why})
            return CommandOutcome(
                command,
                domain,
                "noop",
                decided.why,
                current.state,
                current.state,
                current.version,
                audit_id=audit_id,
            )
        if decided.kind == "refuse":
            write_audit("refused", from_state=current.state, detail={"why": decided.why})
            raise GateRefused(
                f"{command} {domain} refused: {decided.why}", [f"state: {decided.why}"]
            )
        # A resumed transition was gated when its intent was written: completing it is not a
        # new decision, so the gates are not evaluated again (the audit says so).
        results = [] if decided.kind == "resume" else gate_results()
        decision = decide(results, force=force)
        gates_json = [g.to_json() for g in results]
        overridden = tuple(g.name for g in decision.overridden)
        if dry_run:
            verb = "would resume" if decided.kind == "resume" else "would go ahead"
            msg = (
                f"dry run: {command} {domain} {verb}"
                if decision.allowed
                else decision.refusal(domain, command).replace("refused", "would be refused", 1)
            )
            audit_id = write_audit(
                "dry_run",
                from_state=current.state,
                to_state=decided.to_state,
                gates=gates_json,
                forced=force,
                reason=reason,
                detail={"allowed": decision.allowed, "overridden": list(overridden)},
            )
            return CommandOutcome(
                command,
                domain,
                "dry_run",
                msg,
                current.state,
                decided.to_state,
                gates=tuple(results),
                allowed=decision.allowed,
                forced=force,
                overridden=overridden,
                audit_id=audit_id,
            )
        if not decision.allowed:
            write_audit(
                "refused",
                from_state=current.state,
                to_state=decided.to_state,
                gates=gates_json,
                forced=force,
                reason=reason,
                detail={"blocking": [g.name for g in decision.blocking]},
            )
            raise GateRefused(
                decision.refusal(domain, command), [g.line() for g in decision.blocking]
            )
        if confirm is not None:
            what = "Resume" if decided.kind == "resume" else "Start"
            prompt = (
                f"{what} {command} of {domain} ({decided.from_state} -> {decided.to_state})"
                + (f", FORCING past failing gates {', '.join(overridden)}" if overridden else "")
                + "?"
            )
            if not confirm(prompt):
                audit_id = write_audit(
                    "cancelled",
                    from_state=current.state,
                    to_state=decided.to_state,
                    gates=gates_json,
                    forced=force,
                    reason=reason,
                )
                return CommandOutcome(
                    command,
                    domain,
                    "cancelled",
                    "cancelled: nothing changed",
                    current.state,
                    decided.to_state,
                    gates=tuple(results),
                    forced=force,
                    overridden=overridden,
                    audit_id=audit_id,
                )
        try:
            result = execute(
                conn,
                settings,
                domain,
                action,
                actor=actor,
                publisher=publisher or KafkaPublisher(settings),
                reason=reason,
                forced=force,
                crash_at=crash_at,
            )
        except (KafkaError, DatabaseError) as exc:
            with contextlib.suppress(DatabaseError):
                write_audit(
                    "failed",
                    from_state=current.state,
                    to_state=decided.to_state,
                    gates=gates_json,
                    forced=force,
                    reason=reason,
                    detail={"error": exc.message, "resume": f"re-run `cutover {command} {domain}`"},
                )
            raise
        audit_id = write_audit(
            result.outcome,
            from_state=result.from_state,
            to_state=result.to_state,
            transition_id=result.transition_id,
            gates=gates_json,
            forced=force,
            reason=reason,
            detail={
                "version": result.version,
                "overridden": list(overridden),
                "gates_evaluated": decided.kind != "resume",
            },
        )
        return CommandOutcome(
            command,
            domain,
            result.outcome,
            result.message,
            result.from_state,
            result.to_state,
            result.version,
            result.transition_id,
            tuple(results),
            True,
            force,
            overridden,
            audit_id,
        )
    finally:
        conn.close()


def switch_reads(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    *,
    actor: str,
    dry_run: bool = False,
    force: bool = False,
    reason: str | None = None,
    confirm: Callable[[str], bool] | None = None,
    publisher: Publisher | None = None,
    crash_at: CrashPoint = None,
) -> CommandOutcome:
    """Gate, confirm and switch the reads of ``domain`` to commerce (audited whatever happens)."""

    def gate_results() -> list[GateResult]:
        return evaluate(collect(settings, domain), settings.gates)

    return _transition_command(
        settings,
        domains,
        domain,
        "switch_reads",
        actor=actor,
        gate_results=gate_results,
        dry_run=dry_run,
        force=force,
        reason=reason,
        confirm=confirm,
        publisher=publisher,
        crash_at=crash_at,
    )


def rollback_sanity(settings: Settings) -> list[GateResult]:
    """Rollback's only checks: legacy answers (it is about to serve the reads again)."""
    try:
        with psycopg.connect(settings.source.dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [GateResult("legacy_reachable", False, f"legacy database unreachable: {why}")]
    return [GateResult("legacy_reachable", True, "legacy database answers")]


def rollback(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    *,
    actor: str,
    dry_run: bool = False,
    force: bool = False,
    reason: str | None = None,
    confirm: Callable[[str], bool] | None = None,
    publisher: Publisher | None = None,
    crash_at: CrashPoint = None,
) -> CommandOutcome:
    """Return the reads of ``domain`` to legacy (sanity checks only; audited)."""
    return _transition_command(
        settings,
        domains,
        domain,
        "rollback",
        actor=actor,
        gate_results=lambda: rollback_sanity(settings),
        dry_run=dry_run,
        force=force,
        reason=reason,
        confirm=confirm,
        publisher=publisher,
        crash_at=crash_at,
    )


def status_report(
    settings: Settings, weights: Mapping[str, int], *, with_gates: bool = True
) -> dict[str, Any]:
    """Everything ``cutover status`` shows: per domain state, gates, lag, last verify; progress."""
    conn = open_control(settings, list(weights))
    try:
        states = load_states(conn, settings.target.control_schema)
    finally:
        conn.close()
    consumer = None
    if with_gates:
        from cutover.kafka import kafka_consumer

        consumer = kafka_consumer(settings)
    domains: list[dict[str, Any]] = []
    try:
        for domain, weight in weights.items():
            st = states[domain]
            entry: dict[str, Any] = {**st.to_json(), "weight": weight, "explanation": explain(st)}
            if with_gates:
                ev = collect(settings, domain, consumer=consumer)
                results = evaluate(ev, settings.gates)
                entry["gates"] = [g.to_json() for g in results]
                entry["gates_pass"] = all(g.passed for g in results)
                entry["lag"] = {
                    "topic": ev.lag.topic,
                    "total": ev.lag.total,
                    "partitions": {str(p): n for p, n in ev.lag.partitions.items()},
                    "error": ev.lag.error,
                }
                entry["last_verify"] = {
                    "run_id": ev.verify.run_id,
                    "passed": ev.verify.passed,
                    "age_s": None if ev.verify.age_s is None else round(ev.verify.age_s, 1),
                    "finished_at": ev.verify.finished_at,
                }
            domains.append(entry)
    finally:
        if consumer is not None:
            consumer.close()
    effective = {d: states[d].effective()[0] for d in weights}
    return {"progress_percent": progress(effective, weights), "domains": domains}
