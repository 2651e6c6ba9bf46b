"""Verify's database access (:mod:`control.verify`): its connections, queries whose errors become
:class:`~cutover.errors.DatabaseError` naming the side, and :func:`copy_mapped_rows`, which seeds
commerce from legacy through the mapping for sandboxes, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from control import digest as dg
from cutover import pg
from cutover.mapping import MappingSpec, TableMapping

__all__ = [
    "Conn",
    "connect",
    "copy_mapped_rows",
    "current_lsn",
    "run_exec",
    "run_query",
    "table_exists",
    "target_column_types",
]

Conn = psycopg.Connection[Any]


# ---------------------------------------------------------------------------------------------


def connect(dsn: str, side: str) -> Conn:
    """An autocommit connection for verify: UTC, no JIT, no parallel workers.

    TimeZone UTC so any value compared as text renders identically on both sides; no JIT because
    compiling each chunk query costs more than running it; no parallel workers because the
    machine is shared and both databases already work at once.
    """
    conn = pg.connect(dsn, side=side, application_name="cutover-verify")
    try:
        conn.execute("SET TimeZone = 'UTC'; SET jit = off; SET max_parallel_workers_per_gather = 0")
    except psycopg.Error as exc:
        raise pg.translate(exc, "connecting", side) from None
    return conn


def run_query(
    conn: Conn, side: str, query: sql.Composed | sql.SQL, params: Sequence[object] | None = None
) -> list[tuple[Any, ...]]:
    try:
        rows: list[tuple[Any, ...]] = conn.execute(query, params).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "verify query", side) from None
    return rows


def run_exec(
    conn: Conn, side: str, query: sql.Composed | sql.SQL, params: Sequence[object]
) -> None:
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        raise pg.translate(exc, "verify bookkeeping", side) from None


def current_lsn(conn: Conn) -> int:
    """The legacy WAL insert position, as an integer (the form of ``_src_lsn``)."""
    row = run_query(conn, "source", sql.SQL("SELECT (pg_current_wal_lsn() - '0/0')::bigint"))
    return int(row[0][0])


def target_column_types(conn: Conn, schema: str, table: str) -> dict[str, str]:
    """Commerce column → type name (``format_type`` without typmod) of ``schema.table``."""
    rows = run_query(
        conn,
        "target",
        sql.SQL(
            "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
        ),
        [sql.Identifier(schema, table).as_string(conn)],
    )
    return {name: typ for name, typ in rows}


def table_exists(conn: Conn, side: str, schema: str, table: str) -> bool:
    rows = run_query(
        conn,
        side,
        sql.SQL("SELECT to_regclass(%s) IS NOT NULL"),
        [sql.Identifier(schema, table).as_string(conn)],
    )
    return bool(rows[0][0])


# ---------------------------------------------------------------------------------------------
# Seeding commerce from legacy through the mapping (tests, benchmarks, sandboxes)
# ---------------------------------------------------------------------------------------------


def copy_mapped_rows(
    source_dsn: str,
    target_dsn: str,
    mapping: MappingSpec,
    tables: Sequence[TableMapping] | None = None,
) -> dict[str, int]:
    """Load commerce with the legacy rows mapped by SQL (``source_sql``), bypassing Kafka.

    For sandboxes, tests and benchmarks: one ``COPY (SELECT mapped...) TO STDOUT`` on legacy
    streamed into ``COPY ... FROM STDIN`` on commerce, per table, rows the mapping deletes left
    out, ``_src_lsn`` = the legacy WAL position before the copy and ``_src_seq`` 0. Returns rows
    copied per target table.
    """
    copied: dict[str, int] = {}
    with connect(source_dsn, "source") as src, connect(target_dsn, "target") as dst:
        lsn = current_lsn(src)
        for table in tables or list(mapping.tables.values()):
            types = target_column_types(dst, mapping.target_schema, table.target_table)
            sides = dg.build_sides(
                table,
                source_schema=mapping.source_schema,
                target_schema=mapping.target_schema,
                target_types=types,
            )
            out_q = sql.SQL(
                "COPY (SELECT {vals}, {lsn}, 0 FROM {rel} AS r WHERE NOT {deleted}) TO STDOUT"
            ).format(
                vals=sql.SQL(", ").join(sides.legacy.values),
                lsn=sql.Literal(lsn),
                rel=sides.legacy.relation,
                deleted=sides.legacy.deleted,
            )
            in_q = sql.SQL("COPY {rel} ({cols}) FROM STDIN").format(
                rel=sides.commerce.relation,
                cols=sql.SQL(", ").join(
                    sql.Identifier(c) for c in (*sides.columns, "_src_lsn", "_src_seq")
                ),
            )
            try:
                with dst.transaction(), src.cursor() as scur, dst.cursor() as dcur:
                    with scur.copy(out_q) as out, dcur.copy(in_q) as inp:
                        for block in out:
                            inp.write(block)
                    copied[table.target_table] = dcur.rowcount
                dst.execute(sql.SQL("ANALYZE {}").format(sides.commerce.relation))
            except psycopg.Error as exc:
                raise pg.translate(exc, f"copying {table.source_table}", "target") from None
    return copied
