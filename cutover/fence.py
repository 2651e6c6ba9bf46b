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

The fence is also in the WAL: raising and lowering emit a transactional logical message
(prefix ``cutover.fence``, JSON ``{"domain": ..., "fenced": ...}``) in the transaction that
flips the row, and log it in ``write_fence_log`` at the message's LSN. The producer reading the
database drops a fenced domain's row changes from there on (:mod:`producers.events`): the only
writes a raised fence admits are an applier's (not echoed anyway) and, on a table whose fence is
narrowed, UPDATEs of columns commerce never holds. Those carry the whole row, whose mapped
values may be older than what the other side holds by then; forwarding them could overwrite a
newer value there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Final

import psycopg
from psycopg import sql

from cutover import pg
from cutover.envelope import lsn_to_str
from cutover.errors import UsageError

Conn = psycopg.Connection[Any]

#: The SQLSTATE of a write the fence refused (read_only_sql_transaction).
FENCE_SQLSTATE = "25006"
#: The dollar quote of the guard's body in fence.sql.
_BODY_QUOTE: Final = "$guard$"
#: The DETAIL every refusal carries, followed by the domain name.
FENCE_DETAIL_PREFIX = "cutover fence of domain "
TRIGGER_NAME = "cutover_write_fence"
#: The guard's UPDATE trigger on a table whose fence covers some columns only.
UPDATE_TRIGGER_NAME = "cutover_write_fence_update"
#: Prefix of the logical message a raise or lower emits in its transaction.
FENCE_MESSAGE_PREFIX: Final = "cutover.fence"
#: Prefix of the message committed after the fence LSN is read: the producer reading the
#: database checkpoints past the fence LSN at once, not at its next idle heartbeat.
FENCE_LSN_MESSAGE_PREFIX: Final = "cutover.fence.lsn"


@dataclass(frozen=True, slots=True)
class FenceState:
    """One row of ``write_fence``."""

    domain: str
    fenced: bool
    state: str
    reason: str | None
    changed_at: datetime
    fence_lsn: int | None


def fence_ddl(quoted_schema: str) -> str:
    """The text of ``cutover/fence.sql`` for the fence schema ``quoted_schema`` (its quoted
    identifier, which the guard's static query names); run it with search_path set to it."""
    if _BODY_QUOTE in quoted_schema:  # it would end the guard's body early
        raise UsageError(f"the control schema name {quoted_schema} contains {_BODY_QUOTE}")
    text = resources.files("cutover").joinpath("fence.sql").read_text(encoding="utf-8")
    return text.replace("@fence_schema@", quoted_schema)


def fence_message(domain: str, fenced: bool) -> bytes:
    """The content of a ``cutover.fence`` message (see :func:`parse_fence_message`)."""
    return json.dumps({"domain": domain, "fenced": fenced}, sort_keys=True).encode()


def parse_fence_message(content: bytes) -> tuple[str, bool] | None:
    """(domain, fenced) of a ``cutover.fence`` message; None for content of another shape
    (an older release's message carried the bare domain name after the fence LSN: no change)."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    domain, fenced = body.get("domain"), body.get("fenced")
    if not isinstance(domain, str) or not isinstance(fenced, bool):
        return None
    return domain, fenced


def _log(conn: Conn, schema: str, domain: str, fenced: bool) -> None:
    """Emit the fence message in the open transaction and log it at the message's LSN."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (lsn, domain, fenced) "
            "VALUES (pg_logical_emit_message(true, %s, %s::bytea), %s, %s)"
        ).format(sql.Identifier(schema, "write_fence_log")),
        [FENCE_MESSAGE_PREFIX, fence_message(domain, fenced), domain, fenced],
    )


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
            conn.execute(fence_ddl(sql.Identifier(schema).as_string(conn)).encode())
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
    2. mark it fenced, emit the fence message (and log it) and COMMIT: from here every new
       write is refused, and the producer reading this database drops the domain's changes;
    3. read the WAL insert position: every admitted write committed before it; a message
       committed after it lets the producer checkpoint past it at once.
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
            _log(conn, schema, domain, True)
        with conn.transaction():
            lsn_row = conn.execute(
                sql.SQL(
                    "UPDATE {} SET fence_lsn = pg_current_wal_lsn() WHERE domain = %s "
                    "RETURNING (fence_lsn - '0/0'::pg_lsn)::bigint"
                ).format(table),
                [domain],
            ).fetchone()
            conn.execute(
                "SELECT pg_logical_emit_message(true, %s, %s)", [FENCE_LSN_MESSAGE_PREFIX, domain]
            )
    except psycopg.Error as exc:
        raise pg.translate(exc, f"fencing domain {domain}", side) from None
    assert lsn_row is not None  # the row exists: it was locked above
    return int(lsn_row[0])


def lower_fence(conn: Conn, schema: str, domain: str, *, state: str, side: str) -> None:
    """Let writes to ``domain`` through again (idempotent; the message is emitted and logged
    each time, which changes nothing for a producer that already saw the fence down)."""
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET fenced = false, state = %s, reason = NULL, "
                    "changed_at = now() WHERE domain = %s"
                ).format(sql.Identifier(schema, "write_fence")),
                [state, domain],
            )
            _log(conn, schema, domain, False)
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
    """Every domain's fence row; an empty dict if the fence was never installed, or installed
    by a release without ``write_fence_log`` (the next ``cutover init`` adds it; until then
    the fence gate fails closed, since raising it there would fail)."""
    try:
        rows = conn.execute(
            sql.SQL(
                "SELECT domain, fenced, state, reason, changed_at, "
                "(fence_lsn - '0/0'::pg_lsn)::bigint FROM {} "
                "WHERE to_regclass(%s) IS NOT NULL ORDER BY domain"
            ).format(sql.Identifier(schema, "write_fence")),
            [sql.Identifier(schema, "write_fence_log").as_string(None)],
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


def installed_without_log(conn: Conn, schema: str, *, side: str) -> bool:
    """Whether an older release's fence is installed (``write_fence`` without ``write_fence_log``):
    :func:`fence_states` then reads nothing, so whoever needs the fences must refuse, not pass."""
    try:
        row = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NULL",
            [
                sql.Identifier(schema, "write_fence").as_string(None),
                sql.Identifier(schema, "write_fence_log").as_string(None),
            ],
        ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the write fences", side) from None
    return bool(row and row[0])


def fenced_at(conn: Conn, schema: str, lsn: int, *, side: str) -> frozenset[str]:
    """The domains whose fence was raised at WAL position ``lsn`` (a slot's confirmed position):
    the last logged raise or lower of each before it. Empty if the fence was never installed.

    Exact at a transaction boundary: a fence transaction whose message is before ``lsn`` but
    which commits after it can only have writes of fence-exempt kinds committed in between (the
    raise waited for every admitted writer before emitting), and dropping those loses nothing.
    """
    try:
        rows = conn.execute(
            sql.SQL(
                "SELECT DISTINCT ON (domain) domain, fenced FROM {} "
                "WHERE lsn < %s::pg_lsn ORDER BY domain, lsn DESC"
            ).format(sql.Identifier(schema, "write_fence_log")),
            [lsn_to_str(lsn)],
        ).fetchall()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        return frozenset()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the write fence log", side) from None
    return frozenset(str(r[0]) for r in rows if r[1])


def is_fence_refusal(exc: BaseException) -> bool:
    """True when ``exc`` is a write the fence refused (retry it where the router says)."""
    if not isinstance(exc, psycopg.Error) or exc.sqlstate != FENCE_SQLSTATE:
        return False
    detail = exc.diag.message_detail or ""
    return detail.startswith(FENCE_DETAIL_PREFIX)
