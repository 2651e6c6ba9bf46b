"""DBLog watermark snapshots: the database side of a chunk, and the request queue.

A snapshot (the initial load of a table, or ``cutover snapshot --table T [--where FILTER]``) is
read in chunks of ``snapshot_chunk_rows`` rows in primary-key order, interleaved with the stream:

1. emit the LOW watermark: ``pg_logical_emit_message(true, 'cutover.snapshot.low', chunk id)``
   (its own committed transaction, so it is in the WAL before the SELECT starts);
2. SELECT the chunk in a READ ONLY transaction: published columns only (excluded columns are
   never read), primary key after the last one read, ordered by primary key, ``LIMIT
   chunk_rows``, and the request's filter (:mod:`producers.predicate`, parsed again from the
   operator's text for every chunk: the stored text is never run as SQL);
3. emit the HIGH watermark (``'cutover.snapshot.high'``).

The stream side (:class:`producers.events.ChangeStream`) drops from the chunk every key changed
between the two watermarks and emits the rest at the high watermark as op ``r`` with
``source.lsn`` = the high watermark's commit LSN. A change committed between low and high is in
the stream, and it orders before the chunk rows of *other* keys only; its own key was dropped,
so the chunk never overwrites a newer streamed value. Progress (the last primary key) is
recorded by the producer only after the chunk's rows were acknowledged by Kafka and the slot was
advanced past the high watermark; a killed producer repeats at most the chunk in flight.

Values are read as text (``col::text``) and decoded with the same functions that decode pgoutput
tuples (:func:`producers.pgoutput.decode_value`), so a snapshot row and a streamed row of the same
data are identical, type for type.

The request queue: :func:`queue_request` (``cutover snapshot --table``), :func:`list_requests`
(``--list``) and :func:`cancel_request` (``--cancel``). A request whose filter or query fails in
the producer is marked ``failed`` with the reason (:func:`request_fault`) instead of staying
``running``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from cutover import fence, pg
from cutover.codec import ColumnSpec
from cutover.control_store import LEGACY_SCHEMA, ControlStore
from cutover.control_store.producer import SnapshotRequest, request_snapshot
from cutover.errors import (
    CheckFailed,
    CutoverError,
    DatabaseError,
    UncarriableValue,
    UsageError,
)
from cutover.mapping import MappingSpec
from producers import pgoutput, predicate, row_letters
from producers.events import SNAPSHOT_HIGH_PREFIX, SNAPSHOT_LOW_PREFIX

Conn = psycopg.Connection[Any]

_EMIT: Final = "SELECT pg_logical_emit_message(true, %s, %s)"


def published_column_specs(
    conn: Conn, publication: str, schema: str, table: str
) -> tuple[ColumnSpec, ...]:
    """The publication's column list of ``schema.table`` with types, in column order.

    This is the column list pgoutput puts in the table's Relation message, so a route built
    from it has the same writer schema as the stream's.
    """
    try:
        rows = conn.execute(
            "SELECT a.attname, a.atttypid::int, a.atttypmod FROM pg_publication_tables pt"
            " JOIN pg_namespace n ON n.nspname = pt.schemaname"
            " JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = ANY(pt.attnames)"
            " WHERE pt.pubname = %s AND pt.schemaname = %s AND pt.tablename = %s"
            " AND NOT a.attisdropped ORDER BY a.attnum",
            (publication, schema, table),
        ).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(
            exc, f"reading the published columns of {schema}.{table}", "source"
        ) from None
    if not rows:
        raise UsageError(f"{schema}.{table} is not in publication {publication}: run cutover init")
    return tuple(ColumnSpec(str(n), int(o), int(m)) for n, o, m in rows)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk read between its watermarks (rows decoded, keyed by primary key)."""

    chunk_id: str
    rows: dict[tuple[object, ...], dict[str, object]]
    last_pk: tuple[str, ...]
    selected: int
    final: bool


def chunk_query(
    schema: str,
    table: str,
    columns: Sequence[str],
    primary_key: Sequence[str],
    *,
    after: bool,
    where: sql.Composable | None = None,
    keys: int = 0,
) -> sql.Composed:
    """SELECT of one chunk: every published column as text, then the primary key as text.

    ``after``: only rows with a primary key greater than the parameters; ``keys``: only the
    rows with one of that many primary keys (a key chunk: the parameters are the key values);
    ``where``: a rendered filter (:func:`producers.predicate.render`, alias ``t``) whose
    parameters follow the key parameters.
    """
    # Every column is qualified with the alias t: a bare ORDER BY "id" would bind to the OUTPUT
    # column "id"::text and sort the chunk as text (10 < 9), skipping rows between chunks.
    pk = sql.SQL(", ").join(sql.Identifier("t", c) for c in primary_key)
    select = sql.SQL(", ").join(
        sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in (*columns, *primary_key)
    )
    conditions: list[sql.Composable] = []
    one_key = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(primary_key)))
    if after:
        conditions.append(sql.SQL("({}) > {}").format(pk, one_key))
    if keys:
        conditions.append(sql.SQL("({}) IN ({})").format(pk, sql.SQL(", ").join([one_key] * keys)))
    if where is not None:
        # Parenthesised and AND-ed: whatever the filter, the primary-key bound still holds.
        conditions.append(sql.SQL("({})").format(where))
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
    return sql.SQL("SELECT {select} FROM {table} AS t{where} ORDER BY {pk} LIMIT %s").format(
        select=select, table=sql.Identifier(schema, table), where=where, pk=pk
    )


def decode_row(columns: Sequence[ColumnSpec], values: Sequence[str | None]) -> dict[str, object]:
    """Decode text values exactly as pgoutput tuples are decoded."""
    return {
        col.name: None if text is None else pgoutput.decode_value(col.type_oid, text.encode())
        for col, text in zip(columns, values, strict=False)
    }


def _decode_or_refuse(
    qualified: str, columns: Sequence[ColumnSpec], values: Sequence[str | None]
) -> dict[str, object]:
    """The decoded row, or a :class:`~producers.row_letters.RefusedRow` (a dead letter)."""
    try:
        return decode_row(columns, values)
    except UncarriableValue as exc:
        partial: dict[str, object] = {}
        column: str | None = None
        for col, text in zip(columns, values, strict=False):
            try:
                partial[col.name] = decode_row([col], [text])[col.name]
            except UncarriableValue:
                partial[col.name] = None
                column = column or col.name
        refused = UncarriableValue(
            f"{qualified} column {column}: {exc.message}",
            table=qualified,
            column=column,
            reason=exc.reason,
        )
        return row_letters.RefusedRow(partial, refused)


def read_chunk(
    conn: Conn,
    *,
    schema: str,
    table: str,
    columns: Sequence[ColumnSpec],
    primary_key: Sequence[str],
    request: SnapshotRequest,
    last_pk: tuple[str, ...] | None,
    chunk_rows: int,
    keys: Sequence[tuple[object, ...]] = (),
) -> Chunk:
    """Steps 1-3 of a chunk: low watermark, SELECT, high watermark (each its own transaction).

    With ``keys``, a key chunk: only those primary keys (decoded values) are read again.
    """
    chunk_id = f"{request.id}:{request.chunks + 1}:{uuid.uuid4().hex[:12]}"
    names = [c.name for c in columns]
    # Parsed before the low watermark: a refused filter (UsageError) emits nothing.
    flt = compile_where(request.where_sql, names, schema, table)
    query = chunk_query(
        schema,
        table,
        names,
        primary_key,
        after=last_pk is not None and not keys,
        where=flt.sql if flt else None,
        keys=len(keys),
    )
    bound: list[Any] = [v for key in keys for v in key] if keys else list(last_pk or ())
    params = [*bound, *(flt.params if flt else ()), len(keys) if keys else chunk_rows]
    by_name = {c.name: c for c in columns}
    pk_specs = [by_name[c] for c in primary_key]
    try:
        # (1) low watermark, committed before the SELECT starts.
        conn.execute(_EMIT, (SNAPSHOT_LOW_PREFIX, chunk_id))
        # (2) the chunk, published columns only, after the last primary key read; read-only
        # by construction (whatever the filter, the transaction cannot write).
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            raw = conn.execute(query, params).fetchall()
        # (3) high watermark, committed after the SELECT finished.
        conn.execute(_EMIT, (SNAPSHOT_HIGH_PREFIX, chunk_id))
    except psycopg.Error as exc:
        raise pg.translate(exc, f"reading a snapshot chunk of {schema}.{table}", "source") from None
    rows: dict[tuple[object, ...], dict[str, object]] = {}
    n = len(names)
    for values in raw:
        row = _decode_or_refuse(f"{schema}.{table}", columns, values[:n])
        pk_values = decode_row(pk_specs, values[n:])
        rows[tuple(pk_values[c] for c in primary_key)] = row
    if keys:
        return Chunk(chunk_id, rows, last_pk or (), len(raw), final=False)
    last = tuple(str(v) for v in raw[-1][n:]) if raw else (last_pk or ())
    return Chunk(chunk_id, rows, last, len(raw), final=len(raw) < chunk_rows)


def estimate_rows(conn: Conn, schema: str, table: str) -> int | None:
    """The planner's row estimate (for progress bars); None when unknown."""
    try:
        row = conn.execute(
            "SELECT c.reltuples::bigint FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (schema, table),
        ).fetchone()
    except psycopg.Error:
        return None
    return int(row[0]) if row and row[0] >= 0 else None


def compile_where(
    where: str | None, columns: Sequence[str], schema: str, table: str
) -> predicate.Filter | None:
    """The parsed ``--where`` filter of a request on ``schema.table`` (None: no filter)."""
    if not where:
        return None
    return predicate.compile_filter(where, columns, table=f"{schema}.{table}")


def validate_where(conn: Conn, schema: str, table: str, flt: predicate.Filter) -> None:
    """Refuse a parsed filter PostgreSQL cannot plan (types): EXPLAIN, read-only, rolled back."""
    query = sql.SQL("EXPLAIN SELECT 1 FROM {} AS t WHERE ({})").format(
        sql.Identifier(schema, table), flt.sql
    )
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(query, flt.params)
    except psycopg.Error as exc:
        raise UsageError(
            f"--where {flt.text!r} is not a valid filter on {schema}.{table}: {exc}"
        ) from None


def request_fault(exc: CutoverError) -> str | None:
    """Why a request failed through its own fault (its filter, its query), or None.

    A refused filter, or a data/syntax/access/read-only error (SQLSTATE classes 22, 42, 25) of
    its chunk query, fails the request for good; anything else (a lost connection) is the producer's
    problem and is retried after a restart.
    """
    if isinstance(exc, UsageError):
        return exc.message
    if isinstance(exc, DatabaseError) and (exc.sqlstate or "")[:2] in ("22", "25", "42"):
        return exc.message
    return None


def fenced_reason(domain: str) -> str:
    """Why a snapshot of a domain whose writes moved to commerce is refused (at queueing, and by
    the producer for a request queued before the move or a chunk that closes after it)."""
    return (
        f"the writes of domain {domain} are on commerce (legacy is fenced): legacy's rows are "
        "older than commerce's and would overwrite them; a snapshot is only possible after "
        f"`cutover rollback-writes {domain}`"
    )


def queue_request(
    dsn: str,
    *,
    mapping: MappingSpec,
    slot: str,
    publication: str,
    table: str,
    where: str | None,
    requested_by: str | None,
) -> int:
    """``cutover snapshot --table``: validate and queue a request; the running producer runs it.

    The operator's filter text is stored as written, for display; the producer parses it again.
    """
    if table not in mapping.tables:
        known = ", ".join(mapping.tables)
        raise UsageError(f"table {table!r} is not in the mapping; mapped tables: {known}")
    schema = mapping.source_schema
    try:
        with pg.connect(dsn, side="source", application_name="cutover snapshot") as conn:
            if where:
                columns = published_column_specs(conn, publication, schema, table)
                flt = compile_where(where, [c.name for c in columns], schema, table)
                assert flt is not None
                validate_where(conn, schema, table, flt)
            domain = mapping.tables[table].domain
            if fence.installed_without_log(conn, LEGACY_SCHEMA, side="source"):
                # Fail closed: whether the domain's writes moved cannot be read.
                raise CheckFailed(
                    f"snapshot of {schema}.{table} refused: the write fence was installed by an "
                    "older release without its log, so whether its writes moved cannot be read; "
                    "run `cutover init` to upgrade it"
                )
            state = fence.fence_states(conn, LEGACY_SCHEMA, side="source").get(domain)
            if state is not None and state.fenced:
                raise CheckFailed(f"snapshot of {schema}.{table} refused: {fenced_reason(domain)}")
            store = ControlStore(conn, LEGACY_SCHEMA, "source")
            return request_snapshot(store, slot, table, where, requested_by=requested_by)
    except psycopg.Error as exc:
        raise pg.translate(exc, "queueing the snapshot request", "source") from None


_LIST: Final = (
    "SELECT r.id, r.source_table, r.where_sql, r.kind, r.status, coalesce(p.rows_emitted, 0),"
    " coalesce(p.chunks, 0), r.requested_by, r.requested_at, r.started_at, r.finished_at, r.error"
    " FROM cutover.snapshot_requests r"
    " LEFT JOIN cutover.snapshot_progress p ON p.request_id = r.id"
    " WHERE r.slot_name = %s ORDER BY r.id"
)
LIST_FIELDS: Final = (
    "id", "table", "where", "kind", "status", "rows", "chunks", "requested_by", "requested_at",
    "started_at", "finished_at", "error",
)  # fmt: skip


def list_requests(dsn: str, slot: str) -> list[dict[str, Any]]:
    """``cutover snapshot --list``: every request of ``slot``, oldest first."""
    try:
        with pg.connect(dsn, side="source", application_name="cutover snapshot") as conn:
            rows = conn.execute(_LIST, (slot,)).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "listing the snapshot requests", "source") from None
    return [dict(zip(LIST_FIELDS, row, strict=True)) for row in rows]


def cancel_request(dsn: str, slot: str, request_id: int, *, by: str | None) -> str:
    """``cutover snapshot --cancel ID``: fail an open request; returns its table.

    The producer checks the status before every chunk, so a running request stops after the
    chunk in flight. Initial snapshots are not cancelled (the table would never be loaded).
    """
    reason = f"cancelled by {by or 'an operator'}"
    try:
        with pg.connect(dsn, side="source", application_name="cutover snapshot") as conn:
            row = conn.execute(
                "UPDATE cutover.snapshot_requests SET status = 'failed', error = %s,"
                " finished_at = now() WHERE id = %s AND slot_name = %s AND kind = 'request'"
                " AND status IN ('pending', 'running') RETURNING source_table",
                (reason, request_id, slot),
            ).fetchone()
            if row is not None:
                return str(row[0])
            found = conn.execute(
                "SELECT kind, status FROM cutover.snapshot_requests"
                " WHERE id = %s AND slot_name = %s",
                (request_id, slot),
            ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, "cancelling the snapshot request", "source") from None
    if found is None:
        raise UsageError(f"there is no snapshot request {request_id} on slot {slot}")
    kind, status = found
    if status in ("done", "failed"):
        raise CheckFailed(f"snapshot request {request_id} is already {status}")
    raise CheckFailed(
        f"snapshot request {request_id} is an initial snapshot ({kind}): cancelling it would "
        "leave the table unloaded; use `cutover init --resnapshot` to start over"
    )


def request_is_open(conn: Conn, request_id: int) -> bool:
    """Whether ``request_id`` is still pending or running (not cancelled meanwhile)."""
    try:
        row = conn.execute(
            "SELECT status IN ('pending', 'running') FROM cutover.snapshot_requests WHERE id = %s",
            (request_id,),
        ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading cutover.snapshot_requests", "source") from None
    return bool(row and row[0])
