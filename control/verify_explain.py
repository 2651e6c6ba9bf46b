"""What ``cutover verify`` explains instead of failing with a raw SQL error (:mod:`control.verify`).

* **Schema drift** (:func:`schema_drift`): before a table is digested, the columns the mapping
  reads (legacy) and writes (commerce) are looked up in ``information_schema`` of both sides, and
  their types checked against the transforms (:func:`cutover.mapping.typecheck.check_types`). A
  renamed, dropped or retyped column is reported as drift naming side, table, column and fix; the
  table is not digested (its digest query would only fail).
* **Source values that cannot map** (:func:`find_unmappable`): the SQL form of a transform fails
  on a value the mapping cannot carry (numeric × 100 beyond bigint, ``NaN``; an infinite
  timestamp is made to fail too, see :func:`control.digest.build_sides`). When a chunk's legacy
  digest fails with a data exception (SQLSTATE class 22), the chunk's keys are bisected to the
  failing rows, each row's columns are evaluated one by one to name the column, and the chunk is
  compared again without those keys (:func:`without_keys`). Values are never printed: they may be
  sensitive.
* **Invariants on legacy** (:func:`legacy_invariant_query`): a commerce invariant is also run over
  legacy's rows mapped through the mapping, so a violation legacy already holds is attributed to
  legacy, not reported as a replication difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from control import digest as dg
from control.verify_io import Conn, run_query
from cutover import pg
from cutover.errors import DatabaseError, MappingError
from cutover.mapping import Invariant, MappingSpec, TableMapping
from cutover.mapping.typecheck import check_types, read_column_types

__all__ = [
    "Drift",
    "Unmappable",
    "find_unmappable",
    "is_data_error",
    "legacy_invariant_query",
    "schema_drift",
    "without_keys",
]

#: Bookkeeping columns every commerce table has (the apply consumer writes them).
_BOOKKEEPING = ("_src_lsn", "_src_seq")


@dataclass(frozen=True, slots=True)
class Drift:
    """One column that no longer is what the mapping says."""

    side: str  # "source" (legacy) or "target" (commerce)
    table: str  # schema-qualified
    column: str | None  # None: the whole table is missing, or the problem spans columns
    problem: str

    def to_json(self) -> dict[str, object]:
        return {
            "side": self.side,
            "table": self.table,
            "column": self.column,
            "problem": self.problem,
        }

    def __str__(self) -> str:
        db = "legacy" if self.side == "source" else "commerce"
        where = f"{self.table}.{self.column}" if self.column else self.table
        return f"{db} {where}: {self.problem}"


_FIX = "update the mapping file to the new schema, then run `cutover init`"


def _catalog(conn: Conn, side: str, schema: str, table: str) -> dict[str, str]:
    try:
        return read_column_types(conn, schema, [table]).get(table, {})
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the catalog for the drift check", side) from None


def schema_drift(
    legacy: Conn, commerce: Conn, mapping: MappingSpec, table: TableMapping
) -> list[Drift]:
    """The drift of ``table`` on both sides (empty: the mapping still fits both schemas)."""
    src_name = f"{mapping.source_schema}.{table.source_table}"
    dst_name = f"{mapping.target_schema}.{table.target_table}"
    src = _catalog(legacy, "source", mapping.source_schema, table.source_table)
    dst = _catalog(commerce, "target", mapping.target_schema, table.target_table)
    found: list[Drift] = []
    if not src:
        found.append(Drift("source", src_name, None, f"table does not exist; {_FIX}"))
    if not dst:
        found.append(Drift("target", dst_name, None, f"table does not exist; {_FIX}"))
    if found:
        return found
    for col in sorted(table.source_columns_used() - set(src)):
        found.append(
            Drift(
                "source",
                src_name,
                col,
                f"column the mapping reads does not exist (renamed or dropped); {_FIX}",
            )
        )
    written = (*table.target_columns, *_BOOKKEEPING)
    for col in [c for c in written if c not in dst]:
        found.append(
            Drift(
                "target",
                dst_name,
                col,
                f"column the mapping writes does not exist (renamed or dropped); {_FIX}",
            )
        )
    if found:
        return found
    try:
        check_types(
            replace(mapping, tables={table.source_table: table}, invariants=()),
            {table.source_table: src},
            {table.target_table: dst},
        )
    except MappingError as exc:
        # The type check names the column and the fix; the type changed since init checked it.
        found.append(Drift("source/target", f"{src_name} -> {dst_name}", None, f"{exc}; {_FIX}"))
    return found


# ---------------------------------------------------------------------------------------------
# Source values the mapping cannot carry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unmappable:
    """A legacy row whose value(s) the mapping's SQL form cannot map (the columns named)."""

    key: dg.Key
    columns: tuple[str, ...]


def is_data_error(exc: DatabaseError, side: str = "source") -> bool:
    """A value-level failure on ``side``: a data exception (SQLSTATE class 22: out of range,
    bad datetime) or 0A000, which PostgreSQL raises for ``cannot convert NaN to bigint``."""
    state = exc.sqlstate or ""
    return exc.side == side and (state.startswith("22") or state == "0A000")


def _fails(conn: Conn, query: sql.Composable) -> bool:
    try:
        run_query(conn, "source", query)  # type: ignore[arg-type]
    except DatabaseError as exc:
        if is_data_error(exc):
            return True
        raise
    return False


def _key_equals(side: dg.Side, key: dg.Key) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(k, sql.Literal(v)) for k, v in zip(side.keys, key, strict=True)
    )


def find_unmappable(legacy: Conn, sides: dg.TableSides, rng: dg.KeyRange) -> list[Unmappable]:
    """The legacy rows of ``rng`` whose mapped values fail to compute, and their columns.

    The chunk's keys are read (keys only: no mapped value is computed), then the key list is
    bisected with the chunk's own digest query over sub-ranges: one failing row costs about
    log2(rows) small queries. Each failing row's columns are then evaluated one at a time.
    """
    side = sides.legacy
    keys_q = sql.SQL("SELECT {keys} FROM {rel} AS r WHERE {where} ORDER BY {keys}").format(
        keys=sql.SQL(", ").join(side.keys), rel=side.relation, where=dg.range_sql(side.keys, rng)
    )
    keys: list[dg.Key] = [tuple(r) for r in run_query(legacy, "source", keys_q)]
    bad: list[dg.Key] = []
    # Iterative bisection over [i, j) of the sorted key list; a range's rows are exactly the
    # keys from keys[i] up to (not including) keys[j], or the chunk's end.
    todo = [(0, len(keys))]
    while todo:
        i, j = todo.pop()
        if i >= j:
            continue
        sub = dg.KeyRange(keys[i], keys[j] if j < len(keys) else rng.hi)
        if not _fails(legacy, dg.digest_sql(side, sub)):
            continue
        if j - i == 1:
            bad.append(keys[i])
            continue
        mid = (i + j) // 2
        todo.extend([(mid, j), (i, mid)])
    out: list[Unmappable] = []
    for key in sorted(bad):
        cols = tuple(
            c
            for c, v in zip(sides.columns, side.values, strict=True)
            if _fails(
                legacy,
                sql.SQL("SELECT ({}) IS NULL FROM {} AS r WHERE {}").format(
                    v, side.relation, _key_equals(side, key)
                ),
            )
        )
        out.append(Unmappable(key, cols))
    return out


def _excluding(side: dg.Side, keys: Sequence[dg.Key]) -> dg.Side:
    rows = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in k)) for k in keys
    )
    relation = sql.SQL("(SELECT * FROM {} AS r WHERE ({}) NOT IN ({}))").format(
        side.relation, sql.SQL(", ").join(side.keys), rows
    )
    return replace(side, relation=relation)


def without_keys(sides: dg.TableSides, keys: Sequence[dg.Key]) -> dg.TableSides:
    """Both sides of the table with the rows of ``keys`` left out (no keys: unchanged)."""
    if not keys:
        return sides
    return replace(
        sides, legacy=_excluding(sides.legacy, keys), commerce=_excluding(sides.commerce, keys)
    )


# ---------------------------------------------------------------------------------------------
# Invariants over legacy, through the mapping
# ---------------------------------------------------------------------------------------------


def legacy_invariant_query(inv: Invariant, sides: Mapping[str, dg.TableSides]) -> sql.Composed:
    """The commerce invariant ``inv`` run over legacy: each of its (target) tables is replaced by
    a CTE of the legacy rows mapped through the mapping (rows the mapping deletes left out), the
    values cast to the commerce column types, so the query sees what commerce should hold."""
    ctes = []
    names: dict[str, sql.Composable] = {}
    for t in inv.tables:
        s = sides[t]
        name = sql.Identifier(f"_legacy_{t}")
        names[t] = name
        ctes.append(
            sql.SQL("{} AS (SELECT {} FROM {} AS r WHERE NOT {})").format(
                name,
                sql.SQL(", ").join(
                    sql.SQL("{} AS {}").format(v, sql.Identifier(c))
                    for c, v in zip(s.columns, s.legacy.values, strict=True)
                ),
                s.legacy.relation,
                s.legacy.deleted,
            )
        )
    return sql.SQL("WITH {} {}").format(sql.SQL(", ").join(ctes), inv.build_over(names))
