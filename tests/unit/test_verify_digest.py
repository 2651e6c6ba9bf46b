"""Pure building blocks of verify: digest SQL (golden), chunk plans, bisection, row diffs,
lag-aware recheck verdicts and the consumers' applied position. No services needed."""

from __future__ import annotations

import itertools
from decimal import Decimal
from pathlib import Path

import pytest
from psycopg import sql

from control import digest as dg
from cutover.mapping import MappingSpec, load_mapping

REPO = Path(__file__).resolve().parents[2]

ORDERS_TYPES = {
    "order_id": "bigint",
    "customer_id": "bigint",
    "seller_id": "bigint",
    "state": "text",
    "total_minor": "bigint",
    "created_at": "timestamp with time zone",
    "updated_at": "timestamp with time zone",
    "_src_lsn": "bigint",
    "_src_seq": "bigint",
}
LINES_TYPES = {
    "order_id": "bigint",
    "line_no": "integer",
    "listing_id": "bigint",
    "quantity": "integer",
    "unit_price_minor": "bigint",
}
LISTINGS_TYPES = {
    "listing_id": "bigint",
    "seller_id": "bigint",
    "title": "text",
    "description": "text",
    "price_minor": "bigint",
    "stock": "integer",
    "visible": "boolean",
}


@pytest.fixture(scope="module")
def spec() -> MappingSpec:
    return load_mapping(REPO / "examples" / "shop" / "mapping.toml")


def sides(spec: MappingSpec, table: str, types: dict[str, str]) -> dg.TableSides:
    return dg.build_sides(
        spec.tables[table], source_schema="shop", target_schema="commerce", target_types=types
    )


def text(q: sql.Composable) -> str:
    return q.as_string()


# -- SQL (golden) -------------------------------------------------------------------------------


def test_cast_type_is_a_whitelist() -> None:
    assert text(dg.cast_type("timestamp with time zone")) == "timestamptz"
    assert text(dg.cast_type("character varying")) == "text"
    assert text(dg.cast_type("numeric")) == "numeric"
    # Anything unknown is compared as text: catalog text never reaches the SQL.
    assert text(dg.cast_type("point; DROP TABLE x")) == "text"


def test_digest_sql_orders_golden(spec: MappingSpec) -> None:
    s = sides(spec, "orders", ORDERS_TYPES)
    got = text(dg.digest_sql(s.legacy, dg.KeyRange((1,), (100,))))
    assert got == (
        "SELECT count(*) FILTER (WHERE NOT x.d), COALESCE(sum(x.h) FILTER (WHERE NOT x.d), 0), "
        "count(*) FILTER (WHERE x.d) FROM (SELECT false AS d, hash_record_extended(ROW("
        '("r"."id")::bigint, ("r"."buyer_id")::bigint, ("r"."merchant_id")::bigint, '
        "((CASE \"r\".\"status\" WHEN 'created' THEN 'CREATED' WHEN 'paid' THEN 'PAID' "
        "WHEN 'shipped' THEN 'SHIPPED' WHEN 'completed' THEN 'COMPLETED' "
        "WHEN 'cancelled' THEN 'CANCELLED' END))::text, "
        '(("r"."total_idr" * 100)::bigint)::bigint, '
        # an infinite timestamp cannot map: the guard makes its row fail (SQLSTATE 22007)
        'CASE WHEN isfinite(("r"."created_at")::timestamptz) IS NOT FALSE '
        'THEN ("r"."created_at")::timestamptz '
        'ELSE (("r"."created_at")::timestamptz::text || \' is not finite\')::timestamptz END, '
        'CASE WHEN isfinite(("r"."updated_at")::timestamptz) IS NOT FALSE '
        'THEN ("r"."updated_at")::timestamptz '
        'ELSE (("r"."updated_at")::timestamptz::text || \' is not finite\')::timestamptz END'
        '), 0) AS h FROM "shop"."orders" AS r '
        'WHERE "r"."id" >= 1 AND "r"."id" < 100) AS x'
    )
    commerce = text(dg.digest_sql(s.commerce, dg.KeyRange()))
    assert 'FROM "commerce"."orders" AS r WHERE true' in commerce
    assert '("r"."total_minor")::bigint' in commerce
    assert "_src_lsn" not in commerce  # bookkeeping columns are not compared


def test_delete_when_rows_are_counted_apart(spec: MappingSpec) -> None:
    s = sides(spec, "products", LISTINGS_TYPES)
    got = text(dg.digest_sql(s.legacy, dg.KeyRange()))
    assert 'SELECT COALESCE("r"."status" = \'deleted\', false) AS d' in got
    assert 'COALESCE("r"."status" = \'live\', false))::boolean' in got  # visible
    assert text(s.commerce.deleted) == "false"


def test_composite_key_ranges_and_key_lookup(spec: MappingSpec) -> None:
    s = sides(spec, "order_items", LINES_TYPES)
    assert s.integer_leading_key
    assert text(dg.range_sql(s.legacy.keys, dg.KeyRange((5, 2), (9, 1)))) == (
        '("r"."order_id", "r"."line_no") >= (5, 2) AND ("r"."order_id", "r"."line_no") < (9, 1)'
    )
    assert text(dg.range_sql(s.legacy.keys, dg.KeyRange(None, (9,)))) == '"r"."order_id" < 9'
    by_keys = text(dg.rows_by_keys_sql(s.commerce, s.key_types))
    assert 'JOIN unnest(%s::bigint[], %s::integer[]) AS k("k0", "k1")' in by_keys
    assert '"r"."order_id" = k."k0" AND "r"."line_no" = k."k1"' in by_keys
    with pytest.raises(ValueError, match="bound has 3 values"):
        dg.range_sql(s.legacy.keys, dg.KeyRange((1, 2, 3), None))


def test_bucket_and_bounds_sql(spec: MappingSpec) -> None:
    s = sides(spec, "orders", ORDERS_TYPES)
    got = text(dg.bucket_digest_sql(s.commerce, dg.KeyRange((10,), (330,)), 10, 10))
    assert got.startswith("SELECT x.b, count(*) FILTER (WHERE NOT x.d)")
    assert '("r"."order_id"::bigint - 10) / 10 AS b' in got
    assert got.endswith("GROUP BY x.b")
    assert text(dg.bounds_sql(s.legacy, dg.KeyRange())) == (
        'SELECT min("r"."id"), max("r"."id") FROM "shop"."orders" AS r WHERE true'
    )


def test_build_sides_names_a_missing_commerce_column(spec: MappingSpec) -> None:
    types = dict(ORDERS_TYPES)
    del types["total_minor"]
    with pytest.raises(KeyError, match="no column total_minor"):
        sides(spec, "orders", types)


def test_non_integer_leading_key_uses_keyset_boundaries(spec: MappingSpec) -> None:
    s = sides(spec, "orders", {**ORDERS_TYPES, "order_id": "text"})
    assert not s.integer_leading_key
    got = text(dg.boundaries_sql(s.legacy, 1000))
    assert 'row_number() OVER (ORDER BY "r"."id") AS rn' in got
    assert "WHERE x.rn % 1000 = 1 AND x.rn > 1" in got


# -- chunk plans ----------------------------------------------------------------------------------


def covers(ranges: list[dg.KeyRange]) -> bool:
    """Contiguous, open at both ends: every key falls into exactly one range."""
    if ranges[0].lo is not None or ranges[-1].hi is not None:
        return False
    return all(a.hi == b.lo for a, b in itertools.pairwise(ranges))


@pytest.mark.parametrize(
    ("lo", "hi", "rows", "chunk", "n"),
    [
        (1, 1_000_000, 1_000_000, 100_000, 10),
        (1, 10, 10, 100_000, 1),
        (5, 5, 1, 1, 1),
        (1, 95, 95, 10, 10),
    ],
)
def test_integer_chunks(lo: int, hi: int, rows: int, chunk: int, n: int) -> None:
    ranges = dg.plan_integer_chunks(lo, hi, rows, chunk)
    assert len(ranges) == n
    assert covers(ranges)
    inner = [int(r.lo[0]) for r in ranges[1:] if r.lo is not None]  # type: ignore[call-overload]
    assert all(lo < b <= hi for b in inner)


def test_empty_tables_make_one_open_chunk() -> None:
    assert dg.plan_integer_chunks(None, None, 0, 10) == [dg.KeyRange()]
    assert dg.ranges_from_boundaries([]) == [dg.KeyRange()]
    with pytest.raises(ValueError):
        dg.plan_integer_chunks(1, 2, 2, 0)


def test_ranges_from_boundaries() -> None:
    got = dg.ranges_from_boundaries([("b",), ("m",)])
    assert got == [
        dg.KeyRange(None, ("b",)),
        dg.KeyRange(("b",), ("m",)),
        dg.KeyRange(("m",), None),
    ]
    assert [dg.KeyRange.from_json(r.to_json()) for r in got] == got


# -- bisection ------------------------------------------------------------------------------------


def test_buckets() -> None:
    assert dg.bucket_width(0, 100, 32) == 4
    assert dg.bucket_width(0, 5, 32) == 1
    assert dg.split_bucket(100, 200, 4, 3) == dg.KeyRange((112,), (116,))
    # the last bucket stops at the end of the range being split
    assert dg.split_bucket(1251, 1501, 63, 3) == dg.KeyRange((1440,), (1501,))
    with pytest.raises(ValueError):
        dg.bucket_width(0, 10, 1)


def test_differing_buckets_treats_absent_as_empty() -> None:
    a = {0: dg.Digest(10, 5), 1: dg.Digest(10, 7), 2: dg.Digest(3, 1)}
    b = {0: dg.Digest(10, 5), 1: dg.Digest(10, 8), 3: dg.Digest(1, 1)}
    assert dg.differing_buckets(a, b) == [1, 2, 3]
    # "absent" (rows the mapping deletes) is not part of the comparison
    assert dg.Digest(1, 2, absent=5).same(dg.Digest(1, 2))


# -- row diffs ------------------------------------------------------------------------------------

COLS = ("order_id", "state", "total_minor")


def row(key: int, *values: object, deleted: bool = False, pos: int | None = None) -> dg.FetchedRow:
    return dg.FetchedRow((key,), deleted, pos, (key, *values))


def test_diff_rows_classifies_every_kind() -> None:
    legacy = [
        row(1, "PAID", 100),
        row(2, "PAID", 200),  # missing in commerce
        row(3, "PAID", Decimal("3.50")),  # numeric scale differs: equal
        row(4, "CREATED", 400),  # different state
        row(5, "X", 0, deleted=True),  # the mapping deletes it, commerce still has it
        row(7, "X", 0, deleted=True),  # deleted, and absent: fine
    ]
    commerce = [
        row(1, "PAID", 100),
        row(3, "PAID", Decimal("3.5")),
        row(4, "PAID", 400),
        row(5, "X", 0),
        row(6, "PAID", 600),  # extra
    ]
    got = dg.diff_rows(COLS, legacy, commerce)
    assert got.matching == 2
    assert got.legacy_rows == 4 and got.absent == 2 and got.commerce_rows == 5
    assert [d.to_json() for d in got.diffs] == [
        {"key": [2], "kind": "missing"},
        {"key": [4], "kind": "different", "columns": ["state"]},
        {"key": [5], "kind": "deleted_in_source"},
        {"key": [6], "kind": "extra"},
    ]
    again = dg.KeyDiff.from_json(got.diffs[1].to_json())
    assert again == got.diffs[1]


def test_null_against_value_differs() -> None:
    assert dg.compare_values(COLS, (1, None, 5), (1, "A", 5)) == ("state",)
    assert dg.compare_values(COLS, (1, None, 5), (1, None, 5)) == ()


def test_split_row() -> None:
    got = dg.split_row((7, 1, False, 123, 7, 1, "x"), 2)
    assert got == dg.FetchedRow((7, 1), False, 123, (7, 1, "x"))


# -- lag-aware recheck ----------------------------------------------------------------------------

DIFF = dg.KeyDiff((1,), "different", ("state",))


def test_judge() -> None:
    assert dg.judge(None, caught_up=False, commerce_position=None, snapshot_lsn=10) == "match"
    assert dg.judge(DIFF, caught_up=False, commerce_position=5, snapshot_lsn=10) == "pending"
    # commerce ahead of the legacy snapshot: the legacy read is the stale one
    assert dg.judge(DIFF, caught_up=True, commerce_position=11, snapshot_lsn=10) == "pending"
    assert dg.judge(DIFF, caught_up=True, commerce_position=10, snapshot_lsn=10) == "confirmed"
    assert dg.judge(DIFF, caught_up=True, commerce_position=None, snapshot_lsn=10) == "confirmed"


def test_tracker_needs_two_confirmations_in_a_row() -> None:
    t = dg.RecheckTracker()
    t.add([(1,), (2,), (3,)])
    t.record((1,), "confirmed", DIFF)
    t.record((2,), "match", None)  # it was lag
    t.record((3,), "pending", dg.KeyDiff((3,), "missing"))
    assert not t.done and (1,) not in t.confirmed
    t.record((1,), "pending", DIFF)  # a pending verdict resets the count
    t.record((1,), "confirmed", DIFF)
    assert (1,) not in t.confirmed
    t.record((1,), "confirmed", DIFF)
    assert t.confirmed == {(1,): DIFF}
    assert t.matched == {(2,)}
    assert t.unresolved() == [dg.KeyDiff((3,), "missing")]
    t.record((3,), "match", None)
    assert t.done
    t.add([(1,)])  # a confirmed key is not reopened
    assert t.done


# -- the consumers' applied position --------------------------------------------------------------


def test_applied_position_is_the_minimum_over_partitions() -> None:
    offsets = {0: (10, 500), 1: (20, 300), 2: (5, None)}
    assert dg.applied_position(range(3), offsets, None, None) == 0  # p2 applied nothing
    assert dg.applied_position(range(2), offsets, None, None) == 300


def test_idle_partitions_count_as_caught_up_to_the_delivered_position() -> None:
    offsets = {0: (10, 500), 1: (20, 300)}
    # p1 consumed everything Kafka holds (next_offset == high watermark): it has applied all
    # the producer delivered (900); p0 has 2 events to go, so it only vouches for 500.
    assert dg.applied_position(range(2), offsets, 900, {0: 12, 1: 20}) == 500
    assert dg.applied_position(range(2), offsets, 900, {0: 10, 1: 20}) == 900
    # a partition with no offsets row and an empty topic partition is caught up too
    assert dg.applied_position(range(3), offsets, 900, {0: 10, 1: 20, 2: 0}) == 900


def test_partitions_counted_for_the_applied_position() -> None:
    """The configured partitions, the topic's real ones and any with an offset: a partition only
    one source knows of still counts (fail closed)."""
    from control.positions import partitions_of

    assert partitions_of(3, {0: (1, None), 5: (1, None)}, None) == [0, 1, 2, 5]
    assert partitions_of(3, {}, {0: 1, 1: 1, 2: 1, 3: 1}) == [0, 1, 2, 3]
