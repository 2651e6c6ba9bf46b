"""Domain state: the ``domain_state`` rows that the state machine (:mod:`control.state`) moves
and the router (:mod:`cutover.routing`) follows, with their ``transitions`` (and the steps a
write transition records in them, :mod:`control.write_switch`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from cutover.control_store.store import Conn, db_error, qualified

REPLICATING = "replicating"
SWITCHING_READS = "switching_reads"
READS_SWITCHED = "reads_switched"
ROLLING_BACK = "rolling_back"
SWITCHING_WRITES = "switching_writes"
WRITES_SWITCHED = "writes_switched"
ROLLING_BACK_WRITES = "rolling_back_writes"
COMPLETING = "completing"
COMPLETED = "completed"

STATES: tuple[str, ...] = (
    REPLICATING,
    SWITCHING_READS,
    READS_SWITCHED,
    ROLLING_BACK,
    SWITCHING_WRITES,
    WRITES_SWITCHED,
    ROLLING_BACK_WRITES,
    COMPLETING,
    COMPLETED,
)
STABLE = frozenset({REPLICATING, READS_SWITCHED, WRITES_SWITCHED, COMPLETED})
IN_FLIGHT = frozenset(
    {SWITCHING_READS, ROLLING_BACK, SWITCHING_WRITES, ROLLING_BACK_WRITES, COMPLETING}
)
#: States whose reads are served by commerce (they count for the migration progress).
COMMERCE_READS = frozenset({READS_SWITCHED, WRITES_SWITCHED, COMPLETED})
#: States whose writes are taken by commerce (legacy's tables of the domain are fenced).
COMMERCE_WRITES = frozenset({WRITES_SWITCHED, COMPLETED})


@dataclass(frozen=True, slots=True)
class DomainState:
    """One row of ``domain_state`` joined with its in-flight transition (if any)."""

    domain: str
    state: str
    version: int
    changed_at: datetime | None = None
    actor: str | None = None
    transition_id: str | None = None
    #: The in-flight transition's details (None when the state is stable).
    from_state: str | None = None
    to_state: str | None = None
    pending_version: int | None = None
    published: bool = False
    transition_status: str | None = None
    transition_created_at: datetime | None = None
    #: The last step an in-flight write transition recorded, and what it recorded.
    step: str | None = None
    step_detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def in_flight(self) -> bool:
        return self.state in IN_FLIGHT

    def effective(self) -> tuple[str, int]:
        """The (state, version) readers act on: a transition counts once it is published."""
        if self.in_flight and self.to_state is not None and self.from_state is not None:
            if self.published and self.pending_version is not None:
                return self.to_state, self.pending_version
            return self.from_state, self.version
        return self.state, self.version

    def to_json(self) -> dict[str, object]:
        effective, version = self.effective()
        return {
            "domain": self.domain,
            "state": self.state,
            "effective_state": effective,
            "version": version,
            "changed_at": self.changed_at.isoformat() if self.changed_at else None,
            "actor": self.actor,
            "transition_id": self.transition_id,
            "pending": None
            if not self.in_flight
            else {
                "from": self.from_state,
                "to": self.to_state,
                "version": self.pending_version,
                "published": self.published,
                "status": self.transition_status,
                "step": self.step,
                "step_detail": dict(self.step_detail),
            },
        }


def ensure_domains(conn: Conn, schema: str, domains: Sequence[str]) -> None:
    """A ``replicating`` row, version 0, for every domain that has none yet."""
    try:
        with conn.transaction():
            for domain in domains:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (domain, state, version, actor) VALUES (%s, %s, 0, %s) "
                        "ON CONFLICT (domain) DO NOTHING"
                    ).format(qualified(schema, "domain_state")),
                    [domain, REPLICATING, "cutover"],
                )
    except psycopg.Error as exc:
        raise db_error(exc, "initialising cutover.domain_state") from None


_STATE_QUERY = (
    "SELECT s.domain, s.state, s.version, s.changed_at, s.actor, s.transition_id::text, "
    "t.from_state, t.to_state, t.version, t.published_at IS NOT NULL, t.status, t.created_at, "
    "t.step, t.step_detail "
    "FROM {state} AS s LEFT JOIN {transitions} AS t ON t.transition_id = s.transition_id "
)


def _row_to_state(row: Sequence[Any]) -> DomainState:
    return DomainState(
        domain=row[0],
        state=row[1],
        version=int(row[2]),
        changed_at=row[3],
        actor=row[4],
        transition_id=row[5],
        from_state=row[6],
        to_state=row[7],
        pending_version=None if row[8] is None else int(row[8]),
        published=bool(row[9]),
        transition_status=row[10],
        transition_created_at=row[11],
        step=row[12],
        step_detail=row[13] or {},
    )


def load_states(
    conn: Conn, schema: str, *, lock_domain: str | None = None
) -> dict[str, DomainState]:
    """Every domain's state (with ``lock_domain``: only that one, row-locked FOR UPDATE)."""
    q = sql.SQL(_STATE_QUERY).format(
        state=qualified(schema, "domain_state"), transitions=qualified(schema, "transitions")
    )
    params: list[object] = []
    if lock_domain is not None:
        q = q + sql.SQL("WHERE s.domain = %s FOR UPDATE OF s")
        params.append(lock_domain)
    else:
        q = q + sql.SQL("ORDER BY s.domain")
    try:
        rows = conn.execute(q, params).fetchall()
    except psycopg.Error as exc:
        raise db_error(exc, "reading cutover.domain_state") from None
    return {r[0]: _row_to_state(r) for r in rows}


# Transitions: written by the state machine inside the transactions it opens; these
# run in the caller's transaction and raise psycopg errors for the caller to name the step.


@dataclass(frozen=True, slots=True)
class Transition:
    """A new ``transitions`` row (status ``intent``)."""

    transition_id: str
    domain: str
    action: str
    from_state: str
    to_state: str
    version: int
    actor: str
    reason: str | None
    forced: bool
    created_at: datetime


def begin_transition(
    conn: Conn, schema: str, t: Transition, *, via: str, abandon: str | None = None
) -> None:
    """Step 1: record the intent and put the domain in the in-flight state ``via``.

    ``abandon`` names an unfinished transition this one overrides (a rollback of a switch).
    """
    transitions = qualified(schema, "transitions")
    if abandon is not None:
        conn.execute(
            sql.SQL(
                "UPDATE {} SET status = 'abandoned', done_at = now() "
                "WHERE transition_id = %s AND status IN ('intent', 'published')"
            ).format(transitions),
            [abandon],
        )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (transition_id, domain, action, from_state, to_state, "
            "version, actor, reason, forced, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(transitions),
        [
            t.transition_id,
            t.domain,
            t.action,
            t.from_state,
            t.to_state,
            t.version,
            t.actor,
            t.reason,
            t.forced,
            t.created_at,
        ],
    )
    conn.execute(
        sql.SQL(
            "UPDATE {} SET state = %s, transition_id = %s, actor = %s WHERE domain = %s"
        ).format(qualified(schema, "domain_state")),
        [via, t.transition_id, t.actor, t.domain],
    )


def mark_published(conn: Conn, schema: str, transition_id: str) -> None:
    """Step 2: the target state was acknowledged on the control topic."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'published', published_at = COALESCE(published_at, now()) "
            "WHERE transition_id = %s AND status = 'intent'"
        ).format(qualified(schema, "transitions")),
        [transition_id],
    )


def finish_transition(
    conn: Conn, schema: str, domain: str, transition_id: str, *, state: str, version: int,
    actor: str,
) -> None:  # fmt: skip
    """Step 3: the domain is in ``state`` at ``version``; the transition is done."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET state = %s, version = %s, changed_at = now(), actor = %s, "
            "transition_id = NULL WHERE domain = %s AND transition_id = %s"
        ).format(qualified(schema, "domain_state")),
        [state, version, actor, domain, transition_id],
    )
    conn.execute(
        sql.SQL("UPDATE {} SET status = 'done', done_at = now() WHERE transition_id = %s").format(
            qualified(schema, "transitions")
        ),
        [transition_id],
    )


def record_step(
    conn: Conn, schema: str, transition_id: str, step: str, detail: Mapping[str, Any]
) -> None:
    """A write transition finished ``step``: remember it (and merge ``detail`` into what earlier
    steps recorded) so that a re-run after a crash knows where it stopped."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET step = %s, step_detail = step_detail || %s WHERE transition_id = %s"
        ).format(qualified(schema, "transitions")),
        [step, Jsonb(dict(detail)), transition_id],
    )


def abandon_transition(
    conn: Conn, schema: str, domain: str, transition_id: str, *, state: str, why: str
) -> None:
    """Undo an unpublished transition: the domain is back in ``state`` (its version unchanged:
    readers never saw the transition) and the transition is ``abandoned`` with ``why``."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET state = %s, transition_id = NULL WHERE domain = %s "
            "AND transition_id = %s"
        ).format(qualified(schema, "domain_state")),
        [state, domain, transition_id],
    )
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'abandoned', done_at = now(), "
            "step_detail = step_detail || %s WHERE transition_id = %s"
        ).format(qualified(schema, "transitions")),
        [Jsonb({"abandoned": why}), transition_id],
    )
