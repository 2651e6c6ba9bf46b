"""The apply path's SQL, composed with :mod:`psycopg.sql` only (pure: builds, never runs).

Where the source position lives (DESIGN §5, "no visible duplicates, no going backwards"):

* every commerce row has ``_src_lsn`` and ``_src_seq``: the position (commit LSN, ordinal) of the
  change that last wrote it. An upsert writes a row only if the row is absent or its position is
  older (``ON CONFLICT ... DO UPDATE ... WHERE (t._src_lsn, t._src_seq) < (EXCLUDED...)``); a
  delete removes it only if its position is older;
* a delete leaves ``cutover.tombstones (target_table, row_key, src_lsn, src_seq)``, so an older
  event arriving later (a replay, a late snapshot row) cannot bring the row back: an upsert
  skips keys whose tombstone is newer. An upsert newer than the tombstone simply wins;
* ``cutover.consumer_offsets`` holds, per group and partition, the next offset to consume,
  written in the same transaction as the rows.

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
    existing row keeps them. Keys whose tombstone is newer than the upsert are skipped.

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
        "OFFSET 0) "
        "ON CONFLICT ({key}) DO UPDATE SET {sets} "
        "WHERE (t._src_lsn, t._src_seq) < (EXCLUDED._src_lsn, EXCLUDED._src_seq)"
    ).format(
        target=sql.Identifier(target_schema, target_table),
        cols=_ids([*columns, *BOOKKEEPING]),
        scols=_ids([*columns, *BOOKKEEPING], "s"),
        stage=stage_name(target_table),
        grp=sql.Literal(group),
        tombstones=sql.Identifier(control_schema, "tombstones"),
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


# --------------------------------------------------------------------------- consumer offsets
# Parameters: %(group)s, and the partitions as two parallel arrays %(topics)s, %(parts)s.

#: Marks an offsets row this transaction created and has not finished writing. It is replaced
#: before COMMIT, so it is never visible to anyone else.
NEW_ROW_OFFSET: Final = -1


def claim_offsets(control_schema: str) -> sql.Composed:
    """Create absent offsets rows (so the fence can lock them); existing rows are left alone."""
    return sql.SQL(
        "INSERT INTO {t} (group_id, topic, kafka_partition, next_offset) "
        "SELECT %(group)s, u.topic, u.part, {new} "
        "FROM unnest(%(topics)s::text[], %(parts)s::int[]) AS u(topic, part) "
        "ON CONFLICT (group_id, topic, kafka_partition) DO NOTHING"
    ).format(t=sql.Identifier(control_schema, "consumer_offsets"), new=sql.Literal(NEW_ROW_OFFSET))


def read_offsets(control_schema: str, *, lock: bool) -> sql.Composed:
    """(topic, partition, next_offset) of the given partitions; ``lock`` adds FOR UPDATE."""
    return sql.SQL(
        "SELECT topic, kafka_partition, next_offset FROM {t} "
        "WHERE group_id = %(group)s AND (topic, kafka_partition) IN "
        "(SELECT * FROM unnest(%(topics)s::text[], %(parts)s::int[])) "
        "ORDER BY topic, kafka_partition{lock}"
    ).format(
        t=sql.Identifier(control_schema, "consumer_offsets"),
        lock=sql.SQL(" FOR UPDATE") if lock else sql.SQL(""),
    )


def upsert_offsets(control_schema: str) -> sql.Composed:
    """Store next offsets (and source progress) of partitions; arrays in parameter order."""
    return sql.SQL(
        "INSERT INTO {t} AS o (group_id, topic, kafka_partition, next_offset, last_source_lsn, "
        "last_source_ts_ms, last_heartbeat_ms, applied_at) "
        "SELECT %(group)s, u.topic, u.part, u.next, u.lsn, u.ts, u.hb, now() "
        "FROM unnest(%(topics)s::text[], %(parts)s::int[], %(next)s::bigint[], "
        "%(lsn)s::bigint[], %(ts)s::bigint[], %(hb)s::bigint[]) "
        "AS u(topic, part, next, lsn, ts, hb) "
        "ON CONFLICT (group_id, topic, kafka_partition) DO UPDATE SET "
        "next_offset = EXCLUDED.next_offset, "
        "last_source_lsn = COALESCE(EXCLUDED.last_source_lsn, o.last_source_lsn), "
        "last_source_ts_ms = COALESCE(EXCLUDED.last_source_ts_ms, o.last_source_ts_ms), "
        "last_heartbeat_ms = COALESCE(EXCLUDED.last_heartbeat_ms, o.last_heartbeat_ms), "
        "applied_at = now()"
    ).format(t=sql.Identifier(control_schema, "consumer_offsets"))


# --------------------------------------------------------------------------- dead letters

DEAD_LETTER_COLUMNS: Final = (
    "group_id",
    "domain",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "message_key",
    "payload",
    "error_class",
    "error_message",
    "source_table",
)


def insert_dead_letter(control_schema: str) -> sql.Composed:
    """One dead letter (positional parameters in :data:`DEAD_LETTER_COLUMNS` order).

    A redelivered poison message (after a crash before COMMIT the batch is redone) finds its
    row and changes nothing: one row per (group, topic, partition, offset).
    """
    return sql.SQL(
        "INSERT INTO {t} ({cols}) VALUES ({vals}) "
        "ON CONFLICT (group_id, topic, kafka_partition, kafka_offset) DO NOTHING"
    ).format(
        t=sql.Identifier(control_schema, "dead_letters"),
        cols=_ids(DEAD_LETTER_COLUMNS),
        vals=sql.SQL(", ").join(sql.Placeholder() for _ in DEAD_LETTER_COLUMNS),
    )


LIST_COLUMNS: Final = (
    "id",
    "group_id",
    "domain",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "source_table",
    "error_class",
    "error_message",
    "status",
    "created_at",
    "resolved_at",
)


def list_dead_letters(control_schema: str, *, status: bool) -> sql.Composed:
    """Dead letters oldest first; with ``status`` filtered by ``%(status)s``."""
    where = sql.SQL(" WHERE status = %(status)s") if status else sql.SQL("")
    return sql.SQL("SELECT {cols} FROM {t}{where} ORDER BY id").format(
        cols=_ids(LIST_COLUMNS),
        t=sql.Identifier(control_schema, "dead_letters"),
        where=where,
    )


def open_dead_letters(control_schema: str, *, by_id: bool) -> sql.Composed:
    """Open dead letters to retry (``%(id)s`` with ``by_id``), locked against a parallel retry."""
    where = sql.SQL(" AND id = %(id)s") if by_id else sql.SQL("")
    return sql.SQL(
        "SELECT id, topic, kafka_partition, kafka_offset, message_key, payload FROM {t} "
        "WHERE status = 'open'{where} ORDER BY id FOR UPDATE SKIP LOCKED"
    ).format(t=sql.Identifier(control_schema, "dead_letters"), where=where)


def mark_retried(control_schema: str) -> sql.Composed:
    return sql.SQL(
        "UPDATE {t} SET status = 'retried', resolved_at = now() WHERE id = %(id)s"
    ).format(t=sql.Identifier(control_schema, "dead_letters"))


def note_retry_failure(control_schema: str) -> sql.Composed:
    return sql.SQL(
        "UPDATE {t} SET error_class = %(error_class)s, error_message = %(error_message)s "
        "WHERE id = %(id)s"
    ).format(t=sql.Identifier(control_schema, "dead_letters"))
