"""The write fence: a guard inside a database that refuses writes to one domain's tables there.

"Never two writable sides" has to hold for an application instance that missed the switch, so
the guard lives in the database, not in the router: a statement-level trigger on each of the
domain's tables (``fence.sql``) refuses INSERT, UPDATE, DELETE and TRUNCATE with SQLSTATE 25006
(read-only transaction), naming the table, the domain and its state, while the domain's row in
``write_fence`` says it is fenced. Sessions with a replication origin set up (the appliers) pass.

Raising the fence waits for every writer the guard admitted before it (they hold FOR SHARE on
the fence row), so the WAL position read after it, the *fence LSN*, is past every write the
fenced side will ever take for the domain. The same code fences legacy (switch-writes) and
commerce (rollback-writes): it is told which database and control schema to use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from cutover import pg

Conn = psycopg.Connection[Any]

#: The SQLSTATE of a write the fence refused (read_only_sql_transaction).
FENCE_SQLSTATE = "25006"
#: The DETAIL every refusal carries, followed by the domain name.
FENCE_DETAIL_PREFIX = "cutover fence of domain "
TRIGGER_NAME = "cutover_write_fence"
#: The guard's UPDATE trigger on a table whose fence covers some columns only.
UPDATE_TRIGGER_NAME = "cutover_write_fence_update"


@dataclass(frozen=True, slots=True)
class FenceState:
    """One row of ``write_fence``."""

    domain: str
    fenced: bool
    state: str
    reason: str | None
    changed_at: datetime
    fence_lsn: int | None


def fence_ddl() -> str:
    """The text of ``cutover/fence.sql`` (unqualified names; run with search_path set)."""
    return resources.files("cutover").joinpath("fence.sql").read_text(encoding="utf-8")


def install(
    conn: Conn,
    schema: str,
    domain_tables: Mapping[str, Sequence[tuple[str, str]]],
    *,
    side: str,
    update_columns: Mapping[tuple[str, str], Sequence[str]] | None = None,
) -> None:
    """Create the fence table and guard in ``schema`` and put the guard on every table of every
    domain (``domain -> [(schema, table), ...]``). Idempotent; never lowers or raises a fence.

    ``update_columns`` narrows the guard's UPDATE part of a table to the columns the domain
    moved (``UPDATE OF ...``): on legacy, the mapped columns of a table that also holds columns
    commerce never takes (the social profile of ``shop.users``), so the legacy social app keeps
    updating those while the domain's writes live in commerce. INSERT, DELETE and TRUNCATE are
    refused whole: a row is one thing to create or remove.
    """
    narrowed = update_columns or {}
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(fence_ddl().encode())
            for domain, tables in domain_tables.items():
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (domain) VALUES (%s) ON CONFLICT (domain) DO NOTHING"
                    ).format(sql.Identifier(schema, "write_fence")),
                    [domain],
                )
                for table in tables:
                    _guard(conn, schema, domain, table, narrowed.get(table))
    except psycopg.Error as exc:
        raise pg.translate(exc, "installing the write fence", side) from None


def _guard(
    conn: Conn, schema: str, domain: str, table: tuple[str, str], columns: Sequence[str] | None
) -> None:
    """The guard triggers of one table: one for whole-row writes, one for UPDATE when narrowed."""
    target = sql.Identifier(*table)
    call = sql.SQL("EXECUTE FUNCTION {}({}, {})").format(
        sql.Identifier(schema, "write_fence_guard"), sql.Literal(domain), sql.Literal(schema)
    )
    whole = "INSERT OR DELETE OR TRUNCATE" if columns else "INSERT OR UPDATE OR DELETE OR TRUNCATE"
    conn.execute(
        sql.SQL("CREATE OR REPLACE TRIGGER {} BEFORE {} ON {} FOR EACH STATEMENT {}").format(
            sql.Identifier(TRIGGER_NAME), sql.SQL(whole), target, call
        )
    )
    if not columns:
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(UPDATE_TRIGGER_NAME), target
            )
        )
        return
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {} BEFORE UPDATE OF {} ON {} FOR EACH STATEMENT {}"
        ).format(
            sql.Identifier(UPDATE_TRIGGER_NAME),
            sql.SQL(", ").join(sql.Identifier(c) for c in sorted(columns)),
            target,
            call,
        )
    )


def raise_fence(conn: Conn, schema: str, domain: str, *, state: str, reason: str, side: str) -> int:
    """Fence ``domain`` and return the fence LSN (as an integer).

    1. lock the domain's fence row FOR UPDATE: this waits until every transaction the guard
       admitted (each holds FOR SHARE on the row) has committed or rolled back;
    2. mark it fenced and COMMIT: from here every new write is refused;
    3. read the WAL insert position: every admitted write committed before it.
    """
    table = sql.Identifier(schema, "write_fence")
    try:
        with conn.transaction():
            row = conn.execute(
                sql.SQL("SELECT 1 FROM {} WHERE domain = %s FOR UPDATE").format(table), [domain]
            ).fetchone()
            if row is None:
                raise psycopg.errors.NoDataFound(
                    f"no write fence is installed for domain {domain}: run `cutover init`"
                )
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET fenced = true, state = %s, reason = %s, changed_at = now() "
                    "WHERE domain = %s"
                ).format(table),
                [state, reason, domain],
            )
        with conn.transaction():
            lsn_row = conn.execute(
                sql.SQL(
                    "UPDATE {} SET fence_lsn = pg_current_wal_lsn() WHERE domain = %s "
                    "RETURNING (fence_lsn - '0/0'::pg_lsn)::bigint"
                ).format(table),
                [domain],
            ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, f"fencing domain {domain}", side) from None
    assert lsn_row is not None  # the row exists: it was locked above
    return int(lsn_row[0])


def lower_fence(conn: Conn, schema: str, domain: str, *, state: str, side: str) -> None:
    """Let writes to ``domain`` through again (idempotent)."""
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET fenced = false, state = %s, reason = NULL, "
                    "changed_at = now() WHERE domain = %s"
                ).format(sql.Identifier(schema, "write_fence")),
                [state, domain],
            )
    except psycopg.Error as exc:
        raise pg.translate(exc, f"unfencing domain {domain}", side) from None


def note_state(conn: Conn, schema: str, domain: str, *, state: str, side: str) -> None:
    """Tell a raised fence the domain's new state (its refusals name it); takes no lock a
    writer holds, since the fenced side has no admitted writers left."""
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("UPDATE {} SET state = %s WHERE domain = %s AND fenced").format(
                    sql.Identifier(schema, "write_fence")
                ),
                [state, domain],
            )
    except psycopg.Error as exc:
        raise pg.translate(exc, f"updating the fence of {domain}", side) from None


def fence_states(conn: Conn, schema: str, *, side: str) -> dict[str, FenceState]:
    """Every domain's fence row; an empty dict if the fence was never installed."""
    try:
        rows = conn.execute(
            sql.SQL(
                "SELECT domain, fenced, state, reason, changed_at, "
                "(fence_lsn - '0/0'::pg_lsn)::bigint FROM {} ORDER BY domain"
            ).format(sql.Identifier(schema, "write_fence"))
        ).fetchall()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        return {}
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the write fences", side) from None
    return {
        r[0]: FenceState(r[0], bool(r[1]), r[2], r[3], r[4], None if r[5] is None else int(r[5]))
        for r in rows
    }


def is_fence_refusal(exc: BaseException) -> bool:
    """True when ``exc`` is a write the fence refused (retry it where the router says)."""
    if not isinstance(exc, psycopg.Error) or exc.sqlstate != FENCE_SQLSTATE:
        return False
    detail = exc.diag.message_detail or ""
    return detail.startswith(FENCE_DETAIL_PREFIX)
