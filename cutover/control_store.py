"""The control store: the tables that hold the pipeline's and the cutover's own state, in the
database it is told to use (commerce for the forward direction; legacy for the reverse one).

This module owns the control-plane DDL (``control_plane.sql``) and the domain-state rows that the
state machine (:mod:`control.state`) moves and the read router (:mod:`cutover.routing`) follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from cutover import pg

Conn = psycopg.Connection[Any]

REPLICATING = "replicating"
SWITCHING_READS = "switching_reads"
READS_SWITCHED = "reads_switched"
ROLLING_BACK = "rolling_back"
WRITES_SWITCHED = "writes_switched"
COMPLETED = "completed"

STATES: tuple[str, ...] = (
    REPLICATING,
    SWITCHING_READS,
    READS_SWITCHED,
    ROLLING_BACK,
    WRITES_SWITCHED,
)
STABLE = frozenset({REPLICATING, READS_SWITCHED, WRITES_SWITCHED})
IN_FLIGHT = frozenset({SWITCHING_READS, ROLLING_BACK})
#: States whose reads are served by commerce (they count for the migration progress).
COMMERCE_READS = frozenset({READS_SWITCHED, WRITES_SWITCHED, COMPLETED})
#: States whose writes are taken by commerce (legacy's tables of the domain are fenced).
COMMERCE_WRITES = frozenset({WRITES_SWITCHED, COMPLETED})

# Advisory lock key for creating the control plane ("cutc" as an integer).
_DDL_LOCK = 0x63757463


def control_plane_ddl() -> str:
    """The text of ``cutover/control_plane.sql`` (unqualified names, see its header)."""
    return resources.files("cutover").joinpath("control_plane.sql").read_text(encoding="utf-8")


def ensure_control_plane(conn: Conn, schema: str) -> None:
    """Create the control schema and tables if missing (idempotent, safe concurrently).

    Runs under a transaction-level advisory lock: two commands starting at once on a fresh
    database would otherwise race on CREATE TABLE IF NOT EXISTS (a catalog unique violation).
    """
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_DDL_LOCK])
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(control_plane_ddl().encode())
    except psycopg.Error as exc:
        raise pg.translate(
            exc, f"creating the control tables in schema {schema}", "target"
        ) from None


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
            },
        }


def qualified(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table)


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
        raise pg.translate(exc, "initialising cutover.domain_state", "target") from None


_STATE_QUERY = (
    "SELECT s.domain, s.state, s.version, s.changed_at, s.actor, s.transition_id::text, "
    "t.from_state, t.to_state, t.version, t.published_at IS NOT NULL, t.status, t.created_at "
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
        raise pg.translate(exc, "reading cutover.domain_state", "target") from None
    return {r[0]: _row_to_state(r) for r in rows}
