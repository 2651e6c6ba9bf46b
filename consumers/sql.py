"""The apply path's SQL, composed with :mod:`psycopg.sql` only (pure: builds, never runs).

Where the source position lives (docs/ARCHITECTURE.md, "Control state"):

* every commerce row has ``_src_lsn`` and ``_src_seq``: the position (commit LSN, ordinal) of the
  change that last wrote it. An upsert writes a row only if the row is absent or its position is
  older (``ON CONFLICT ... DO UPDATE ... WHERE (t._src_lsn, t._src_seq) < (EXCLUDED...)``); a
  delete removes it only if its position is older;
* a delete leaves ``cutover.tombstones (target_table, row_key, src_lsn, src_seq)``, so an older
  event arriving later (a replay, a late snapshot row) cannot bring the row back: an upsert
  skips keys whose tombstone is newer. An upsert newer than the tombstone simply wins;
* a carried TRUNCATE (``cutover.truncates``, one row per target table and source position)
  deletes the table's rows older than its position; an upsert older than the table's newest
  truncate is skipped (its row was captured before the TRUNCATE), so a partition that is behind
  cannot bring rows back. Every copy of the truncate (one per partition) deletes again: a row
  an older upsert of another partition wrote concurrently, before the horizon was committed,
  is removed by that partition's own copy, which comes after it;
* ``cutover.consumer_offsets`` holds, per group and partition, the next offset to consume,
  written in the same transaction as the rows (:mod:`cutover.control_store.offsets`).

Every batch goes through a per-table staging table (temporary, ``ON COMMIT DELETE ROWS``,
created once per connection, no constraints): one ``COPY`` loads upserts and deletes, then a few
set-based statements apply them. ``_del`` marks deletes; ``_grp`` numbers the column set of an
upsert (rows whose unchanged TOAST columns were omitted write fewer columns); ``_row_key`` is the
tombstone key text (:func:`consumers.batch.row_key`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from psycopg import sql

STAGE_EXTRA: Final = ("_src_lsn", "_src_seq", "_del", "_grp", "_row_key")
BOOKKEEPING: Final = ("_src_lsn", "_src_seq")


def _ids(names: Sequence[str], qualifier: str | None = None) -> sql.Composable:
    if qualifier is None:
        return sql.SQL(", ").join(sql.Identifier(n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(qualifier, n) for n in names)


def stage_name(target_table: str) -> sql.Identifier:
    """The staging table of ``target_table`` (in the session's temporary schema)."""
    return sql.Identifier("_cutover_stage_" + target_table)


def create_stage(target_schema: str, target_table: str, columns: Sequence[str]) -> sql.Composed:
    """A constraint-free temp table with the target's column types plus the staging columns."""
    return sql.SQL(
        "CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
        "SELECT {cols}, _src_lsn, _src_seq, NULL::boolean AS _del, NULL::int AS _grp, "
        "NULL::text AS _row_key FROM {target} WITH NO DATA"
    ).format(
        stage=stage_name(target_table),
        cols=_ids(columns),
        target=sql.Identifier(target_schema, target_table),
    )


def truncate_stage(target_table: str) -> sql.Composed:
    return sql.SQL("TRUNCATE {}").format(stage_name(target_table))


def copy_stage(target_table: str, columns: Sequence[str]) -> sql.Composed:
    """``COPY`` into the staging table: the mapped columns, then :data:`STAGE_EXTRA`."""
    return sql.SQL("COPY {stage} ({cols}) FROM STDIN").format(
        stage=stage_name(target_table), cols=_ids([*columns, *STAGE_EXTRA])
    )


def upsert_from_stage(
    target_schema: str,
    target_table: str,
    *,
    control_schema: str,
    key: Sequence[str],
    columns: Sequence[str],
    group: int,
) -> sql.Composed:
    """Insert or update the staged upserts of column group ``group``, guarded by position.

    Columns not in ``columns`` (unchanged TOAST) are neither inserted nor in the SET list, so an
    existing row keeps them. Keys whose tombstone is newer than the upsert are skipped, and so
    is every upsert older than the table's newest carried TRUNCATE.

    ``OFFSET 0`` keeps the tombstone check a per-row probe of ``tombstones_pkey``: the staging
    table has no statistics (estimated at a handful of rows), and as an anti-join the planner
    would pick a nested loop over every tombstone of the table — O(rows × tombstones), 170 ms
    for 4,000 rows against 1,500 tombstones, growing with them. The probe stays O(rows · log).
    """
    non_key = [c for c in columns if c not in key]
    sets = [
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in [*non_key, *BOOKKEEPING]
    ]
    return sql.SQL(
        "INSERT INTO {target} AS t ({cols}) "
        "SELECT {scols} FROM {stage} AS s "
        "WHERE NOT s._del AND s._grp = {grp} AND NOT EXISTS ("
        "SELECT 1 FROM {tombstones} AS tb WHERE tb.target_table = {tname} "
        "AND tb.row_key = s._row_key AND (tb.src_lsn, tb.src_seq) > (s._src_lsn, s._src_seq) "
        "OFFSET 0) AND NOT EXISTS (SELECT 1 FROM {truncates} AS tr WHERE tr.target_table = {tname} "
        "AND (tr.src_lsn, tr.src_seq) > (s._src_lsn, s._src_seq)) "
        "ON CONFLICT ({key}) DO UPDATE SET {sets} "
        "WHERE (t._src_lsn, t._src_seq) < (EXCLUDED._src_lsn, EXCLUDED._src_seq)"
    ).format(
        target=sql.Identifier(target_schema, target_table),
        cols=_ids([*columns, *BOOKKEEPING]),
        scols=_ids([*columns, *BOOKKEEPING], "s"),
        stage=stage_name(target_table),
        grp=sql.Literal(group),
        tombstones=sql.Identifier(control_schema, "tombstones"),
        truncates=sql.Identifier(control_schema, "truncates"),
        tname=sql.Literal(target_table),
        key=_ids(key),
        sets=sql.SQL(", ").join(sets),
    )


def delete_from_stage(target_schema: str, target_table: str, key: Sequence[str]) -> sql.Composed:
    """Delete the staged deletes' rows whose position is older than the delete's."""
    match = sql.SQL(" AND ").join(sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(c)) for c in key)
    return sql.SQL(
        "DELETE FROM {target} AS t USING {stage} AS s WHERE s._del AND {match} "
        "AND (t._src_lsn, t._src_seq) < (s._src_lsn, s._src_seq)"
    ).format(
        target=sql.Identifier(target_schema, target_table),
        stage=stage_name(target_table),
        match=match,
    )


def tombstones_from_stage(control_schema: str, target_table: str) -> sql.Composed:
    """Record (or move forward) the tombstone of every staged delete."""
    return sql.SQL(
        "INSERT INTO {tombstones} AS tb (target_table, row_key, src_lsn, src_seq) "
        "SELECT {tname}, s._row_key, s._src_lsn, s._src_seq FROM {stage} AS s WHERE s._del "
        "ON CONFLICT (target_table, row_key) DO UPDATE "
        "SET src_lsn = EXCLUDED.src_lsn, src_seq = EXCLUDED.src_seq "
        "WHERE (tb.src_lsn, tb.src_seq) < (EXCLUDED.src_lsn, EXCLUDED.src_seq)"
    ).format(
        tombstones=sql.Identifier(control_schema, "tombstones"),
        tname=sql.Literal(target_table),
        stage=stage_name(target_table),
    )


def truncate_rows(target_schema: str, target_table: str) -> sql.Composed:
    """Delete the rows a TRUNCATE at position (``%(lsn)s``, ``%(seq)s``) removed: the older ones."""
    return sql.SQL("DELETE FROM {target} WHERE (_src_lsn, _src_seq) < (%(lsn)s, %(seq)s)").format(
        target=sql.Identifier(target_schema, target_table)
    )


def truncate_tombstones(control_schema: str, target_table: str) -> sql.Composed:
    """Drop the table's tombstones older than the TRUNCATE: its horizon covers them."""
    return sql.SQL(
        "DELETE FROM {tombstones} WHERE target_table = {tname} "
        "AND (src_lsn, src_seq) < (%(lsn)s, %(seq)s)"
    ).format(
        tombstones=sql.Identifier(control_schema, "tombstones"),
        tname=sql.Literal(target_table),
    )


def record_truncate(control_schema: str) -> sql.Composed:
    """Record one copy of a TRUNCATE; returns ``first``: whether it is the first copy."""
    return sql.SQL(
        "INSERT INTO {truncates} AS tr (target_table, src_lsn, src_seq, source_table, "
        "rows_removed) VALUES (%(target)s, %(lsn)s, %(seq)s, %(source)s, %(rows)s) "
        "ON CONFLICT (target_table, src_lsn, src_seq) DO UPDATE "
        "SET rows_removed = tr.rows_removed + EXCLUDED.rows_removed, copies = tr.copies + 1 "
        "RETURNING (xmax = 0) AS first"
    ).format(truncates=sql.Identifier(control_schema, "truncates"))


def audit_truncate(control_schema: str) -> sql.Composed:
    """The audit entry of a carried TRUNCATE (``cutover audit`` lists it), written with the
    first copy, in the apply transaction; only where the commands' ``audit`` table exists."""
    return sql.SQL(
        "INSERT INTO {audit} (actor, command, domain, outcome, reason, detail) "
        "VALUES ('cutover apply', 'truncate', %(domain)s, 'applied', %(reason)s, %(detail)s)"
    ).format(audit=sql.Identifier(control_schema, "audit"))
