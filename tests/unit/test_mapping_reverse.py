"""The inverse mapping (write cutover): round trips over generated rows, and init's refusals."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from cutover.errors import MappingError, UnmappableRow
from cutover.mapping import (
    check_round_trip,
    delete_reverse,
    is_delete,
    legacy_key,
    load_mapping,
    map_row,
    map_row_reverse,
    parse_mapping,
)
from cutover.mapping.roundtrip import same_value, sample_rows

SHOP = Path(__file__).resolve().parents[2] / "examples" / "shop" / "mapping.toml"
SPEC = load_mapping(SHOP)
LOSSY = {("products", "status")}  # visible = (status == 'live'): hidden/NULL fold into false


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", list(SPEC.tables))
def test_reverse_of_forward_is_the_row_for_every_mapped_column(name: str, seed: int) -> None:
    table = SPEC.tables[name]
    for row in sample_rows(table, n=500, seed=seed):
        forward = map_row(table, row)
        back = map_row_reverse(table, forward)
        assert legacy_key(table, forward) == tuple(row[c] for c in table.primary_key)
        for col in table.source_columns_used():
            if (name, col) in LOSSY:
                # The weak law: forwarding the reversed value gives the same commerce row.
                assert map_row(table, {**row, col: back[col]}) == forward
            else:
                assert same_value(back[col], row[col]), (col, row[col], back[col])
        assert set(back) <= set(table.source_columns_used()) | {"url"}


def test_exact_decimals_keep_their_scale() -> None:
    table = SPEC.tables["products"]
    row = {"id": 1, "merchant_id": 2, "title": "t", "description": None, "stock": 0}
    for price in ("0.00", "-0.05", "15000.50", "999999999999.99"):
        fwd = map_row(table, {**row, "price_idr": Decimal(price), "status": "live"})
        back = map_row_reverse(table, fwd)["price_idr"]
        assert isinstance(back, Decimal) and str(back) == price


def test_unicode_text_and_the_invoice_link_come_back() -> None:
    table = SPEC.tables["invoices"]
    row = {"id": 7, "order_id": 3, "invoice_no": "INV/中文/🙂é", "issued_at": None}
    back = map_row_reverse(table, map_row(table, row))
    assert back["invoice_no"] == row["invoice_no"]
    assert back["url"] == "https://shop.legacy.example/invoice/INV/中文/🙂é"


def test_visible_writes_back_the_status_the_file_says() -> None:
    table = SPEC.tables["products"]
    assert map_row_reverse(table, {**_listing(), "visible": True})["status"] == "live"
    assert map_row_reverse(table, {**_listing(), "visible": False})["status"] == "hidden"


def _listing() -> dict[str, object]:
    return {
        "listing_id": 1,
        "seller_id": 2,
        "title": "t",
        "description": "d",
        "price_minor": 100,
        "stock": 1,
    }


def test_a_commerce_delete_marks_the_legacy_product_deleted() -> None:
    table = SPEC.tables["products"]
    marks = delete_reverse(table)
    assert marks == {"status": "deleted"}
    assert is_delete(table, marks)
    assert delete_reverse(SPEC.tables["orders"]) is None  # no delete_when: the row is deleted


def test_social_columns_are_never_produced() -> None:
    users = SPEC.tables["users"]
    for row in sample_rows(users, n=100):
        back = map_row_reverse(users, map_row(users, row))
        assert not set(back) & {"handle", "follower_count", "bio"}
        assert set(back) == {"id", "display_name", "email", "phone", "created_at", "updated_at"}


def _refusal(old: str, new: str) -> MappingError:
    text = SHOP.read_text(encoding="utf-8")
    assert old in text
    spec = parse_mapping(text.replace(old, new), "shop.toml")
    with pytest.raises(MappingError) as caught:
        check_round_trip(spec)
    return caught.value


def _line_of(fragment: str, old: str, new: str) -> int:
    lines = SHOP.read_text(encoding="utf-8").replace(old, new).splitlines()
    return next(i for i, line in enumerate(lines, start=1) if fragment in line)


def test_shop_mapping_is_a_round_trip() -> None:
    check_round_trip(SPEC)


def test_a_missing_predicate_reverse_is_refused_with_file_line_and_fix() -> None:
    old = ', reverse = { true = "live", false = "hidden" }'
    err = _refusal(old, "")
    assert err.path == "shop.toml"
    assert err.line == _line_of("visible = {", old, "")
    assert "shop.products → commerce.listings.visible" in err.problem
    assert 'reverse = { true = "live"' in err.problem


def test_a_reverse_that_is_not_a_round_trip_is_refused() -> None:
    old = 'false = "hidden"'
    err = _refusal(old, 'false = "live"')
    assert err.line == _line_of("visible = {", old, 'false = "live"')
    assert "listings.visible" in err.problem and "not a round trip" in err.problem


def test_a_non_injective_enum_needs_an_explicit_reverse() -> None:
    old = 'closed = "CLOSED" }'
    new = 'closed = "CLOSED", frozen = "SUSPENDED" }'
    err = _refusal(old, new)
    assert err.line == _line_of('state = { from = "status", enum = { active', old, new)
    assert "sellers.state" in err.problem and "'SUSPENDED'" in err.problem


def test_a_missing_reverse_delete_is_refused() -> None:
    old = 'reverse_delete = { set = { status = "deleted" } }'
    err = _refusal(old, "")
    assert err.line == _line_of("delete_when =", old, "")
    assert "reverse_delete = { set = { status = 'deleted' } }" in err.problem


def test_a_reverse_delete_the_forward_brings_back_is_refused() -> None:
    old = 'reverse_delete = { set = { status = "deleted" } }'
    new = 'reverse_delete = { set = { status = "hidden" } }'
    err = _refusal(old, new)
    assert err.line == _line_of("reverse_delete =", old, new)
    assert "set status to one of 'deleted'" in err.problem


def test_a_template_whose_placeholder_is_not_recovered_is_refused() -> None:
    old = 'invoice_no = "invoice_no"\n'
    err = _refusal(old, "")
    assert "invoices.link" in err.problem and "no reverse for invoice_no" in err.problem


def test_upper_needs_reverse_lower() -> None:
    old = 'name = "shop_name"'
    err = _refusal(old, 'name = { from = "shop_name", upper = true }')
    assert 'reverse = "lower"' in err.problem and "sellers.name" in err.problem
    text = SHOP.read_text().replace(
        old, 'name = { from = "shop_name", upper = true, reverse = "lower" }'
    )
    check_round_trip(parse_mapping(text))


def test_a_reverse_on_a_derived_column_is_refused_by_the_loader() -> None:
    text = SHOP.read_text().replace(
        'stock = "stock"', 'stock = { from = "stock", reverse = { a = "b" } }'
    )
    with pytest.raises(MappingError, match="inverted automatically"):
        parse_mapping(text)


def test_an_unknown_commerce_value_is_unmappable_in_reverse() -> None:
    table = SPEC.tables["orders"]
    with pytest.raises(UnmappableRow, match="no reverse"):
        map_row_reverse(
            table,
            {
                "order_id": 1,
                "customer_id": 1,
                "seller_id": 1,
                "state": "LOST",
                "total_minor": 1,
                "created_at": None,
                "updated_at": None,
            },
        )


def test_reverse_syntax_errors_name_the_line() -> None:
    text = SHOP.read_text().replace(
        'name = "shop_name"', 'name = { from = "shop_name", upper = true, reverse = "down" }'
    )
    with pytest.raises(MappingError, match='reverse of upper is `reverse = "lower"`') as caught:
        parse_mapping(text, "shop.toml")
    assert (
        caught.value.line
        == text.splitlines().index('name = { from = "shop_name", upper = true, reverse = "down" }')
        + 1
    )
    text = SHOP.read_text().replace(
        'aggregate_key = "id"\n\n[tables.orders.columns]',
        'aggregate_key = "id"\nreverse_delete = "delete"\n\n[tables.orders.columns]',
    )
    with pytest.raises(MappingError, match="without delete_when"):
        parse_mapping(text)
    text = SHOP.read_text().replace('{ true = "live", false = "hidden" }', '{ yes = "live" }')
    with pytest.raises(MappingError, match="keys true and false"):
        parse_mapping(text)
