"""The cutover state machine of each domain: the pure plan and the transition protocol.

States (in-flight states in brackets; DESIGN §6)::

    replicating ─switch-reads─▶ [switching_reads] ─▶ reads_switched ─switch-writes─▶
        ▲                                              │  ▲                          │
        └──── [rolling_back] ◀────────rollback─────────┘  │              [switching_writes]
                                                          │                          ▼
                          [rolling_back_writes] ◀─rollback-writes─ writes_switched ◀─┘
                                                                       │
                                                    complete ─▶ [completing] ─▶ completed

Each action is one :class:`ActionRule` of :data:`RULES` (the stable state it starts from, its
in-flight state, its target, what it refuses and what it abandons): :func:`plan` reads the table,
so a new action is a new row. ``switching_reads`` and ``rolling_back`` are in-flight states: a
transition was decided (the intent is written) and is being carried out. Every transition runs
the same protocol, the steps of :func:`execute`:

1. **intent** (:func:`_write_intent`): in one commerce transaction, lock the domain's row, decide
   with the pure :func:`plan`, insert the ``transitions`` row (status ``intent``, version =
   current + 1) and set the domain to the in-flight state naming it;
2. **publish** (:func:`_publish`) the target state to the compacted control topic (key = domain,
   value JSON ``{domain, state, version, changed_at, actor, transition_id}``), wait for the
   acknowledgement, then mark the transition ``published``;
3. **done** (:func:`_complete`): set the domain to the target state and the transition ``done``.

The write actions (``switch_writes``, ``rollback_writes``, ``complete``) do their work between
steps 1 and 2: ``steps`` (:class:`Steps`, :mod:`control.write_switch`) fences, drains, verifies
and records each step in the transition's row before the target is published, and measures the
write-unavailability window after it.

A crash between two steps leaves a row that :func:`explain` describes and that re-running the same
command resumes (publishing the same version twice is harmless: readers order by version). A
rollback of an unfinished switch abandons the switch's transition.

Readers (:mod:`cutover.routing`) see the *effective* state (:meth:`DomainState.effective`): the
target of a transition once it is published, the state it started from before that; so routers
following the topic and routers polling the table agree.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeAlias

import psycopg

from control.publish import Publisher, state_message
from cutover import pg
from cutover.config import Settings
from cutover.control_store import (
    COMMERCE_READS,
    COMPLETED,
    COMPLETING,
    READS_SWITCHED,
    REPLICATING,
    ROLLING_BACK,
    ROLLING_BACK_WRITES,
    SWITCHING_READS,
    SWITCHING_WRITES,
    WRITES_SWITCHED,
    Conn,
    DomainState,
    Transition,
    begin_transition,
    finish_transition,
    load_states,
    mark_published,
)
from cutover.errors import UsageError
from cutover.logging import get_logger

__all__ = [
    "RULES",
    "Action",
    "ActionRule",
    "CrashForTest",
    "CrashPoint",
    "Plan",
    "StepContext",
    "Steps",
    "TransitionResult",
    "execute",
    "explain",
    "plan",
    "progress",
]

log = get_logger("control.state")

Action: TypeAlias = Literal[
    "switch_reads", "rollback", "switch_writes", "rollback_writes", "complete"
]


# ---------------------------------------------------------------------------------------------
# The pure state machine
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionRule:
    """What one action does from each state (``{d}`` is the domain, ``{s}`` the state).

    From ``start`` it starts a transition through ``via`` to ``to``; in ``via`` it resumes it; in
    ``to`` it is a no-op (``noop_why``); from a state of ``abandons`` (the in-flight state of
    another action) it starts anew and abandons that transition; elsewhere it refuses, with the
    state's sentence of ``refusals`` or ``refuse_why``.
    """

    command: str
    start: str
    via: str
    to: str
    noop_why: str
    refuse_why: str
    event: str  # logged when the transition is done
    refusals: Mapping[str, str] = field(default_factory=dict)
    abandons: Mapping[str, str] = field(default_factory=dict)


RULES: dict[Action, ActionRule] = {
    "switch_reads": ActionRule(
        command="switch-reads",
        start=REPLICATING,
        via=SWITCHING_READS,
        to=READS_SWITCHED,
        noop_why="reads of {d} are already switched to commerce",
        refuse_why="{d} is in state {s}; switch-reads does not apply",
        event="cutover.reads_switched",
        refusals={
            ROLLING_BACK: "a rollback of {d} is in progress: run `cutover rollback {d}` to finish "
            "it first",
            **{
                s: "reads of {d} are already switched to commerce (state {s})"
                for s in (
                    SWITCHING_WRITES,
                    WRITES_SWITCHED,
                    ROLLING_BACK_WRITES,
                    COMPLETING,
                    COMPLETED,
                )
            },
        },
    ),
    "rollback": ActionRule(
        command="rollback",
        start=READS_SWITCHED,
        via=ROLLING_BACK,
        to=REPLICATING,
        noop_why="{d} is already replicating (reads on legacy)",
        refuse_why="{d} is in state {s}; rollback does not apply",
        event="cutover.rolled_back",
        # Abort a switch that did not finish: readers may already follow it (if published), so
        # the way back is a new, higher version saying replicating.
        abandons={SWITCHING_READS: "abandons the unfinished switch"},
        refusals={
            WRITES_SWITCHED: "the writes of {d} are on commerce: run `cutover rollback-writes "
            "{d}` first (then `cutover rollback {d}` returns its reads)",
            SWITCHING_WRITES: "a switch-writes of {d} did not finish: finish it with `cutover "
            "switch-writes {d}` or undo it with `cutover rollback-writes {d}`",
            ROLLING_BACK_WRITES: "a rollback-writes of {d} is in progress: run `cutover "
            "rollback-writes {d}` to finish it first",
            COMPLETING: "a complete of {d} is in progress: run `cutover complete {d}`",
            COMPLETED: "{d} is completed: legacy's tables of {d} are read-only history",
        },
    ),
    "switch_writes": ActionRule(
        command="switch-writes",
        start=READS_SWITCHED,
        via=SWITCHING_WRITES,
        to=WRITES_SWITCHED,
        noop_why="writes of {d} are already switched to commerce",
        refuse_why="{d} is in state {s}; switch-writes needs reads_switched (`cutover "
        "switch-reads {d}` first)",
        event="cutover.writes_switched",
        refusals={
            ROLLING_BACK_WRITES: "a rollback-writes of {d} is in progress: run `cutover "
            "rollback-writes {d}` to finish it first",
            COMPLETING: "a complete of {d} is in progress: run `cutover complete {d}`",
            COMPLETED: "{d} is completed: its writes are on commerce for good",
        },
    ),
    "rollback_writes": ActionRule(
        command="rollback-writes",
        start=WRITES_SWITCHED,
        via=ROLLING_BACK_WRITES,
        to=READS_SWITCHED,
        noop_why="writes of {d} are on legacy already (reads_switched)",
        refuse_why="{d} is in state {s}; rollback-writes needs writes_switched",
        event="cutover.writes_rolled_back",
        # Undo a switch-writes that did not finish (a kill -9 mid-way): unfence legacy, or, if
        # routers already follow writes_switched, the whole way back.
        abandons={SWITCHING_WRITES: "abandons the unfinished switch-writes"},
        refusals={
            COMPLETING: "a complete of {d} is in progress: run `cutover complete {d}`",
            COMPLETED: "{d} is completed: its writes cannot return to legacy",
        },
    ),
    "complete": ActionRule(
        command="complete",
        start=WRITES_SWITCHED,
        via=COMPLETING,
        to=COMPLETED,
        noop_why="{d} is already completed",
        refuse_why="{d} is in state {s}; complete needs writes_switched (`cutover "
        "switch-writes {d}` first)",
        event="cutover.completed",
        refusals={
            SWITCHING_WRITES: "a switch-writes of {d} did not finish: run `cutover "
            "switch-writes {d}` first",
            ROLLING_BACK_WRITES: "a rollback-writes of {d} is in progress: run `cutover "
            "rollback-writes {d}` to finish it first",
        },
    ),
}


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
    """Decide what ``action`` does from ``current`` (pure; the rule of :data:`RULES`)."""
    rule = RULES[action]
    s, d = current.state, current.domain
    if s == rule.start:
        return Plan("start", action, s, rule.via, rule.to)
    if s == rule.via:
        return Plan("resume", action, current.from_state or rule.start, rule.via, rule.to)
    if s == rule.to:
        return Plan("noop", action, s, why=rule.noop_why.format(d=d, s=s))
    if s in rule.abandons:
        why = rule.abandons[s]
        return Plan("start", action, s, rule.via, rule.to, why, abandon=current.transition_id)
    why = rule.refusals.get(s, rule.refuse_why)
    return Plan("refuse", action, s, why=why.format(d=d, s=s))


def progress(states: Mapping[str, str], weights: Mapping[str, int]) -> int:
    """Migration progress in percent: Σ weight of the domains whose reads commerce serves."""
    return sum(w for d, w in weights.items() if states.get(d) in COMMERCE_READS)


def _command_of(in_flight: str) -> ActionRule | None:
    return next((r for r in RULES.values() if r.via == in_flight), None)


def explain(state: DomainState) -> str:
    """A sentence for ``status``: what the state means and, in flight, how to finish it."""
    d = state.domain
    if state.state == REPLICATING:
        return "legacy serves reads; CDC keeps commerce in sync"
    if state.state == READS_SWITCHED:
        return "commerce serves reads; CDC keeps commerce in sync"
    if state.state == WRITES_SWITCHED:
        return "commerce serves reads and writes; legacy's tables are fenced"
    if state.state == COMPLETED:
        return "commerce serves reads and writes; legacy's tables are read-only history"
    rule = _command_of(state.state)
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
    hint = f"run `cutover {rule.command if rule else 'rollback'} {d}` to complete it"
    aborts = [r.command for r in RULES.values() if state.state in r.abandons]
    if aborts:
        hint += f", or `cutover {aborts[0]} {d}` to abandon it"
    step = f"; last step done: {state.step}" if state.step else ""
    return (
        f"transition {state.transition_id} ({state.from_state} -> {state.to_state}) started "
        f"{when} by {state.actor or '?'} did not finish{step}; {seen}; {hint}"
    )


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
    #: What the steps of a write transition measured (fence LSN, window_ms, ...).
    detail: Mapping[str, Any] = field(default_factory=dict)


class CrashForTest(Exception):
    """Raised at a named crash point (``crash_at``) to simulate a kill in fault tests."""


CrashPoint: TypeAlias = (
    Literal[
        "after_intent",
        "after_fence",
        "after_drain",
        "after_verify",
        "after_reverse",
        "after_open",
        "after_publish",
    ]
    | None
)


@dataclass(frozen=True, slots=True)
class StepContext:
    """What the steps of a write transition are told: the transition and where it came from.

    ``current`` is the domain's row before step 1 (a resume: the in-flight one, with the steps
    it recorded); ``from_state`` is the stable state readers followed before the transition.
    """

    domain: str
    action: Action
    transition_id: str
    from_state: str
    resumed: bool
    current: DomainState
    crash_at: CrashPoint = None


class Steps(Protocol):
    """The work of a write transition around its publication (:mod:`control.write_switch`)."""

    def before_publish(self, conn: Conn, ctx: StepContext) -> None:
        """Steps before the target is published; on failure, undo and raise (the step named)."""

    def after_publish(self, conn: Conn, ctx: StepContext) -> dict[str, Any]:
        """After the publication: what to audit (the window)."""


@dataclass(frozen=True, slots=True)
class _Intent:
    """The transition step 1 wrote (or found in flight), carried through steps 2 and 3."""

    decided: Plan
    transition_id: str
    version: int
    to_state: str
    changed_at: datetime
    actor: str


def _stable_from(current: DomainState, decided: Plan) -> str:
    """The state readers follow before the new transition is published (its ``from_state``)."""
    if current.in_flight:
        return current.effective()[0]
    return decided.from_state


def _start(
    conn: Conn,
    schema: str,
    current: DomainState,
    decided: Plan,
    *,
    actor: str,
    reason: str | None,
    forced: bool,
) -> _Intent:
    """Insert a new transition (abandoning the one it replaces) and enter the in-flight state."""
    transition_id = str(uuid.uuid4())
    version = max(current.version, current.pending_version or 0) + 1
    intent = _Intent(
        decided, transition_id, version, decided.to_state or "", datetime.now(UTC), actor
    )
    assert decided.via is not None  # plan() names the in-flight state of a new transition
    begin_transition(
        conn,
        schema,
        Transition(
            transition_id,
            current.domain,
            decided.action,
            _stable_from(current, decided),
            intent.to_state,
            version,
            actor,
            reason,
            forced,
            intent.changed_at,
        ),
        via=decided.via,
        abandon=decided.abandon,
    )
    return intent


def _resumed(current: DomainState, decided: Plan, actor: str) -> _Intent:
    """The in-flight transition, carried on with its own version, time and actor."""
    assert current.transition_id is not None and current.pending_version is not None
    return _Intent(
        decided,
        current.transition_id,
        current.pending_version,
        decided.to_state or current.to_state or "",
        current.transition_created_at or datetime.now(UTC),
        current.actor or actor,
    )


def _write_intent(
    conn: Conn,
    schema: str,
    domain: str,
    action: Action,
    *,
    actor: str,
    reason: str | None,
    forced: bool,
    on_intent: Callable[[Plan, DomainState], None] | None,
    seen: list[DomainState] | None = None,
) -> _Intent | TransitionResult:
    """Step 1, under the domain row's lock; a no-op ends here with its result."""
    try:
        with conn.transaction():
            current = load_states(conn, schema, lock_domain=domain).get(domain)
            if current is None:
                raise UsageError(f"unknown domain {domain!r}")
            decided = plan(current, action)
            if seen is not None:
                seen.append(current)
            if on_intent is not None:
                on_intent(decided, current)
            if decided.kind == "refuse":
                raise UsageError(decided.why)
            if decided.kind == "noop":
                return TransitionResult(
                    "noop", domain, current.state, current.state, current.version, None, decided.why
                )
            if decided.kind == "resume":
                intent = _resumed(current, decided, actor)
            else:
                intent = _start(
                    conn, schema, current, decided, actor=actor, reason=reason, forced=forced
                )
    except psycopg.Error as exc:
        raise pg.translate(exc, f"writing the {action} intent of {domain}", "target") from None
    log.info(
        "cutover.transition_intent",
        domain=domain,
        action=action,
        transition_id=intent.transition_id,
        version=intent.version,
        resumed=decided.kind == "resume",
    )
    return intent


def _publish(conn: Conn, schema: str, domain: str, intent: _Intent, publisher: Publisher) -> None:
    """Step 2: the target state on the control topic, then the transition marked published."""
    publisher.publish(
        domain,
        state_message(
            domain=domain,
            state=intent.to_state,
            version=intent.version,
            actor=intent.actor,
            transition_id=intent.transition_id,
            changed_at=intent.changed_at,
        ),
    )
    try:
        mark_published(conn, schema, intent.transition_id)
    except psycopg.Error as exc:
        raise pg.translate(
            exc, f"recording the publication of {domain}'s state", "target"
        ) from None


def _complete(conn: Conn, schema: str, domain: str, intent: _Intent) -> None:
    """Step 3: the domain in the target state, the transition done."""
    action = intent.decided.action
    try:
        with conn.transaction():
            finish_transition(
                conn,
                schema,
                domain,
                intent.transition_id,
                state=intent.to_state,
                version=intent.version,
                actor=intent.actor,
            )
    except psycopg.Error as exc:
        raise pg.translate(exc, f"completing the {action} of {domain}", "target") from None
    log.info(
        RULES[action].event,
        domain=domain,
        version=intent.version,
        transition_id=intent.transition_id,
        actor=intent.actor,
    )


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
    steps: Steps | None = None,
) -> TransitionResult:
    """Run (or resume) ``action`` on ``domain`` through steps 1-3 of the module doc.

    ``on_intent`` is called inside step 1's transaction once the plan is known (the caller
    refuses there by raising; nothing is written then). Raises :class:`UsageError` when the plan
    refuses, :class:`KafkaError` when publishing fails (the intent stays: re-run to complete).
    """
    schema = settings.target.control_schema
    seen: list[DomainState] = []
    intent = _write_intent(
        conn,
        schema,
        domain,
        action,
        actor=actor,
        reason=reason,
        forced=forced,
        on_intent=on_intent,
        seen=seen,
    )
    if isinstance(intent, TransitionResult):
        return intent
    if crash_at == "after_intent":
        raise CrashForTest("after_intent")
    decided = intent.decided
    ctx = StepContext(
        domain,
        action,
        intent.transition_id,
        _stable_from(seen[0], decided) if decided.kind == "start" else decided.from_state,
        decided.kind == "resume",
        seen[0],
        crash_at,
    )
    if steps is not None:
        steps.before_publish(conn, ctx)
    _publish(conn, schema, domain, intent, publisher)
    detail = steps.after_publish(conn, ctx) if steps is not None else {}
    if crash_at == "after_publish":
        raise CrashForTest("after_publish")
    _complete(conn, schema, domain, intent)
    return TransitionResult(
        "resumed" if decided.kind == "resume" else "done",
        domain,
        decided.from_state,
        intent.to_state,
        intent.version,
        intent.transition_id,
        f"{domain}: {decided.from_state} -> {intent.to_state} (version {intent.version})",
        detail,
    )
