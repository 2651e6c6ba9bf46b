"""The reverse direction's pure parts: the direction object, the producer's view of commerce,
the reverse applier's row operations and their SQL (the real-stack test is
tests/integration/test_reverse.py)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from psycopg import sql

from consumers.events import Change
from consumers.reverse import LegacySink, claim_position, reverse_op, sink_factory, write_sql
from consumers.sink import Sink
from cutover import direction
from cutover.config import KafkaSettings, Settings, SourceSettings, TargetSettings
from cutover.errors import MappingError, UnmappableRow
from cutover.mapping import aggregate_key, load_mapping
from producers.init_checks import TableInfo
from producers.init_reverse import _table_problems

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop" / "mapping.toml"
SPEC = load_mapping(SHOP)
SETTINGS = Settings(
    source=SourceSettings(dsn="postgresql://legacy/db", peek_batch=77),
    target=TargetSettings(dsn="postgresql://commerce/db", control_schema="ctl"),
    kafka=KafkaSettings(topic_prefix="shop"),
    mapping_path=SHOP,
)


def _text(query: sql.Composable) -> str:
    return query.as_string(None)


def test_forward_is_the_configuration_as_written() -> None:
    fwd = direction.forward(SETTINGS)
    assert (fwd.capture, fwd.apply_target) == (SETTINGS.source, SETTINGS.target)
    assert (fwd.producer_schema, fwd.group_id, fwd.topic("data")) == (
        "cutover", "cutover-apply", "shop.data",
    )  # fmt: skip
    assert fwd.snapshots and fwd.watch_capture and not fwd.reverse
    assert fwd.routes(SPEC) is SPEC
    assert fwd.settings_for_capture(SETTINGS) == SETTINGS
    assert fwd.settings_for_apply(SETTINGS) == SETTINGS


def test_reverse_reads_commerce_and_writes_legacy() -> None:
    rev = direction.of(SETTINGS, reverse_way=True)
    capture = rev.settings_for_capture(SETTINGS).source
    assert capture.dsn == SETTINGS.target.dsn
    assert (capture.slot, capture.publication) == ("cutover_reverse_slot", "cutover_reverse_pub")
    assert capture.peek_batch == 77  # the [source] tuning knobs carry over
    assert rev.producer_schema == "ctl"  # the producer's state lives in commerce
    applied = rev.settings_for_apply(SETTINGS)
    assert applied.target.dsn == SETTINGS.source.dsn
    assert applied.target.control_schema == "cutover"  # [reverse] control_schema
    assert applied.apply.group_id == "cutover-apply-reverse"
    assert rev.topics(SPEC) == [
        "shop.reverse.payment",
        "shop.reverse.data",
        "shop.reverse.merchant",
    ]
    assert not rev.snapshots and not rev.watch_capture
    assert (rev.capture_side, rev.apply_side) == ("target", "source")


def test_reverse_view_keys_commerce_tables_by_their_primary_key() -> None:
    view = direction.reverse_view(SPEC)
    assert (view.source_schema, view.target_schema) == ("commerce", "shop")
    assert set(view.tables) == {t.target_table for t in SPEC.tables.values()}
    lines = view.tables["order_lines"]
    assert (lines.primary_key, lines.target_key, lines.domain) == (
        ("order_id", "line_no"), ("order_id", "line_no"), "payment",
    )  # fmt: skip
    listings = view.tables["listings"]
    assert (listings.target_table, listings.primary_key) == ("products", ("listing_id",))
    # A delete carries only the key: the message key must be in it.
    assert aggregate_key(listings, {"listing_id": 7}) == "7"
    for tm in view.tables.values():
        assert tm.aggregate_key in tm.primary_key


def test_reverse_publication_lists_key_and_mapped_columns_only() -> None:
    cols = direction.reverse_columns(SPEC.tables["products"])
    assert cols[0] == "listing_id"
    assert "_src_lsn" not in cols and "_src_seq" not in cols
    assert set(cols) == {*SPEC.tables["products"].target_columns}


def _listing(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "listing_id": 5, "seller_id": 2, "title": "T", "description": "D",
        "price_minor": 150050, "stock": 3, "visible": True, "updated_at": None,
    }  # fmt: skip
    row.update(over)
    return {k: v for k, v in row.items() if k in SPEC.tables["products"].target_columns}


def _change(op: str, row: dict[str, object], before: dict[str, object] | None = None) -> Change:
    return Change("commerce", "listings", op, 0x500, 2, 0, row, before, True, False)


def test_an_upsert_writes_the_mapped_legacy_columns_only() -> None:
    op = reverse_op(SPEC.tables["products"], _change("u", _listing()))
    assert (op.kind, op.key, op.position, op.row_key) == ("upsert", (5,), (0x500, 2), "[5]")
    assert op.values["price_idr"] == Decimal("1500.50")
    assert op.values["status"] == "live"
    (update, params), (insert, insert_params) = write_sql("shop", op)
    # UPDATE first: an INSERT ... ON CONFLICT would be refused by a NOT NULL column the mapping
    # does not write (users.handle) before the conflict is even looked for.
    text = _text(update)
    assert text.startswith('UPDATE "shop"."products" SET "merchant_id" = %s, ')
    assert text.endswith('WHERE "id" = %s')
    assert '"id" = %s,' not in text and params[-1] == 5
    assert len(params) == text.count("%s")
    text = _text(insert)
    assert text.startswith('INSERT INTO "shop"."products" ("id", ')
    assert text.endswith('ON CONFLICT ("id") DO NOTHING')
    assert insert_params[0] == 5 and len(insert_params) == text.count("%s")


def test_a_customer_created_on_commerce_gets_its_legacy_only_columns() -> None:
    row = {
        "customer_id": 77,
        "display_name": "N",
        "email": None,
        "phone": None,
        "created_at": None,
        "updated_at": None,
    }
    change = Change("commerce", "customers", "c", 9, 0, 0, row, None, True, False)
    op = reverse_op(SPEC.tables["users"], change)
    (update, _params), (insert, insert_params) = write_sql("shop", op)
    assert "handle" not in _text(update)  # an existing user keeps the handle it has
    text = _text(insert)
    assert '"handle"' in text and insert_params[-1] == "buyer-77"


def test_reverse_insert_fills_only_excluded_columns_with_known_placeholders(
    tmp_path: Path,
) -> None:
    base = SHOP.read_text()
    for bad, why in (
        ('reverse_insert = { handle = "buyer-{id}" }', None),
        ('reverse_insert = { email = "x" }', "is not excluded"),
        ('reverse_insert = { handle = "buyer-{nope}" }', "uses {nope}"),
        ("reverse_insert = { handle = 1.5 }", "string template or an integer"),
    ):
        text = base.replace('reverse_insert = { handle = "buyer-{id}" }', bad)
        path = tmp_path / "m.toml"
        path.write_text(text)
        if why is None:
            load_mapping(path)
            continue
        with pytest.raises(MappingError) as info:
            load_mapping(path)
        assert why in str(info.value)


def test_a_deleted_listing_marks_the_legacy_product() -> None:
    op = reverse_op(SPEC.tables["products"], _change("d", {"listing_id": 5}))
    assert (op.kind, op.values) == ("mark", {"status": "deleted"})
    [(query, params)] = write_sql("shop", op)
    assert _text(query) == 'UPDATE "shop"."products" SET "status" = %s WHERE "id" = %s'
    assert params == ["deleted", 5]


def test_other_deletes_delete_the_legacy_row() -> None:
    change = Change(
        "commerce", "order_lines", "d", 9, 0, 0, {"order_id": 3, "line_no": 1}, None, True, False
    )
    op = reverse_op(SPEC.tables["order_items"], change)
    [(query, params)] = write_sql("shop", op)
    assert _text(query) == (
        'DELETE FROM "shop"."order_items" WHERE "order_id" = %s AND "line_no" = %s'
    )
    assert params == [3, 1]


def test_a_commerce_key_change_is_not_carried_back() -> None:
    with pytest.raises(UnmappableRow, match="key changed"):
        reverse_op(SPEC.tables["products"], _change("u", _listing(), before={"listing_id": 4}))


def test_the_position_guard_moves_only_forward() -> None:
    text = _text(claim_position("cutover"))
    assert '"cutover"."row_positions"' in text
    assert "WHERE (p.src_lsn, p.src_seq) < (EXCLUDED.src_lsn, EXCLUDED.src_seq)" in text
    assert text.endswith("RETURNING 1")


def test_the_sink_follows_the_direction() -> None:
    assert sink_factory(direction.forward(SETTINGS)) is Sink
    assert sink_factory(direction.reverse(SETTINGS)) is LegacySink
    assert "row_positions" in LegacySink.CONTROL_TABLES


def _info(**over: object) -> TableInfo:
    base: dict[str, object] = {
        "name": "listings", "oid": 1, "replica_identity": "d",
        "columns": ("listing_id", "seller_id", "title", "description", "price_minor", "stock",
                    "visible", "_src_lsn", "_src_seq"),
        "generated": frozenset(), "not_null": frozenset(), "primary_key": ("listing_id",),
        "identity_index": None, "identity_columns": (), "identity_index_valid": False,
    }  # fmt: skip
    base.update(over)
    return TableInfo(**base)  # type: ignore[arg-type]


def test_reverse_preflight_names_what_is_wrong_with_a_commerce_table() -> None:
    tm = SPEC.tables["products"]
    cols = direction.reverse_columns(tm)
    assert _table_problems(tm.target_key, cols, _info()) == []
    problems = _table_problems(
        tm.target_key,
        cols,
        _info(primary_key=("seller_id",), replica_identity="f", columns=("listing_id",)),
    )
    assert len(problems) == 3
    assert "primary key ['seller_id']" in problems[0] and "['listing_id']" in problems[0]
    assert "lacks the mapped columns" in problems[1] and "price_minor" in problems[1]
    assert "REPLICA IDENTITY FULL" in problems[2] and "REPLICA IDENTITY DEFAULT" in problems[2]
    nothing = _table_problems(tm.target_key, cols, _info(replica_identity="n"))
    assert nothing and "REPLICA IDENTITY NOTHING" in nothing[0]
