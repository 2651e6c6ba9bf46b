"""The producer's control tables in the LEGACY database (schema ``cutover``).

They live next to the data they describe so that one PostgreSQL transaction can never disagree
with itself, and they are never published: the publication lists the mapped ``shop`` tables by
name (with column lists), so writes here produce WAL but no change events.

* ``producer_state``: per slot, ``delivered_lsn`` = the end LSN of the last source transaction
  whose every event Kafka acknowledged. It is written *before* the slot is advanced (write-ahead),
  so after any crash ``slot.confirmed_flush_lsn <= delivered_lsn`` holds. A slot found *ahead* of
  the record moved behind our back (advanced by someone else, or dropped and recreated): events
  may be missing from Kafka and the producer refuses to start (:class:`SlotSafetyError`).
* ``table_schemas``: per slot and table, the published column list (name, type oid, typmod) of
  the last writer schema, so that an incompatible change is refused after a restart too, not only
  when the producer saw both versions.
* ``snapshot_requests``: initial loads (``kind = 'initial'``, one per table, created by the
  producer on its first start) and requests from ``cutover snapshot --table T [--where FILTER]``.
* ``snapshot_progress``: per request, the primary key of the last chunk row read and the rows
  emitted; written only after the chunk's rows were acknowledged and the slot advanced past the
  chunk's high watermark, so a killed producer resumes with that chunk.

All SQL is static text or composed with :mod:`psycopg.sql`; values travel as parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from cutover import pg
from cutover.codec import ColumnSpec

SCHEMA: Final = "cutover"
TABLES: Final = ("producer_state", "table_schemas", "snapshot_requests", "snapshot_progress")

Conn = psycopg.Connection[Any]

DDL: Final = """
CREATE SCHEMA IF NOT EXISTS cutover;

-- What the producer delivered, per slot. Written before the slot is advanced (write-ahead).
CREATE TABLE IF NOT EXISTS cutover.producer_state (
    slot_name      text        PRIMARY KEY,
    publication    text        NOT NULL,
    delivered_lsn  bigint      NOT NULL,  -- end LSN of the last source tx fully acked by Kafka
    producer       text,                  -- host:pid of the producer that wrote it
    heartbeat_at   timestamptz,           -- last time the producer advanced or heartbeated
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Last published column list per table (to refuse incompatible changes across restarts).
CREATE TABLE IF NOT EXISTS cutover.table_schemas (
    slot_name    text        NOT NULL,
    source_table text        NOT NULL,    -- schema.table
    columns      jsonb       NOT NULL,    -- [[name, type_oid, typmod], ...]
    fingerprint  text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, source_table)
);

CREATE TABLE IF NOT EXISTS cutover.snapshot_requests (
    id           bigserial   PRIMARY KEY,
    slot_name    text        NOT NULL,
    source_table text        NOT NULL,    -- the mapping's table name (in its source_schema)
    where_sql    text,                    -- optional filter as the operator wrote it (parsed again)
    kind         text        NOT NULL CHECK (kind IN ('initial', 'request')),
    status       text        NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'done', 'failed')),
    requested_by text,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    error        text
);
CREATE INDEX IF NOT EXISTS snapshot_requests_open_idx
    ON cutover.snapshot_requests (slot_name, id) WHERE status IN ('pending', 'running');

CREATE TABLE IF NOT EXISTS cutover.snapshot_progress (
    request_id   bigint      PRIMARY KEY REFERENCES cutover.snapshot_requests (id),
    last_pk      jsonb,                   -- text of the primary key values of the last row read
    rows_emitted bigint      NOT NULL DEFAULT 0,
    chunks       integer     NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
"""


def missing_tables(conn: Conn) -> list[str]:
    """The control tables that do not exist yet (all of them on a fresh database)."""
    try:
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = 'r' AND c.relname = ANY(%s)",
            (SCHEMA, list(TABLES)),
        ).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the control tables", "source") from None
    present = {r[0] for r in rows}
    return [t for t in TABLES if t not in present]


def ensure_schema(conn: Conn) -> list[str]:
    """Create the control schema and tables if needed; return the tables that were created."""
    missing = missing_tables(conn)
    if missing:
        try:
            with conn.transaction():
                conn.execute(DDL)
        except psycopg.Error as exc:
            raise pg.translate(
                exc, "creating the control tables in schema cutover", "source"
            ) from None
    return missing


# ---------------------------------------------------------------------------------------------
# producer_state
# ---------------------------------------------------------------------------------------------


def read_position(conn: Conn, slot: str) -> int | None:
    """The recorded ``delivered_lsn`` of ``slot``, or None if nothing was ever recorded."""
    try:
        row = conn.execute(
            "SELECT delivered_lsn FROM cutover.producer_state WHERE slot_name = %s", (slot,)
        ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading cutover.producer_state", "source") from None
    return None if row is None else int(row[0])


def record_position(
    conn: Conn, slot: str, publication: str, lsn: int, producer: str | None
) -> None:
    """Durably record that everything up to ``lsn`` was delivered (never moves backwards)."""
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO cutover.producer_state AS s"
                " (slot_name, publication, delivered_lsn, producer, heartbeat_at)"
                " VALUES (%s, %s, %s, %s, now())"
                " ON CONFLICT (slot_name) DO UPDATE SET"
                "  delivered_lsn = GREATEST(s.delivered_lsn, EXCLUDED.delivered_lsn),"
                "  publication = EXCLUDED.publication, producer = EXCLUDED.producer,"
                "  heartbeat_at = now(), updated_at = now()",
                (slot, publication, lsn, producer),
            )
    except psycopg.Error as exc:
        raise pg.translate(
            exc, "recording the delivered position in cutover.producer_state", "source"
        ) from None


def reset_position(conn: Conn, slot: str, publication: str, lsn: int) -> None:
    """Set the record to ``lsn`` whatever it was (init adopting a slot; explicit re-snapshot)."""
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO cutover.producer_state (slot_name, publication, delivered_lsn)"
                " VALUES (%s, %s, %s) ON CONFLICT (slot_name) DO UPDATE SET"
                " delivered_lsn = EXCLUDED.delivered_lsn, publication = EXCLUDED.publication,"
                " updated_at = now()",
                (slot, publication, lsn),
            )
    except psycopg.Error as exc:
        raise pg.translate(exc, "resetting cutover.producer_state", "source") from None


# ---------------------------------------------------------------------------------------------
# table_schemas
# ---------------------------------------------------------------------------------------------


def read_table_columns(conn: Conn, slot: str) -> dict[str, tuple[ColumnSpec, ...]]:
    """Last published column list per ``schema.table`` for ``slot``."""
    try:
        rows = conn.execute(
            "SELECT source_table, columns FROM cutover.table_schemas WHERE slot_name = %s",
            (slot,),
        ).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading cutover.table_schemas", "source") from None
    out: dict[str, tuple[ColumnSpec, ...]] = {}
    for table, cols in rows:
        out[table] = tuple(ColumnSpec(str(n), int(o), int(m)) for n, o, m in cols)
    return out


def record_table_columns(
    conn: Conn, slot: str, table: str, columns: Sequence[ColumnSpec], fingerprint: str
) -> None:
    payload = json.dumps([[c.name, c.type_oid, c.type_modifier] for c in columns])
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO cutover.table_schemas (slot_name, source_table, columns, fingerprint)"
                " VALUES (%s, %s, %s::jsonb, %s) ON CONFLICT (slot_name, source_table) DO UPDATE"
                " SET columns = EXCLUDED.columns, fingerprint = EXCLUDED.fingerprint,"
                " updated_at = now()",
                (slot, table, payload, fingerprint),
            )
    except psycopg.Error as exc:
        raise pg.translate(
            exc, "recording a table schema in cutover.table_schemas", "source"
        ) from None


# ---------------------------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """One snapshot to run (a whole table, or the rows matching ``where_sql``)."""

    id: int
    source_table: str
    where_sql: str | None
    kind: str
    status: str
    last_pk: tuple[str, ...] | None
    rows_emitted: int
    chunks: int


def request_snapshot(
    conn: Conn,
    slot: str,
    table: str,
    where_sql: str | None,
    *,
    kind: str = "request",
    requested_by: str | None = None,
) -> int:
    """Queue a snapshot of ``table``; the running producer picks it up. Returns its id."""
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO cutover.snapshot_requests"
                " (slot_name, source_table, where_sql, kind, requested_by)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (slot, table, where_sql, kind, requested_by),
            ).fetchone()
            assert row is not None
            conn.execute(
                "INSERT INTO cutover.snapshot_progress (request_id) VALUES (%s)", (row[0],)
            )
    except psycopg.Error as exc:
        raise pg.translate(
            exc, "queueing a snapshot in cutover.snapshot_requests", "source"
        ) from None
    return int(row[0])


def ensure_initial_requests(conn: Conn, slot: str, tables: Sequence[str]) -> list[int]:
    """Queue an initial snapshot for every table that never had one on ``slot``."""
    try:
        rows = conn.execute(
            "SELECT source_table FROM cutover.snapshot_requests"
            " WHERE slot_name = %s AND kind = 'initial'",
            (slot,),
        ).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading cutover.snapshot_requests", "source") from None
    done = {r[0] for r in rows}
    return [
        request_snapshot(conn, slot, t, None, kind="initial", requested_by="producer")
        for t in tables
        if t not in done
    ]


def open_requests(conn: Conn, slot: str) -> list[SnapshotRequest]:
    """Pending and running requests of ``slot``, oldest first."""
    try:
        rows = conn.execute(
            "SELECT r.id, r.source_table, r.where_sql, r.kind, r.status, p.last_pk,"
            " coalesce(p.rows_emitted, 0), coalesce(p.chunks, 0)"
            " FROM cutover.snapshot_requests r"
            " LEFT JOIN cutover.snapshot_progress p ON p.request_id = r.id"
            " WHERE r.slot_name = %s AND r.status IN ('pending', 'running') ORDER BY r.id",
            (slot,),
        ).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading cutover.snapshot_requests", "source") from None
    return [
        SnapshotRequest(
            id=int(r[0]),
            source_table=str(r[1]),
            where_sql=r[2],
            kind=str(r[3]),
            status=str(r[4]),
            last_pk=tuple(r[5]) if r[5] is not None else None,
            rows_emitted=int(r[6]),
            chunks=int(r[7]),
        )
        for r in rows
    ]


def mark_request(conn: Conn, request_id: int, status: str, error: str | None = None) -> None:
    """Move a request to ``running``, ``done`` or ``failed``."""
    stamp = {"running": "started_at", "done": "finished_at", "failed": "finished_at"}[status]
    query = sql.SQL(
        "UPDATE cutover.snapshot_requests SET status = %s, error = %s,"
        " {stamp} = coalesce({stamp}, now()) WHERE id = %s"
    ).format(stamp=sql.Identifier(stamp))
    try:
        with conn.transaction():
            conn.execute(query, (status, error, request_id))
    except psycopg.Error as exc:
        raise pg.translate(exc, "updating cutover.snapshot_requests", "source") from None


def record_progress(
    conn: Conn, request_id: int, last_pk: Sequence[str], rows: int, *, done: bool
) -> None:
    """Record a finished chunk (after its rows were acked and the slot advanced past it)."""
    try:
        with conn.transaction():
            conn.execute(
                "UPDATE cutover.snapshot_progress SET last_pk = %s::jsonb,"
                " rows_emitted = rows_emitted + %s, chunks = chunks + 1, updated_at = now()"
                " WHERE request_id = %s",
                (json.dumps(list(last_pk)), rows, request_id),
            )
            if done:
                conn.execute(
                    # Not over a cancellation (cutover snapshot --cancel) made meanwhile.
                    "UPDATE cutover.snapshot_requests SET status = 'done',"
                    " finished_at = now() WHERE id = %s AND status = 'running'",
                    (request_id,),
                )
    except psycopg.Error as exc:
        raise pg.translate(exc, "recording snapshot progress", "source") from None


def reset_snapshots(conn: Conn, slot: str) -> None:
    """Forget every snapshot of ``slot`` so the producer reloads all tables (re-snapshot)."""
    try:
        with conn.transaction():
            conn.execute(
                "UPDATE cutover.snapshot_requests SET status = 'failed',"
                " error = 'superseded by a re-snapshot', finished_at = now()"
                " WHERE slot_name = %s AND status IN ('pending', 'running')",
                (slot,),
            )
            conn.execute(
                "UPDATE cutover.snapshot_requests SET kind = 'request'"
                " WHERE slot_name = %s AND kind = 'initial'",
                (slot,),
            )
    except psycopg.Error as exc:
        raise pg.translate(exc, "resetting snapshots", "source") from None
