"""consumers.batch: units of atomicity, change → row operations, in-batch merge (no services)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from consumers.batch import (
    Entry,
    RowOp,
    closed_prefix,
    column_groups,
    merge,
    plan_step,
    row_key,
    to_ops,
)
from consumers.events import Change, Heartbeat, Position
from cutover.errors import DecodeError, UnmappableRow
from cutover.mapping import MappingSpec, TableMapping, load_mapping
from cutover.values import UNCHANGED

MAPPING = Path(__file__).resolve().parents[2] / "examples" / "shop" / "mapping.toml"


@pytest.fixture(scope="module")
def spec() -> MappingSpec:
    return load_mapping(MAPPING)


@pytest.fixture(scope="module")
def products(spec: MappingSpec) -> TableMapping:
    return spec.tables["products"]


def _product(**over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": 10,
        "merchant_id": 7,
        "title": "T",
        "description": "long",
        "price_idr": Decimal("1.50"),
        "stock": 3,
        "status": "live",
    }
    row.update(over)
    return row


def _change(
    op: str,
    row: dict[str, object],
    lsn: int,
    seq: int = 0,
    *,
    closes: bool = True,
    before: dict[str, object] | None = None,
) -> Change:
    return Change("shop", "products", op, lsn, seq, 0, row, before, closes, op == "r")


def _entry(offset: int, closes: bool | None) -> Entry:
    if closes is None:
        return Entry(offset, None, b"x", error=DecodeError("bad"))
    return Entry(offset, None, b"x", event=_change("u", _product(), offset, closes=closes))


# ----------------------------------------------------------------------------- units


def test_closed_prefix_cuts_after_the_last_closing_event() -> None:
    entries = [
        _entry(0, False),
        _entry(1, True),
        _entry(2, False),
        _entry(3, True),
        _entry(4, False),
        _entry(5, False),
    ]
    assert closed_prefix(entries) == 4


def test_closed_prefix_of_an_open_transaction_is_empty() -> None:
    assert closed_prefix([_entry(0, False), _entry(1, False)]) == 0
    assert closed_prefix([]) == 0


def test_a_step_takes_closed_prefixes_and_streams_a_long_open_unit() -> None:
    a, b = ("t", 0), ("t", 1)
    buffers = {
        a: [_entry(0, False), _entry(1, True), _entry(2, False)],  # one unit, then an open tail
        b: [_entry(i, False) for i in range(5)],  # a long unit, still open
    }
    step = plan_step(buffers, set(), batch_max=3, long_tx_events=4)
    assert step.take == {a: 2, b: 5}
    assert step.streaming == {b} and step.opened == [(b, 5)] and step.closed == []
    assert len(buffers[b]) == 5  # the caller cuts the buffers
    # Streaming: sub-batches of batch_max until the closing event arrives, then its prefix.
    more = {a: [], b: [_entry(5, False), _entry(6, False)]}
    assert plan_step(more, {b}, batch_max=3, long_tx_events=4).take == {}
    more[b].append(_entry(7, False))
    assert plan_step(more, {b}, batch_max=3, long_tx_events=4).take == {b: 3}
    more[b] += [_entry(8, True), _entry(9, False)]
    done = plan_step(more, {b}, batch_max=3, long_tx_events=4)
    assert done.take == {b: 4} and done.streaming == set() and done.closed == [b]


def test_open_tails_are_bounded_as_a_whole() -> None:
    # Three partitions each below long_tx_events, together above twice it: the biggest streams.
    buffers = {("t", p): [_entry(i, False) for i in range(4 + p)] for p in range(3)}
    step = plan_step(buffers, set(), batch_max=100, long_tx_events=7)
    assert step.opened == [(("t", 2), 6)] and step.streaming == {("t", 2)}
    assert step.take == {}


def test_an_undecodable_message_inside_an_open_unit_does_not_close_it() -> None:
    assert closed_prefix([_entry(0, True), _entry(1, False), _entry(2, None)]) == 1
    beat = Entry(3, None, b"x", event=Heartbeat(1, 2, "p"))
    assert closed_prefix([_entry(0, False), _entry(1, None), beat]) == 3


def test_an_undecodable_message_at_a_unit_boundary_closes_by_itself() -> None:
    assert closed_prefix([_entry(0, None)]) == 1
    assert closed_prefix([_entry(0, True), _entry(1, None), _entry(2, None)]) == 3
    # ...unless the buffer starts inside a long transaction being applied in sub-batches.
    assert closed_prefix([_entry(0, None)], at_boundary=False) == 0


# ----------------------------------------------------------------------------- to_ops


def test_upsert_maps_and_omits_unchanged_toast(products: TableMapping) -> None:
    [op] = to_ops(products, _change("u", _product(description=UNCHANGED), 100), 0)
    assert not op.delete
    assert op.key == (10,)
    assert op.position == (100, 0)
    assert op.values == {
        "listing_id": 10,
        "seller_id": 7,
        "title": "T",
        "price_minor": 150,
        "stock": 3,
        "visible": True,
    }
    assert "description" not in op.columns


def test_delete_when_deletes(products: TableMapping) -> None:
    [op] = to_ops(products, _change("u", _product(status="deleted"), 100), 3)
    assert op.delete and op.key == (10,) and op.origins == [3]


def test_delete_op_needs_only_the_key(products: TableMapping) -> None:
    row: dict[str, object] = {
        "id": 10,
        "merchant_id": None,
        "title": None,
        "description": None,
        "price_idr": None,
        "stock": None,
        "status": None,
    }
    [op] = to_ops(products, _change("d", row, 100), 0)
    assert op.delete and op.key == (10,) and op.values == {}


def test_a_key_change_deletes_the_old_key(products: TableMapping) -> None:
    ops = to_ops(products, _change("u", _product(id=11), 100, before=_product(id=10)), 0)
    assert [(o.key, o.delete) for o in ops] == [((10,), True), ((11,), False)]


def test_unmappable_row_raises(products: TableMapping) -> None:
    with pytest.raises(UnmappableRow):
        to_ops(products, _change("c", _product(price_idr=Decimal("1.505")), 1), 0)


def test_row_key_is_jsonb_array_text() -> None:
    assert row_key((46, 2)) == "[46, 2]"
    assert row_key(("a",)) == '["a"]'


# ----------------------------------------------------------------------------- merge


def _op(
    products: TableMapping, lsn: int, delete: bool = False, origin: int = 0, **values: object
) -> RowOp:
    return RowOp(products, (10,), Position(lsn, 0), delete, dict(values), [origin])


def test_merge_keeps_the_newest_position_whatever_the_batch_order(
    products: TableMapping,
) -> None:
    [op] = merge([_op(products, 300, stock=3, origin=1), _op(products, 200, stock=2, origin=0)])
    assert op.position == (300, 0)
    assert op.values == {"stock": 3}
    assert op.origins == [0, 1]  # in position order


def test_merge_fills_omitted_columns_from_older_upserts_of_the_batch(
    products: TableMapping,
) -> None:
    full = _op(products, 100, title="T", description="long", stock=1)
    toast = _op(products, 200, title="T2", stock=2)  # description unchanged: omitted
    [op] = merge([full, toast])
    assert op.values == {"title": "T2", "description": "long", "stock": 2}


def test_merge_keeps_omitted_columns_omitted_when_no_event_had_them(
    products: TableMapping,
) -> None:
    [op] = merge([_op(products, 100, stock=1), _op(products, 200, stock=2)])
    assert "description" not in op.values


def test_delete_then_insert_is_an_upsert_of_the_insert_only(products: TableMapping) -> None:
    [op] = merge(
        [
            _op(products, 100, stock=1, description="old"),
            _op(products, 200, True),
            _op(products, 300, stock=3),
        ]
    )
    assert not op.delete
    assert op.values == {"stock": 3}
    assert op.position == (300, 0)


def test_insert_then_delete_is_a_delete(products: TableMapping) -> None:
    [op] = merge([_op(products, 100, stock=1), _op(products, 200, True)])
    assert op.delete and op.values == {} and op.position == (200, 0)


def test_duplicates_collapse(products: TableMapping) -> None:
    [op] = merge([_op(products, 100, stock=1, origin=0), _op(products, 100, stock=1, origin=1)])
    assert op.origins == [0]


def test_different_keys_stay_apart(products: TableMapping) -> None:
    a = _op(products, 100, stock=1)
    b = RowOp(products, (11,), Position(50, 0), False, {"stock": 2}, [1])
    assert {o.key for o in merge([a, b])} == {(10,), (11,)}


def test_column_groups_split_by_written_columns(products: TableMapping) -> None:
    full = to_ops(products, _change("c", _product(), 1), 0)[0]
    toast = to_ops(products, _change("u", _product(id=11, description=UNCHANGED), 2), 1)[0]
    gone = to_ops(products, _change("u", _product(id=12, status="deleted"), 3), 2)[0]
    groups = column_groups([full, toast, gone])
    assert len(groups) == 2
    assert groups[full.columns] == [full]
    assert groups[toast.columns] == [toast]
    assert "description" in full.columns and "description" not in toast.columns
