"""The audit trail (``control.audit`` in the commerce database) and ``cutover audit``.

Every command that changes, or tries to change, the cutover state writes one entry: who (the OS
user, or ``--actor``), when, what (command, domain, from → to state, transition id), how it ended
(``done``, ``resumed``, ``noop``, ``refused``, ``dry_run``, ``cancelled``, ``failed``), whether
gates were forced and why, and every gate with its evidence. Entries are only ever inserted.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from cutover import pg

__all__ = ["AuditEntry", "default_actor", "list_entries", "record"]

Conn = psycopg.Connection[Any]


def default_actor(explicit: str | None = None) -> str:
    """``--actor`` if given, else the OS user running the command."""
    if explicit:
        return explicit
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (some containers)
        return "unknown"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    audit_id: int
    at: datetime
    actor: str
    command: str
    domain: str | None
    outcome: str
    forced: bool
    reason: str | None
    transition_id: str | None
    from_state: str | None
    to_state: str | None
    gates: list[dict[str, Any]]
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "audit_id": self.audit_id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "command": self.command,
            "domain": self.domain,
            "outcome": self.outcome,
            "forced": self.forced,
            "reason": self.reason,
            "transition_id": self.transition_id,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "gates": self.gates,
            "detail": self.detail,
        }

    def gates_summary(self) -> str:
        if not self.gates:
            return "-"
        failing = [str(g.get("gate")) for g in self.gates if not g.get("passed")]
        return f"FAIL: {', '.join(failing)}" if failing else "all pass"


def record(
    conn: Conn,
    schema: str,
    *,
    actor: str,
    command: str,
    outcome: str,
    domain: str | None = None,
    forced: bool = False,
    reason: str | None = None,
    transition_id: str | None = None,
    from_state: str | None = None,
    to_state: str | None = None,
    gates: Sequence[Mapping[str, Any]] = (),
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Insert one audit entry; returns its id."""
    try:
        row = conn.execute(
            sql.SQL(
                "INSERT INTO {} (actor, command, domain, outcome, forced, reason, transition_id, "
                "from_state, to_state, gates, detail) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING audit_id"
            ).format(sql.Identifier(schema, "audit")),
            [
                actor,
                command,
                domain,
                outcome,
                forced,
                reason,
                transition_id,
                from_state,
                to_state,
                json.dumps([dict(g) for g in gates], default=str),
                json.dumps(dict(detail or {}), default=str),
            ],
        ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, "writing the audit entry", "target") from None
    assert row is not None
    return int(row[0])


def list_entries(
    conn: Conn, schema: str, *, domain: str | None = None, limit: int = 100
) -> list[AuditEntry]:
    """The latest ``limit`` entries (optionally of one domain), oldest first."""
    where = sql.SQL("WHERE domain = %s") if domain else sql.SQL("")
    params: list[object] = [domain] if domain else []
    try:
        rows = conn.execute(
            sql.SQL(
                "SELECT * FROM (SELECT audit_id, at, actor, command, domain, outcome, forced, "
                "reason, transition_id::text, from_state, to_state, gates, detail FROM {} {} "
                "ORDER BY audit_id DESC LIMIT %s) AS x ORDER BY audit_id"
            ).format(sql.Identifier(schema, "audit"), where),
            [*params, limit],
        ).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the audit trail", "target") from None
    return [AuditEntry(*r) for r in rows]
