"""The producer's state, kept in the database it reads (legacy, schema ``cutover``, in the
forward direction) so that one PostgreSQL transaction can never disagree with itself.

* ``producer_state``: per slot, ``delivered_lsn`` = the end LSN of the last source transaction
  whose every event Kafka acknowledged. It is written *before* the slot is advanced (write-ahead),
  so after any crash ``slot.confirmed_flush_lsn <= delivered_lsn`` holds. A slot found *ahead* of
  the record moved behind our back (advanced by someone else, or dropped and recreated): events
  may be missing from Kafka and the producer refuses to start (:class:`SlotSafetyError`).
  ``heartbeat_at`` is what the monitor and the ``producer_heartbeat`` gate read.
* ``table_schemas``: per slot and table, the published column list (name, type oid, typmod) of
  the last writer schema, so that an incompatible change is refused after a restart too, not only
  when the producer saw both versions.
* ``snapshot_requests``: initial loads (``kind = 'initial'``, one per table, created by the
  producer on its first start) and requests from ``cutover snapshot --table T [--where FILTER]``.
* ``snapshot_progress``: per request, the primary key of the last chunk row read and the rows
  emitted; written only after the chunk's rows were acknowledged and the slot advanced past the
  chunk's high watermark, so a killed producer resumes with that chunk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import pq, sql

from cutover.codec import ColumnSpec
from cutover.control_store.store import ControlStore

_STATE: Final = "producer_state"
_SCHEMAS: Final = "table_schemas"
_REQUESTS: Final = "snapshot_requests"
_PROGRESS: Final = "snapshot_progress"

# ---------------------------------------------------------------------------------------------
# producer_state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The producer's last sign of life on a slot (the database computes the age)."""

    age_s: float | None
    delivered_lsn: int
    producer: str | None


def read_position(store: ControlStore, slot: str) -> int | None:
    """The recorded ``delivered_lsn`` of ``slot``, or None if nothing was ever recorded."""
    row = store.execute(
        sql.SQL("SELECT delivered_lsn FROM {} WHERE slot_name = %s").format(store.table(_STATE)),
        (slot,),
        doing=f"reading {store.schema}.producer_state",
    ).fetchone()
    return None if row is None else int(row[0])


def record_position(
    store: ControlStore, slot: str, publication: str, lsn: int, producer: str | None
) -> None:
    """Durably record that everything up to ``lsn`` was delivered (never moves backwards)."""
    query = sql.SQL(
        "INSERT INTO {} AS s (slot_name, publication, delivered_lsn, producer, heartbeat_at)"
        " VALUES (%s, %s, %s, %s, now())"
        " ON CONFLICT (slot_name) DO UPDATE SET"
        "  delivered_lsn = GREATEST(s.delivered_lsn, EXCLUDED.delivered_lsn),"
        "  publication = EXCLUDED.publication, producer = EXCLUDED.producer,"
        "  heartbeat_at = now(), updated_at = now()"
    ).format(store.table(_STATE))
    params = (slot, publication, lsn, producer)
    try:
        conn = store.conn
        if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
            # One statement commits on its own: one round trip in every producer cycle, where
            # an explicit transaction costs three (BEGIN, INSERT, COMMIT).
            conn.execute(query, params)
        else:
            with conn.transaction():
                conn.execute(query, params)
    except psycopg.Error as exc:
        raise store.error(
            exc, f"recording the delivered position in {store.schema}.producer_state"
        ) from None


def reset_position(store: ControlStore, slot: str, publication: str, lsn: int) -> None:
    """Set the record to ``lsn`` whatever it was (init adopting a slot; explicit re-snapshot)."""
    query = sql.SQL(
        "INSERT INTO {} (slot_name, publication, delivered_lsn)"
        " VALUES (%s, %s, %s) ON CONFLICT (slot_name) DO UPDATE SET"
        " delivered_lsn = EXCLUDED.delivered_lsn, publication = EXCLUDED.publication,"
        " updated_at = now()"
    ).format(store.table(_STATE))
    try:
        with store.conn.transaction():
            store.conn.execute(query, (slot, publication, lsn))
    except psycopg.Error as exc:
        raise store.error(exc, f"resetting {store.schema}.producer_state") from None


def read_heartbeat(store: ControlStore, slot: str) -> Heartbeat | None:
    """The slot's heartbeat (None when the producer never recorded a position for it)."""
    row = store.execute(
        sql.SQL(
            "SELECT extract(epoch FROM now() - heartbeat_at)::float8, delivered_lsn, producer"
            " FROM {} WHERE slot_name = %s"
        ).format(store.table(_STATE)),
        (slot,),
        doing=f"reading {store.schema}.producer_state",
    ).fetchone()
    if row is None:
        return None
    return Heartbeat(None if row[0] is None else float(row[0]), int(row[1]), row[2])


# ---------------------------------------------------------------------------------------------
# table_schemas
# ---------------------------------------------------------------------------------------------


def read_table_columns(store: ControlStore, slot: str) -> dict[str, tuple[ColumnSpec, ...]]:
    """Last published column list per ``schema.table`` for ``slot``."""
    rows = store.execute(
        sql.SQL("SELECT source_table, columns FROM {} WHERE slot_name = %s").format(
            store.table(_SCHEMAS)
        ),
        (slot,),
        doing=f"reading {store.schema}.table_schemas",
    ).fetchall()
    out: dict[str, tuple[ColumnSpec, ...]] = {}
    for table, cols in rows:
        out[table] = tuple(ColumnSpec(str(n), int(o), int(m)) for n, o, m in cols)
    return out


def record_table_columns(
    store: ControlStore, slot: str, table: str, columns: Sequence[ColumnSpec], fingerprint: str
) -> None:
    payload = json.dumps([[c.name, c.type_oid, c.type_modifier] for c in columns])
    query = sql.SQL(
        "INSERT INTO {} (slot_name, source_table, columns, fingerprint)"
        " VALUES (%s, %s, %s::jsonb, %s) ON CONFLICT (slot_name, source_table) DO UPDATE"
        " SET columns = EXCLUDED.columns, fingerprint = EXCLUDED.fingerprint,"
        " updated_at = now()"
    ).format(store.table(_SCHEMAS))
    try:
        with store.conn.transaction():
            store.conn.execute(query, (slot, table, payload, fingerprint))
    except psycopg.Error as exc:
        raise store.error(
            exc, f"recording a table schema in {store.schema}.table_schemas"
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
    store: ControlStore,
    slot: str,
    table: str,
    where_sql: str | None,
    *,
    kind: str = "request",
    requested_by: str | None = None,
) -> int:
    """Queue a snapshot of ``table``; the running producer picks it up. Returns its id."""
    insert = sql.SQL(
        "INSERT INTO {} (slot_name, source_table, where_sql, kind, requested_by)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id"
    ).format(store.table(_REQUESTS))
    progress = sql.SQL("INSERT INTO {} (request_id) VALUES (%s)").format(store.table(_PROGRESS))
    try:
        with store.conn.transaction():
            row = store.conn.execute(
                insert, (slot, table, where_sql, kind, requested_by)
            ).fetchone()
            assert row is not None
            store.conn.execute(progress, (row[0],))
    except psycopg.Error as exc:
        raise store.error(exc, f"queueing a snapshot in {store.schema}.snapshot_requests") from None
    return int(row[0])


def ensure_initial_requests(store: ControlStore, slot: str, tables: Sequence[str]) -> list[int]:
    """Queue an initial snapshot for every table that never had one on ``slot``."""
    rows = store.execute(
        sql.SQL("SELECT source_table FROM {} WHERE slot_name = %s AND kind = 'initial'").format(
            store.table(_REQUESTS)
        ),
        (slot,),
        doing=f"reading {store.schema}.snapshot_requests",
    ).fetchall()
    done = {r[0] for r in rows}
    return [
        request_snapshot(store, slot, t, None, kind="initial", requested_by="producer")
        for t in tables
        if t not in done
    ]


def open_requests(store: ControlStore, slot: str) -> list[SnapshotRequest]:
    """Pending and running requests of ``slot``, oldest first."""
    rows = store.execute(
        sql.SQL(
            "SELECT r.id, r.source_table, r.where_sql, r.kind, r.status, p.last_pk,"
            " coalesce(p.rows_emitted, 0), coalesce(p.chunks, 0)"
            " FROM {} r LEFT JOIN {} p ON p.request_id = r.id"
            " WHERE r.slot_name = %s AND r.status IN ('pending', 'running') ORDER BY r.id"
        ).format(store.table(_REQUESTS), store.table(_PROGRESS)),
        (slot,),
        doing=f"reading {store.schema}.snapshot_requests",
    ).fetchall()
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


def unfinished_tables(store: ControlStore, slot: str, tables: Sequence[str]) -> int:
    """How many pending or running snapshot requests of ``slot`` cover one of ``tables``."""
    row = store.execute(
        sql.SQL(
            "SELECT count(*) FROM {} WHERE slot_name = %s AND source_table = ANY(%s)"
            " AND status IN ('pending', 'running')"
        ).format(store.table(_REQUESTS)),
        (slot, list(tables)),
        doing=f"reading {store.schema}.snapshot_requests",
    ).fetchone()
    return int(row[0]) if row else 0


def mark_request(
    store: ControlStore, request_id: int, status: str, error: str | None = None
) -> None:
    """Move a request to ``running``, ``done`` or ``failed``."""
    stamp = {"running": "started_at", "done": "finished_at", "failed": "finished_at"}[status]
    query = sql.SQL(
        "UPDATE {t} SET status = %s, error = %s, {stamp} = coalesce({stamp}, now()) WHERE id = %s"
    ).format(t=store.table(_REQUESTS), stamp=sql.Identifier(stamp))
    try:
        with store.conn.transaction():
            store.conn.execute(query, (status, error, request_id))
    except psycopg.Error as exc:
        raise store.error(exc, f"updating {store.schema}.snapshot_requests") from None


def record_progress(
    store: ControlStore, request_id: int, last_pk: Sequence[str], rows: int, *, done: bool
) -> None:
    """Record a finished chunk (after its rows were acked and the slot advanced past it)."""
    progress = sql.SQL(
        "UPDATE {} SET last_pk = %s::jsonb, rows_emitted = rows_emitted + %s,"
        " chunks = chunks + 1, updated_at = now() WHERE request_id = %s"
    ).format(store.table(_PROGRESS))
    # Not over a cancellation (cutover snapshot --cancel) made meanwhile.
    finished = sql.SQL(
        "UPDATE {} SET status = 'done', finished_at = now() WHERE id = %s AND status = 'running'"
    ).format(store.table(_REQUESTS))
    try:
        with store.conn.transaction():
            store.conn.execute(progress, (json.dumps(list(last_pk)), rows, request_id))
            if done:
                store.conn.execute(finished, (request_id,))
    except psycopg.Error as exc:
        raise store.error(exc, "recording snapshot progress") from None


def reset_snapshots(store: ControlStore, slot: str) -> None:
    """Forget every snapshot of ``slot`` so the producer reloads all tables (re-snapshot)."""
    superseded = sql.SQL(
        "UPDATE {} SET status = 'failed', error = 'superseded by a re-snapshot',"
        " finished_at = now() WHERE slot_name = %s AND status IN ('pending', 'running')"
    ).format(store.table(_REQUESTS))
    forget = sql.SQL(
        "UPDATE {} SET kind = 'request' WHERE slot_name = %s AND kind = 'initial'"
    ).format(store.table(_REQUESTS))
    try:
        with store.conn.transaction():
            store.conn.execute(superseded, (slot,))
            store.conn.execute(forget, (slot,))
    except psycopg.Error as exc:
        raise store.error(exc, "resetting snapshots") from None
