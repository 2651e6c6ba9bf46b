"""Type-check every transform against the source and target column types (``cutover init``).

A mapping can be valid TOML and still unable to work: ``minor_units`` on a text column passes
the loader, and then every row of the table becomes a dead letter at run time. Each transform
declares the source types it reads and the type it yields
(:class:`~cutover.mapping.transforms.Transform`); this module reads the columns' types from
``information_schema`` of both databases and refuses a mismatch with a
:class:`~cutover.errors.MappingError` (exit 2) naming the file, the line, the table, the column
and the fix. Tables or columns that do not exist are left to init's preflight, which reports them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import psycopg

from cutover.mapping.model import ColumnMapping, MappingSpec, TableMapping
from cutover.mapping.transforms import assignable, type_family
from cutover.pg import connect as pg_connect
from cutover.pg import translate as pg_translate

#: table → column → PostgreSQL type name (``numeric``, ``character varying``, an enum's name...).
ColumnTypes: TypeAlias = Mapping[str, Mapping[str, str]]

# Why a produced family does not fit a target family, and the usual fix.
_HINTS: dict[tuple[str, str], str] = {
    ("numeric", "integer"): "for money in minor units write { from = COLUMN, minor_units = N }",
    ("text", "boolean"): 'for a flag write { from = COLUMN, equals = "VALUE" }',
    ("boolean", "text"): "map a text column, or change the target column to boolean",
    ("integer", "text"): 'for text built from numbers write { template = "{COLUMN}" }',
}


def check_types(spec: MappingSpec, source: ColumnTypes, target: ColumnTypes) -> None:
    """Raise MappingError at the first transform (in file order) the column types refuse."""
    for name, table in spec.tables.items():
        columns = source.get(name)
        if columns is None:
            continue
        for column in table.columns:
            _check_column(spec, table, column, columns, target.get(table.target_table, {}))
        pred = table.delete_when
        if pred is not None and pred.column in columns:
            pg = columns[pred.column]
            if type_family(pg) not in pred.accepted():
                raise spec.error(
                    ("tables", name, "delete_when"),
                    f"compares {spec.source_schema}.{name}.{pred.column} ({pg}) with "
                    f"{', '.join(repr(v) for v in pred.values)}: these never match; compare "
                    "with values of the column's type (text in quotes, numbers bare)",
                )


def _check_column(
    spec: MappingSpec,
    table: TableMapping,
    column: ColumnMapping,
    source: Mapping[str, str],
    target: Mapping[str, str],
) -> None:
    at = ("tables", table.source_table, "columns", column.target)
    transform = column.transform
    read: list[tuple[str, str]] = []
    for src in transform.sources():
        if src not in source:
            continue
        pg = source[src]
        if type_family(pg) not in transform.accepted():
            raise spec.error(
                at,
                f"{transform.label} reads {transform.accepts_text}, but source column "
                f"{spec.source_schema}.{table.source_table}.{src} is {pg}; {transform.fix}",
            )
        read.append((src, pg))
    if column.target not in target or (transform.sources() and not read):
        return
    produced = transform.yields(type_family(read[0][1]) if read else "text")
    pg_target = target[column.target]
    wanted = type_family(pg_target)
    if assignable(produced, wanted):
        return
    origin = f"{read[0][0]} ({read[0][1]})" if read else "its template"
    hint = _HINTS.get((produced, wanted), "map it with a transform that yields that type")
    raise spec.error(
        at,
        f"{transform.label} of {origin} yields {produced}, but target column "
        f"{spec.target_schema}.{table.target_table}.{column.target} is {pg_target}; {hint}, "
        "or change the target column's type",
    )


def read_column_types(
    conn: psycopg.Connection[Any], schema: str, tables: Iterable[str]
) -> dict[str, dict[str, str]]:
    """The column types of ``schema``'s ``tables`` that exist, from information_schema."""
    rows = conn.execute(
        "SELECT table_name, column_name,"
        " CASE WHEN data_type = 'USER-DEFINED' THEN udt_name ELSE data_type END"
        " FROM information_schema.columns WHERE table_schema = %s AND table_name = ANY(%s)",
        (schema, list(tables)),
    ).fetchall()
    out: dict[str, dict[str, str]] = {}
    for table, column, pg in rows:
        out.setdefault(str(table), {})[str(column)] = str(pg)
    return out


def _read(dsn: str, side: str, schema: str, tables: list[str]) -> dict[str, dict[str, str]]:
    doing = "reading column types for the mapping check"
    try:
        with pg_connect(dsn, side=side, application_name="cutover init", doing=doing) as conn:
            return read_column_types(conn, schema, tables)
    except psycopg.Error as exc:
        raise pg_translate(exc, doing, side) from None


def check_column_types(spec: MappingSpec, source_dsn: str, target_dsn: str | None) -> None:
    """Read both catalogs and :func:`check_types`; ``target_dsn`` None checks the source only."""
    source = _read(source_dsn, "source", spec.source_schema, list(spec.tables))
    target: dict[str, dict[str, str]] = {}
    if target_dsn is not None:
        targets = [t.target_table for t in spec.tables.values()]
        target = _read(target_dsn, "target", spec.target_schema, targets)
    check_types(spec, source, target)
