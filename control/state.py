"""The cutover commands' cores (docs/CUTOVER.md): ``switch-reads``, ``rollback``,
``switch-writes``, ``rollback-writes``, ``complete`` and ``status``.

The state machine itself (the plan per state and action, and the intent → publish → done protocol
of a transition) is :mod:`control.machine`; publishing to the control topic is
:mod:`control.publish`. This module wraps a transition in what an operator command adds, the same
for every action (:func:`transition`):

1. plan from the current state: a no-op or a refusal by state ends here (audited);
2. evaluate the action's gates (:data:`ACTION_GATES`) and decide, with ``--force`` or without. A
   resumed transition evaluates them again: its non-critical failures were accepted when its
   intent was written, but a critical one (the slot lost since, a verify that found differences)
   refuses the resume, so a switch begun before the slot was lost never completes after;
3. a dry run, a refusal or a cancelled confirmation ends here (audited);
4. execute the transition (:func:`control.machine.execute`; the write actions with their steps,
   :class:`control.write_switch.WriteSteps`) and audit how it ended (a write transition's audit
   record carries its write-unavailability window, ``window_ms``).

Adding an action is adding its rule to :data:`control.machine.RULES` and its gates to
:data:`ACTION_GATES`, plus a one-line command function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypedDict, Unpack

import psycopg

from control import audit
from control.gate_evidence import collect
from control.gates import Decision, GateResult, decide, evaluate
from control.machine import (
    RULES,
    Action,
    CrashForTest,
    CrashPoint,
    Plan,
    TransitionResult,
    execute,
    explain,
    plan,
    progress,
)
from control.publish import KafkaPublisher, Publisher, state_message
from control.write_gates import write_gates
from control.write_switch import WriteSteps
from cutover import pg
from cutover.config import Settings
from cutover.control_store import (
    COMMERCE_READS,
    COMMERCE_WRITES,
    COMPLETED,
    IN_FLIGHT,
    STABLE,
    STATES,
    Conn,
    DomainState,
    control_plane_ddl,
    ensure_control_plane,
    ensure_domains,
    load_states,
)
from cutover.errors import CutoverError, DatabaseError, GateRefused, UsageError, redact_dsn
from cutover.mapping import load_mapping

__all__ = [
    "ACTION_GATES",
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
    "TransitionOptions",
    "TransitionResult",
    "complete",
    "control_plane_ddl",
    "ensure_control_plane",
    "ensure_domains",
    "execute",
    "explain",
    "gate_decision",
    "load_states",
    "open_control",
    "plan",
    "progress",
    "rollback",
    "rollback_sanity",
    "rollback_writes",
    "state_message",
    "status_report",
    "switch_reads",
    "switch_writes",
    "transition",
]


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
    #: What a write transition's steps measured (fence_lsn, window_ms, ...).
    detail: Mapping[str, Any] = field(default_factory=dict)

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
            "detail": dict(self.detail),
            "window_ms": self.detail.get("window_ms"),
        }


def _control_conn(settings: Settings) -> Conn:
    return pg.connect(
        settings.target.dsn,
        side="target",
        connect_timeout=10,
        application_name="cutover",
        doing="connecting to the commerce database",
    )


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


def switch_gates(settings: Settings, domain: str) -> list[GateResult]:
    """The gates of switch-reads (:mod:`control.gates`)."""
    return evaluate(collect(settings, domain), settings.gates)


#: The checks each action runs before it starts (and again when it resumes).
ACTION_GATES: dict[Action, Callable[[Settings, str], list[GateResult]]] = {
    "switch_reads": switch_gates,
    "rollback": lambda settings, _domain: rollback_sanity(settings),
    "switch_writes": write_gates("switch_writes"),
    # The way back is never held up by soak or lag: legacy must answer, that is all.
    "rollback_writes": lambda settings, _domain: rollback_sanity(settings),
    "complete": write_gates("complete"),
}
#: The actions whose work happens between their intent and their publication.
WRITE_ACTIONS = frozenset({"switch_writes", "rollback_writes", "complete"})


class TransitionOptions(TypedDict, total=False):
    """The options every transition command takes besides its actor."""

    dry_run: bool
    force: bool
    reason: str | None
    confirm: Callable[[str], bool] | None
    publisher: Publisher | None
    crash_at: CrashPoint


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One run of a command once planned: what every audit entry and outcome of it repeats."""

    conn: Conn
    schema: str
    actor: str
    command: str
    current: DomainState
    decided: Plan
    force: bool
    reason: str | None
    results: tuple[GateResult, ...] = ()

    @property
    def domain(self) -> str:
        return self.current.domain

    def audit(self, outcome: str, **fields: Any) -> int:
        """Record ``outcome``; the gates, force, reason and states default to this attempt's."""
        entry: dict[str, Any] = {
            "from_state": self.current.state,
            "to_state": self.decided.to_state,
            "gates": [g.to_json() for g in self.results],
            "forced": self.force,
            "reason": self.reason,
            **fields,
        }
        return audit.record(
            self.conn,
            self.schema,
            actor=self.actor,
            command=self.command,
            domain=self.domain,
            outcome=outcome,
            **entry,
        )

    def outcome(
        self,
        outcome: Literal["dry_run", "cancelled"],
        message: str,
        decision: Decision,
        audit_id: int,
    ) -> CommandOutcome:
        return CommandOutcome(
            self.command,
            self.domain,
            outcome,
            message,
            self.current.state,
            self.decided.to_state,
            gates=self.results,
            allowed=decision.allowed,
            forced=self.force,
            overridden=tuple(g.name for g in decision.overridden),
            audit_id=audit_id,
        )


def _settled_by_state(attempt: _Attempt) -> CommandOutcome:
    """A no-op or a refusal by state (no gates evaluated): audited, the refusal raised."""
    cur, decided = attempt.current, attempt.decided
    bare = replace(attempt, force=False, reason=None)  # nothing was forced: no decision taken
    if decided.kind == "refuse":
        bare.audit("refused", to_state=None, detail={"why": decided.why})
        raise GateRefused(
            f"{attempt.command} {attempt.domain} refused: {decided.why}", [f"state: {decided.why}"]
        )
    audit_id = bare.audit("noop", to_state=None, detail={"why": decided.why})
    return CommandOutcome(
        attempt.command,
        attempt.domain,
        "noop",
        decided.why,
        cur.state,
        cur.state,
        cur.version,
        audit_id=audit_id,
    )


def gate_decision(kind: str, results: Sequence[GateResult], *, force: bool) -> Decision:
    """Gates → decision (pure). Resuming, only critical failures block (see the module doc):
    the others were accepted when the intent was written, so they are not "overridden"."""
    resumed = kind == "resume"
    decision = decide(results, force=force or resumed)
    if resumed and not force:
        decision = replace(decision, overridden=())
    return decision


def _dry_run(attempt: _Attempt, decision: Decision) -> CommandOutcome:
    verb = "would resume" if attempt.decided.kind == "resume" else "would go ahead"
    msg = (
        f"dry run: {attempt.command} {attempt.domain} {verb}"
        if decision.allowed
        else decision.refusal(attempt.domain, attempt.command).replace(
            "refused", "would be refused", 1
        )
    )
    overridden = [g.name for g in decision.overridden]
    audit_id = attempt.audit(
        "dry_run", detail={"allowed": decision.allowed, "overridden": overridden}
    )
    return attempt.outcome("dry_run", msg, decision, audit_id)


def _refuse(attempt: _Attempt, decision: Decision) -> None:
    attempt.audit("refused", detail={"blocking": [g.name for g in decision.blocking]})
    raise GateRefused(
        decision.refusal(attempt.domain, attempt.command), [g.line() for g in decision.blocking]
    )


def _confirmed(attempt: _Attempt, decision: Decision, confirm: Callable[[str], bool]) -> bool:
    decided = attempt.decided
    overridden = [g.name for g in decision.overridden]
    what = "Resume" if decided.kind == "resume" else "Start"
    prompt = (
        f"{what} {attempt.command} of {attempt.domain} ({decided.from_state} -> "
        f"{decided.to_state})"
        + (f", FORCING past failing gates {', '.join(overridden)}" if overridden else "")
        + "?"
    )
    return confirm(prompt)


def _run(
    attempt: _Attempt,
    settings: Settings,
    decision: Decision,
    publisher: Publisher | None,
    crash_at: CrashPoint,
) -> CommandOutcome:
    """Execute the transition and audit how it ended (a failure too, with how to resume)."""
    overridden = tuple(g.name for g in decision.overridden)
    action = attempt.decided.action
    steps = None
    if action in WRITE_ACTIONS:
        steps = WriteSteps(settings, load_mapping(settings.mapping_path), actor=attempt.actor)
    try:
        result = execute(
            attempt.conn,
            settings,
            attempt.domain,
            attempt.decided.action,
            actor=attempt.actor,
            publisher=publisher or KafkaPublisher(settings),
            reason=attempt.reason,
            forced=attempt.force,
            crash_at=crash_at,
            steps=steps,
        )
    except CutoverError as exc:
        with contextlib.suppress(DatabaseError):
            attempt.audit(
                "failed",
                detail={
                    "error": exc.message,
                    "resume": f"re-run `cutover {attempt.command} {attempt.domain}`",
                },
            )
        raise
    audit_id = attempt.audit(
        result.outcome,
        from_state=result.from_state,
        to_state=result.to_state,
        transition_id=result.transition_id,
        detail={
            "version": result.version,
            "overridden": list(overridden),
            "gates_evaluated": True,
            "resumed": attempt.decided.kind == "resume",
            **result.detail,
        },
    )
    return CommandOutcome(
        attempt.command,
        attempt.domain,
        result.outcome,
        result.message,
        result.from_state,
        result.to_state,
        result.version,
        result.transition_id,
        attempt.results,
        True,
        attempt.force,
        overridden,
        audit_id,
        result.detail,
    )


def transition(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    action: Action,
    *,
    actor: str,
    **options: Unpack[TransitionOptions],
) -> CommandOutcome:
    """The flow every transition command shares (the module doc): plan, gates, confirm, execute,
    audited whatever happens."""
    force = options.get("force", False)
    reason = options.get("reason")
    _check_domain(domains, domain)
    if force and not (reason and reason.strip()):
        raise UsageError("--force needs --reason TEXT: the override is audited with it")
    schema = settings.target.control_schema
    conn = open_control(settings, domains)
    try:
        current = load_states(conn, schema)[domain]
        attempt = _Attempt(
            conn,
            schema,
            actor,
            RULES[action].command,
            current,
            plan(current, action),
            force,
            reason,
        )
        if attempt.decided.kind in ("noop", "refuse"):
            return _settled_by_state(attempt)
        attempt = replace(attempt, results=tuple(ACTION_GATES[action](settings, domain)))
        decision = gate_decision(attempt.decided.kind, attempt.results, force=force)
        if options.get("dry_run", False):
            return _dry_run(attempt, decision)
        if not decision.allowed:
            _refuse(attempt, decision)
        confirm = options.get("confirm")
        if confirm is not None and not _confirmed(attempt, decision, confirm):
            audit_id = attempt.audit("cancelled")
            return attempt.outcome("cancelled", "cancelled: nothing changed", decision, audit_id)
        return _run(attempt, settings, decision, options.get("publisher"), options.get("crash_at"))
    finally:
        conn.close()


def switch_reads(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    *,
    actor: str,
    **options: Unpack[TransitionOptions],
) -> CommandOutcome:
    """Gate, confirm and switch the reads of ``domain`` to commerce (audited whatever happens)."""
    return transition(settings, domains, domain, "switch_reads", actor=actor, **options)


def rollback(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    *,
    actor: str,
    **options: Unpack[TransitionOptions],
) -> CommandOutcome:
    """Return the reads of ``domain`` to legacy (sanity checks only; audited)."""
    return transition(settings, domains, domain, "rollback", actor=actor, **options)


def switch_writes(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    *,
    actor: str,
    **options: Unpack[TransitionOptions],
) -> CommandOutcome:
    """Gate, confirm and move the writes of ``domain`` to commerce behind the fence (audited)."""
    return transition(settings, domains, domain, "switch_writes", actor=actor, **options)


def rollback_writes(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    *,
    actor: str,
    **options: Unpack[TransitionOptions],
) -> CommandOutcome:
    """Return the writes of ``domain`` to legacy (or undo an unfinished switch-writes)."""
    return transition(settings, domains, domain, "rollback_writes", actor=actor, **options)


def complete(
    settings: Settings,
    domains: Sequence[str],
    domain: str,
    *,
    actor: str,
    **options: Unpack[TransitionOptions],
) -> CommandOutcome:
    """Finish ``domain``: stop its reverse stream, leave legacy's tables fenced (audited)."""
    return transition(settings, domains, domain, "complete", actor=actor, **options)


def rollback_sanity(settings: Settings) -> list[GateResult]:
    """Rollback's only checks: legacy answers (it is about to serve the reads again)."""
    try:
        with psycopg.connect(settings.source.dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        text = redact_dsn(str(exc).strip())
        why = text.splitlines()[0] if text else type(exc).__name__
        return [GateResult("legacy_reachable", False, f"legacy database unreachable: {why}")]
    return [GateResult("legacy_reachable", True, "legacy database answers")]


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
            if with_gates and st.state == COMPLETED:
                # Legacy's tables of a completed domain are history: the forward slot and its
                # publication may be gone on purpose, so the capture gates no longer apply.
                entry["gates"], entry["gates_pass"] = [], True
            elif with_gates:
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
    return {
        "progress_percent": progress(effective, weights),
        "writes_on_commerce": sum(1 for s in effective.values() if s in COMMERCE_WRITES),
        "completed": sum(1 for s in effective.values() if s == COMPLETED),
        "domains": domains,
    }
