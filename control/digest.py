"""Pure building blocks of ``cutover verify``: digest SQL, chunk plans, bisection, row diffs.

Verify compares the legacy rows *mapped through the mapping* with the commerce rows without
moving the rows out of the databases on the happy path:

* each side is described by a :class:`Side`: the relation, the key expressions and the compared
  value expressions. The legacy side's values are :func:`cutover.mapping.source_sql` expressions
  (the mapping rendered as SQL), the commerce side's are the target columns; both are cast to the
  *commerce column's type*, so both databases hold the same typed value for a matching row;
* a chunk digest is ``count(*)`` plus ``sum(hash_record_extended(ROW(values...), 0))`` computed
  inside each database. The hash works on the typed values (hash_numeric, hash of the timestamptz
  integer, ...), so neither numeric scale (``4.50`` vs ``4.5``) nor the session time zone nor
  any text rendering can make equal rows differ, and no output function runs per row (which is
  what makes verify fast);
* a chunk whose digests differ is split into buckets over the leading integer key column
  (:func:`bucket_width`), recursively, until a bucket is small enough to fetch its rows from
  both sides and diff them in Python (:func:`diff_rows`);
* the keys found that way are only *candidates*: the databases are read at slightly different
  moments while the pipeline runs. :mod:`control.rowdiff` diffs fetched rows and decides, round
  by round, which candidates are confirmed (re-exported here: verify uses this module as ``dg``).

Nothing here does I/O: :mod:`control.verify` runs the SQL. Every statement is composed with
:mod:`psycopg.sql`; values go in as :class:`psycopg.sql.Literal` or parameters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from psycopg import sql

from control.rowdiff import (
    DiffKind,
    FetchedRow,
    Key,
    KeyDiff,
    RecheckTracker,
    RowsDiff,
    Verdict,
    applied_position,
    classify,
    compare_values,
    diff_rows,
    judge,
    split_row,
)
from cutover.mapping import TableMapping, predicate_sql, source_sql

__all__ = [
    "INTEGER_TYPES",
    "DiffKind",
    "Digest",
    "FetchedRow",
    "Key",
    "KeyDiff",
    "KeyRange",
    "RecheckTracker",
    "RowsDiff",
    "Side",
    "TableSides",
    "Verdict",
    "applied_position",
    "boundaries_sql",
    "bounds_sql",
    "bucket_digest_sql",
    "bucket_width",
    "build_sides",
    "cast_type",
    "classify",
    "compare_values",
    "diff_rows",
    "differing_buckets",
    "digest_sql",
    "judge",
    "plan_integer_chunks",
    "range_sql",
    "ranges_from_boundaries",
    "rows_by_keys_sql",
    "rows_sql",
    "split_bucket",
    "split_row",
]


#: Commerce column types (``format_type`` without typmod) whose leading key chunks by value.
INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})

# The types both sides are cast to before hashing, from the commerce catalog's type name. Every
# type here has a hash opclass and a cast from its usual source types; anything else is compared
# as text (both sides through the same ::text cast, in sessions with TimeZone UTC).
_CASTS: Mapping[str, str] = {
    "bigint": "bigint",
    "integer": "integer",
    "smallint": "smallint",
    "text": "text",
    "character varying": "text",
    "character": "text",
    "boolean": "boolean",
    "numeric": "numeric",
    "double precision": "double precision",
    "real": "real",
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "time without time zone": "time",
    "interval": "interval",
    "uuid": "uuid",
    "jsonb": "jsonb",
    "bytea": "bytea",
}
_TEXT = sql.SQL("text")


def cast_type(type_name: str) -> sql.SQL:
    """The SQL type both sides cast a column of commerce type ``type_name`` to (text if unknown).

    Only names from the fixed table above are ever rendered: catalog text never reaches SQL.
    """
    name = _CASTS.get(type_name)
    return sql.SQL(name) if name is not None else _TEXT


# ---------------------------------------------------------------------------------------------
# The two sides of a table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """One database's view of a mapped table, as SQL expressions over ``relation AS r``."""

    relation: sql.Composable
    keys: tuple[sql.Composable, ...]
    values: tuple[sql.Composable, ...]
    #: Boolean: the row is one the mapping deletes (legacy ``delete_when``); FALSE on commerce.
    deleted: sql.Composable
    #: The row's source position (commerce ``_src_lsn``); None on legacy.
    position: sql.Composable | None = None


_DATETIME = frozenset({"timestamptz", "timestamp", "date"})


def _finite(value: sql.Composable, cast: str | None) -> sql.Composable:
    """A legacy date/time value, failing (SQLSTATE 22007) where it is infinite.

    The pipeline cannot carry ``infinity`` (no Python datetime holds it), so the row is a dead
    letter, not a row commerce should hold: verify reports it as a source value that cannot map
    (:mod:`control.verify_explain`) instead of a missing row. The failing cast is of a
    per-row text, so the planner cannot fold it into an error for every row.
    """
    if cast not in _DATETIME:
        return value
    return sql.SQL(
        "CASE WHEN isfinite({v}) IS NOT FALSE THEN {v} ELSE ({v}::text || {m})::{t} END"
    ).format(v=value, m=sql.Literal(" is not finite"), t=sql.SQL(cast))


@dataclass(frozen=True, slots=True)
class TableSides:
    """Both sides of one table plus what the I/O layer needs to know about its key."""

    table: TableMapping
    legacy: Side
    commerce: Side
    columns: tuple[str, ...]  # compared target columns, in the order of Side.values
    key_types: tuple[sql.SQL, ...]  # SQL types of the target key columns (for key arrays)
    integer_leading_key: bool  # True: chunks and buckets by value of the leading key column


_ALIAS = "r"


def build_sides(
    table: TableMapping,
    *,
    source_schema: str,
    target_schema: str,
    target_types: Mapping[str, str],
) -> TableSides:
    """Describe ``table`` on both sides; ``target_types`` maps commerce columns to type names.

    Raises KeyError naming a mapped column the commerce table does not have.
    """
    columns = table.target_columns
    missing = [c for c in columns if c not in target_types]
    if missing:
        raise KeyError(
            f"{target_schema}.{table.target_table} has no column {', '.join(missing)} "
            "that the mapping writes"
        )
    casts = [cast_type(target_types[c]) for c in columns]
    legacy_values = tuple(
        _finite(
            sql.SQL("({})::{}").format(source_sql(table.column(c), qualifier=_ALIAS), t),
            _CASTS.get(target_types[c]),
        )
        for c, t in zip(columns, casts, strict=True)
    )
    commerce_values = tuple(
        sql.SQL("({})::{}").format(sql.Identifier(_ALIAS, c), t)
        for c, t in zip(columns, casts, strict=True)
    )
    deleted: sql.Composable = (
        predicate_sql(table.delete_when, qualifier=_ALIAS)
        if table.delete_when is not None
        else sql.SQL("false")
    )
    legacy = Side(
        relation=sql.Identifier(source_schema, table.source_table),
        keys=tuple(sql.Identifier(_ALIAS, c) for c in table.primary_key),
        values=legacy_values,
        deleted=deleted,
    )
    commerce = Side(
        relation=sql.Identifier(target_schema, table.target_table),
        keys=tuple(sql.Identifier(_ALIAS, c) for c in table.target_key),
        values=commerce_values,
        deleted=sql.SQL("false"),
        position=sql.Identifier(_ALIAS, "_src_lsn"),
    )
    key_types = tuple(cast_type(target_types[c]) for c in table.target_key)
    return TableSides(
        table=table,
        legacy=legacy,
        commerce=commerce,
        columns=columns,
        key_types=key_types,
        integer_leading_key=target_types[table.target_key[0]] in INTEGER_TYPES,
    )


# ---------------------------------------------------------------------------------------------
# Key ranges and chunk plans
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Rows whose key prefix is ``>= lo`` and ``< hi`` (None: unbounded on that side).

    ``lo`` and ``hi`` are prefixes of the key (same length when both are set): ``(5,)`` bounds
    the leading column only, which is how integer chunks and buckets are cut.
    """

    lo: Key | None = None
    hi: Key | None = None

    def to_json(self) -> list[list[object] | None]:
        return [
            None if self.lo is None else list(self.lo),
            None if self.hi is None else list(self.hi),
        ]

    @classmethod
    def from_json(cls, value: Sequence[Sequence[object] | None]) -> KeyRange:
        lo, hi = value
        return cls(None if lo is None else tuple(lo), None if hi is None else tuple(hi))


def _row(exprs: Sequence[sql.Composable]) -> sql.Composable:
    if len(exprs) == 1:
        return exprs[0]
    return sql.SQL("({})").format(sql.SQL(", ").join(exprs))


def range_sql(keys: Sequence[sql.Composable], rng: KeyRange) -> sql.Composable:
    """The WHERE condition selecting ``rng`` over the key expressions ``keys``."""
    parts: list[sql.Composable] = []
    for bound, op in ((rng.lo, ">="), (rng.hi, "<")):
        if bound is None:
            continue
        if not 0 < len(bound) <= len(keys):
            raise ValueError(f"a key range bound has {len(bound)} values for {len(keys)} keys")
        parts.append(
            sql.SQL("{} {} {}").format(
                _row(keys[: len(bound)]),
                sql.SQL(op),
                _row([sql.Literal(v) for v in bound]),
            )
        )
    if not parts:
        return sql.SQL("true")
    return sql.SQL(" AND ").join(parts)


def plan_integer_chunks(
    lo: int | None, hi: int | None, rows: int, chunk_rows: int
) -> list[KeyRange]:
    """Cut the leading-key value span ``[lo, hi]`` into ranges of about ``chunk_rows`` rows.

    Assumes keys spread evenly over the span (true of sequence ids); an uneven spread only makes
    chunks uneven, never wrong. The first and last ranges are open-ended, so rows outside the span
    (an extra commerce row with a larger id, say) still belong to a chunk.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    if lo is None or hi is None or hi < lo:
        return [KeyRange()]
    span = hi - lo + 1
    n = max(1, min(span, math.ceil(max(rows, 1) / chunk_rows)))
    width = math.ceil(span / n)
    bounds = [lo + i * width for i in range(1, n) if lo + i * width <= hi]
    return ranges_from_boundaries([(b,) for b in bounds])


def ranges_from_boundaries(boundaries: Sequence[Key]) -> list[KeyRange]:
    """Consecutive ranges split at the sorted ``boundaries`` (open-ended at both ends)."""
    if not boundaries:
        return [KeyRange()]
    out = [KeyRange(None, boundaries[0])]
    out.extend(KeyRange(a, b) for a, b in itertools.pairwise(boundaries))
    out.append(KeyRange(boundaries[-1], None))
    return out


# ---------------------------------------------------------------------------------------------
# Digest SQL
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Digest:
    """What a digest query returns for a range: rows, the sum of their hashes, and (legacy only)
    rows that exist but that the mapping deletes (``absent``: they must be absent in commerce)."""

    rows: int = 0
    hash_sum: int = 0
    absent: int = 0

    def same(self, other: Digest) -> bool:
        return self.rows == other.rows and self.hash_sum == other.hash_sum


def _hash(side: Side) -> sql.Composable:
    return sql.SQL("hash_record_extended(ROW({}), 0)").format(sql.SQL(", ").join(side.values))


def digest_sql(side: Side, rng: KeyRange) -> sql.Composed:
    """``SELECT rows, hash_sum, absent`` of the rows of ``rng`` (absent: delete_when rows)."""
    return sql.SQL(
        "SELECT count(*) FILTER (WHERE NOT x.d), COALESCE(sum(x.h) FILTER (WHERE NOT x.d), 0), "
        "count(*) FILTER (WHERE x.d) "
        "FROM (SELECT {deleted} AS d, {hash} AS h FROM {rel} AS r WHERE {where}) AS x"
    ).format(
        deleted=side.deleted,
        hash=_hash(side),
        rel=side.relation,
        where=range_sql(side.keys, rng),
    )


def bounds_sql(side: Side, rng: KeyRange) -> sql.Composed:
    """``SELECT min, max`` of the leading key column inside ``rng`` (any row, deleted or not)."""
    return sql.SQL("SELECT min({k}), max({k}) FROM {rel} AS r WHERE {where}").format(
        k=side.keys[0], rel=side.relation, where=range_sql(side.keys, rng)
    )


def bucket_digest_sql(side: Side, rng: KeyRange, lo: int, width: int) -> sql.Composed:
    """Digests of ``rng`` grouped into buckets ``(leading key - lo) / width`` (rng within lo..)."""
    return sql.SQL(
        "SELECT x.b, count(*) FILTER (WHERE NOT x.d), "
        "COALESCE(sum(x.h) FILTER (WHERE NOT x.d), 0), count(*) FILTER (WHERE x.d) "
        "FROM (SELECT ({k}::bigint - {lo}) / {w} AS b, {deleted} AS d, {hash} AS h "
        "FROM {rel} AS r WHERE {where}) AS x GROUP BY x.b"
    ).format(
        k=side.keys[0],
        lo=sql.Literal(lo),
        w=sql.Literal(width),
        deleted=side.deleted,
        hash=_hash(side),
        rel=side.relation,
        where=range_sql(side.keys, rng),
    )


def _select_row(side: Side) -> sql.Composable:
    position = side.position if side.position is not None else sql.SQL("NULL::bigint")
    return sql.SQL("{keys}, {deleted}, {position}, {values}").format(
        keys=sql.SQL(", ").join(side.keys),
        deleted=side.deleted,
        position=position,
        values=sql.SQL(", ").join(side.values),
    )


def rows_sql(side: Side, rng: KeyRange) -> sql.Composed:
    """Every row of ``rng``: key columns, deleted flag, position, values (see :func:`split_row`)."""
    return sql.SQL("SELECT {row} FROM {rel} AS r WHERE {where} ORDER BY {keys}").format(
        row=_select_row(side),
        rel=side.relation,
        where=range_sql(side.keys, rng),
        keys=sql.SQL(", ").join(side.keys),
    )


def rows_by_keys_sql(side: Side, key_types: Sequence[sql.SQL]) -> sql.Composed:
    """The rows whose key is in the parameter arrays (one array parameter per key column)."""
    names = [sql.Identifier(f"k{i}") for i in range(len(key_types))]
    arrays = sql.SQL(", ").join(sql.SQL("%s::{}[]").format(t) for t in key_types)
    join = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(k, sql.SQL("k.{}").format(n))
        for k, n in zip(side.keys, names, strict=True)
    )
    return sql.SQL(
        "SELECT {row} FROM {rel} AS r JOIN unnest({arrays}) AS k({names}) ON {join}"
    ).format(
        row=_select_row(side),
        rel=side.relation,
        arrays=arrays,
        names=sql.SQL(", ").join(names),
        join=join,
    )


def boundaries_sql(side: Side, chunk_rows: int) -> sql.Composed:
    """Every ``chunk_rows``-th key in key order (chunk boundaries for non-integer keys)."""
    names = [sql.Identifier(f"k{i}") for i in range(len(side.keys))]
    inner = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(k, n) for k, n in zip(side.keys, names, strict=True)
    )
    return sql.SQL(
        "SELECT {names} FROM (SELECT {inner}, row_number() OVER (ORDER BY {keys}) AS rn "
        "FROM {rel} AS r) AS x WHERE x.rn % {n} = 1 AND x.rn > 1 ORDER BY x.rn"
    ).format(
        names=sql.SQL(", ").join(sql.SQL("x.{}").format(n) for n in names),
        inner=inner,
        keys=sql.SQL(", ").join(side.keys),
        rel=side.relation,
        n=sql.Literal(chunk_rows),
    )


# ---------------------------------------------------------------------------------------------
# Bisection
# ---------------------------------------------------------------------------------------------


def bucket_width(lo: int, hi_exclusive: int, buckets: int) -> int:
    """Width of ``buckets`` equal buckets covering ``[lo, hi_exclusive)`` (at least 1)."""
    if buckets < 2:
        raise ValueError("bisection needs at least 2 buckets")
    return max(1, math.ceil((hi_exclusive - lo) / buckets))


def split_bucket(lo: int, hi_exclusive: int, width: int, bucket: int) -> KeyRange:
    """The key range of bucket number ``bucket`` of ``[lo, hi_exclusive)`` cut ``width`` wide.

    The last bucket is clipped at ``hi_exclusive``: it must not reach into keys beyond the range
    being split (they belong to a neighbour that was already counted).
    """
    start = lo + bucket * width
    return KeyRange((start,), (min(start + width, hi_exclusive),))


def differing_buckets(legacy: Mapping[int, Digest], commerce: Mapping[int, Digest]) -> list[int]:
    """Bucket numbers whose digests differ (a bucket missing on one side is an empty digest)."""
    empty = Digest()
    return sorted(
        b
        for b in set(legacy) | set(commerce)
        if not legacy.get(b, empty).same(commerce.get(b, empty))
    )
