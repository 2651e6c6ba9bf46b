"""DBLog watermark snapshots: the database side of a chunk, and the request queue.

A snapshot (the initial load of a table, or ``cutover snapshot --table T [--where SQL]``) is read
in chunks of ``snapshot_chunk_rows`` rows in primary-key order, interleaved with the stream:

1. emit the LOW watermark: ``pg_logical_emit_message(true, 'cutover.snapshot.low', chunk id)``
   (its own committed transaction, so it is in the WAL before the SELECT starts);
2. SELECT the chunk: published columns only (excluded columns are never read), primary key
   after the last one read, ordered by primary key, ``LIMIT chunk_rows``;
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
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from cutover.codec import ColumnSpec
from cutover.errors import DatabaseError, UsageError
from cutover.mapping import MappingSpec
from producers import pgoutput
from producers.events import SNAPSHOT_HIGH_PREFIX, SNAPSHOT_LOW_PREFIX
from producers.source_state import SnapshotRequest, request_snapshot

Conn = psycopg.Connection[Any]

_EMIT: Final = "SELECT pg_logical_emit_message(true, %s, %s)"


def _db(exc: psycopg.Error, doing: str) -> DatabaseError:
    return DatabaseError(f"{doing}: {exc}".strip(), side="source", sqlstate=exc.sqlstate)


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
        raise _db(exc, f"reading the published columns of {schema}.{table}") from None
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
    where_sql: str | None,
    keys: int = 0,
) -> sql.Composed:
    """SELECT of one chunk: every published column as text, then the primary key as text.

    ``after``: only rows with a primary key greater than the parameters; ``keys``: only the
    rows with one of that many primary keys (a key chunk: the parameters are the key values).
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
    if where_sql:
        # The operator's filter (cutover snapshot --where): trusted input by definition, checked
        # with EXPLAIN when it was requested; parenthesised so it cannot widen the pk bound.
        conditions.append(sql.SQL("({})").format(sql.SQL(where_sql)))
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
    query = chunk_query(
        schema,
        table,
        names,
        primary_key,
        after=last_pk is not None and not keys,
        where_sql=request.where_sql,
        keys=len(keys),
    )
    params: list[Any] = (
        [v for key in keys for v in key] + [len(keys)] if keys else [*(last_pk or ()), chunk_rows]
    )
    by_name = {c.name: c for c in columns}
    pk_specs = [by_name[c] for c in primary_key]
    try:
        # (1) low watermark, committed before the SELECT starts.
        conn.execute(_EMIT, (SNAPSHOT_LOW_PREFIX, chunk_id))
        # (2) the chunk, published columns only, after the last primary key read.
        raw = conn.execute(query, params).fetchall()
        # (3) high watermark, committed after the SELECT finished.
        conn.execute(_EMIT, (SNAPSHOT_HIGH_PREFIX, chunk_id))
    except psycopg.Error as exc:
        raise _db(exc, f"reading a snapshot chunk of {schema}.{table}") from None
    rows: dict[tuple[object, ...], dict[str, object]] = {}
    n = len(names)
    for values in raw:
        row = decode_row(columns, values[:n])
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


def validate_where(conn: Conn, schema: str, table: str, where_sql: str) -> None:
    """Refuse a --where filter that does not parse or names unknown columns (via EXPLAIN)."""
    query = sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE ({})").format(
        sql.Identifier(schema, table), sql.SQL(where_sql)
    )
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL transaction_read_only = on")
            conn.execute(query)
    except psycopg.Error as exc:
        raise UsageError(
            f"--where {where_sql!r} is not a valid filter on {schema}.{table}: {exc}"
        ) from None


def queue_request(
    dsn: str,
    *,
    mapping: MappingSpec,
    slot: str,
    table: str,
    where_sql: str | None,
    requested_by: str | None,
) -> int:
    """``cutover snapshot``: validate and queue a request; the running producer executes it."""
    if table not in mapping.tables:
        known = ", ".join(mapping.tables)
        raise UsageError(f"table {table!r} is not in the mapping; mapped tables: {known}")
    try:
        with psycopg.connect(dsn, autocommit=True, application_name="cutover snapshot") as conn:
            if where_sql:
                validate_where(conn, mapping.source_schema, table, where_sql)
            return request_snapshot(conn, slot, table, where_sql, requested_by=requested_by)
    except psycopg.Error as exc:
        raise _db(exc, "queueing the snapshot request") from None
