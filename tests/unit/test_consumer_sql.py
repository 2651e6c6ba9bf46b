"""consumers.sql: golden SQL text of the apply path (no services)."""

from __future__ import annotations

from consumers import sql as q
from cutover.control_store import dead_letters, offsets


def _text(composed: object) -> str:
    return composed.as_string(None)  # type: ignore[attr-defined,no-any-return]


def test_upsert_guards_position_skips_newer_tombstones_and_sets_only_given_columns() -> None:
    text = _text(
        q.upsert_from_stage(
            "commerce",
            "listings",
            control_schema="cutover",
            key=("listing_id",),
            columns=("listing_id", "title", "stock"),
            group=2,
        )
    )
    assert text == (
        'INSERT INTO "commerce"."listings" AS t ("listing_id", "title", "stock", "_src_lsn", '
        '"_src_seq") SELECT "s"."listing_id", "s"."title", "s"."stock", "s"."_src_lsn", '
        '"s"."_src_seq" FROM "_cutover_stage_listings" AS s WHERE NOT s._del AND s._grp = 2 '
        'AND NOT EXISTS (SELECT 1 FROM "cutover"."tombstones" AS tb WHERE '
        "tb.target_table = 'listings' AND tb.row_key = s._row_key AND (tb.src_lsn, tb.src_seq) "
        '> (s._src_lsn, s._src_seq) OFFSET 0) AND NOT EXISTS (SELECT 1 FROM "cutover"."truncates" '
        "AS tr WHERE tr.target_table = 'listings' AND (tr.src_lsn, tr.src_seq) > "
        '(s._src_lsn, s._src_seq)) ON CONFLICT ("listing_id") DO UPDATE SET '
        '"title" = EXCLUDED."title", "stock" = EXCLUDED."stock", '
        '"_src_lsn" = EXCLUDED."_src_lsn", "_src_seq" = EXCLUDED."_src_seq" '
        "WHERE (t._src_lsn, t._src_seq) < (EXCLUDED._src_lsn, EXCLUDED._src_seq)"
    )
    assert '"description"' not in text  # an unchanged TOAST column is never written


def test_truncate_deletes_only_older_rows_and_tombstones_and_records_each_copy() -> None:
    assert _text(q.truncate_rows("commerce", "invoices")) == (
        'DELETE FROM "commerce"."invoices" WHERE (_src_lsn, _src_seq) < (%(lsn)s, %(seq)s)'
    )
    assert _text(q.truncate_tombstones("cutover", "invoices")) == (
        'DELETE FROM "cutover"."tombstones" WHERE target_table = \'invoices\' '
        "AND (src_lsn, src_seq) < (%(lsn)s, %(seq)s)"
    )
    assert _text(q.record_truncate("cutover")) == (
        'INSERT INTO "cutover"."truncates" AS tr (target_table, src_lsn, src_seq, source_table, '
        "rows_removed) VALUES (%(target)s, %(lsn)s, %(seq)s, %(source)s, %(rows)s) "
        "ON CONFLICT (target_table, src_lsn, src_seq) DO UPDATE "
        "SET rows_removed = tr.rows_removed + EXCLUDED.rows_removed, copies = tr.copies + 1 "
        "RETURNING (xmax = 0) AS first"
    )


def test_delete_matches_composite_keys_and_guards_position() -> None:
    text = _text(q.delete_from_stage("commerce", "order_lines", ("order_id", "line_no")))
    assert text == (
        'DELETE FROM "commerce"."order_lines" AS t USING "_cutover_stage_order_lines" AS s '
        'WHERE s._del AND t."order_id" = s."order_id" AND t."line_no" = s."line_no" '
        "AND (t._src_lsn, t._src_seq) < (s._src_lsn, s._src_seq)"
    )


def test_tombstones_only_move_forward() -> None:
    text = _text(q.tombstones_from_stage("cutover", "orders"))
    assert "ON CONFLICT (target_table, row_key) DO UPDATE" in text
    assert "WHERE (tb.src_lsn, tb.src_seq) < (EXCLUDED.src_lsn, EXCLUDED.src_seq)" in text


def test_stage_has_target_types_and_no_constraints() -> None:
    text = _text(q.create_stage("commerce", "orders", ("order_id", "state")))
    assert text == (
        'CREATE TEMP TABLE IF NOT EXISTS "_cutover_stage_orders" ON COMMIT DELETE ROWS AS '
        'SELECT "order_id", "state", _src_lsn, _src_seq, NULL::boolean AS _del, '
        'NULL::int AS _grp, NULL::text AS _row_key FROM "commerce"."orders" WITH NO DATA'
    )
    copy = _text(q.copy_stage("orders", ("order_id", "state")))
    assert copy == (
        'COPY "_cutover_stage_orders" ("order_id", "state", "_src_lsn", "_src_seq", "_del", '
        '"_grp", "_row_key") FROM STDIN'
    )


def test_offsets_fence_locks_rows() -> None:
    locked = _text(offsets.read_query("cutover", lock=True))
    assert locked.endswith("ORDER BY topic, kafka_partition FOR UPDATE")
    assert "FOR UPDATE" not in _text(offsets.read_query("cutover", lock=False))
    claim = _text(offsets.claim_query("cutover"))
    assert "ON CONFLICT (group_id, topic, kafka_partition) DO NOTHING" in claim
    assert str(offsets.NEW_ROW_OFFSET) in claim


def test_offsets_upsert_keeps_known_progress_when_a_batch_has_none() -> None:
    text = _text(offsets.upsert_query("cutover"))
    assert "next_offset = EXCLUDED.next_offset" in text
    assert "last_heartbeat_ms = COALESCE(EXCLUDED.last_heartbeat_ms, o.last_heartbeat_ms)" in text


def test_dead_letters_are_unique_per_offset() -> None:
    text = _text(dead_letters.insert_query("cutover"))
    assert text.startswith('INSERT INTO "cutover"."dead_letters" ("group_id", "domain", ')
    assert text.endswith("ON CONFLICT (group_id, topic, kafka_partition, kafka_offset) DO NOTHING")
    assert text.count("%s") == len(dead_letters.COLUMNS)
