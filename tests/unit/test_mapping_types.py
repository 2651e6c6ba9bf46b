"""The mapping's type check (``cutover init``) and its declared invariants.

The type check runs against column types given as plain dicts (as information_schema would
return them); the shipped shop mapping must pass against the types of its own DDL files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cutover.errors import MappingError
from cutover.mapping import MappingSpec, check_types, load_mapping, parse_mapping
from cutover.mapping.transforms import assignable, type_family
from tests.unit.test_mapping import HEAD, PRODUCTS, SHOP, USERS, mapping_error, parse_ddl

PRODUCT_TYPES = {
    "products": {
        "id": "bigint",
        "merchant_id": "bigint",
        "status": "text",
        "price_idr": "numeric",
        "title": "character varying",
        "is_new": "boolean",
    }
}
LISTING_TYPES = {
    "listings": {
        "listing_id": "bigint",
        "visible": "boolean",
        "price_minor": "bigint",
        "title": "text",
        "flag": "boolean",
    }
}


def _check(tmp_path: Path, column_line: str) -> tuple[MappingError, int, Path]:
    """Check PRODUCTS plus ``column_line`` (marked ``# <-``) against the types above."""
    path = tmp_path / "mapping.toml"
    text = HEAD + PRODUCTS + column_line + "  # <-\n"
    path.write_text(text)
    spec = load_mapping(path)
    line = next(n for n, t in enumerate(text.splitlines(), start=1) if "# <-" in t)
    with pytest.raises(MappingError) as info:
        check_types(spec, PRODUCT_TYPES, LISTING_TYPES)
    return info.value, line, path


def test_the_shop_mapping_fits_its_own_schemas() -> None:
    spec = load_mapping(SHOP / "mapping.toml")
    legacy = {n: t.columns for n, t in parse_ddl(SHOP / "legacy.sql", "shop").items()}
    commerce = {n: t.columns for n, t in parse_ddl(SHOP / "commerce.sql", "commerce").items()}
    check_types(spec, legacy, commerce)  # raises on any mismatch


def test_minor_units_on_text_names_file_line_table_column_and_fix(tmp_path: Path) -> None:
    error, line, path = _check(tmp_path, 'visible = { from = "status", minor_units = 2 }')
    assert error.path == str(path)
    assert error.line == line
    message = str(error)
    assert message.startswith(f"{path}:{line}: tables.products.columns.visible: ")
    assert "source column shop.products.status is text" in message
    assert "point `from` at a numeric column" in message
    assert error.exit_code == 2


@pytest.mark.parametrize(
    ("column_line", "expected"),
    [
        # the target side: what the transform yields does not fit the column
        ('price_minor = "price_idr"', "commerce.listings.price_minor is bigint; for money"),
        ('flag = "status"', "commerce.listings.flag is boolean"),
        ('visible = { from = "status", enum = { live = "LIVE" } }', "listings.visible is boolean"),
        # the source side: the transform cannot read the column
        ('title = { from = "price_idr", upper = true }', "shop.products.price_idr is numeric"),
        ('flag = { from = "is_new", equals = "yes" }', "shop.products.is_new is boolean"),
        ('flag = { from = "status", in = [1, 2] }', "shop.products.status is text"),
        ('title = { template = "{is_new}-{price_idr}" }', None),  # allowed: no error
    ],
)
def test_mismatches_on_either_side_are_refused(
    tmp_path: Path, column_line: str, expected: str | None
) -> None:
    if expected is None:
        path = tmp_path / "mapping.toml"
        path.write_text(HEAD + PRODUCTS + column_line + "\n")
        check_types(load_mapping(path), PRODUCT_TYPES, LISTING_TYPES)
        return
    error, line, _ = _check(tmp_path, column_line)
    assert error.line == line
    assert expected in str(error)


def test_delete_when_compares_with_the_column_type(tmp_path: Path) -> None:
    text = PRODUCTS.replace(
        'aggregate_key = "merchant_id"',
        'aggregate_key = "merchant_id"\ndelete_when = { column = "status", equals = 3 }  # <-',
    )
    path = tmp_path / "mapping.toml"
    path.write_text(HEAD + text)
    with pytest.raises(MappingError) as info:
        check_types(load_mapping(path), PRODUCT_TYPES, LISTING_TYPES)
    assert (
        info.value.line
        == (HEAD + text).splitlines().index('delete_when = { column = "status", equals = 3 }  # <-')
        + 1
    )
    assert "tables.products.delete_when: compares shop.products.status (text)" in str(info.value)


def test_missing_tables_and_columns_are_left_to_the_preflight() -> None:
    bad = 'visible = { from = "status", minor_units = 2 }\n'
    spec = parse_mapping(HEAD + USERS + PRODUCTS + bad)
    check_types(spec, {}, {})
    check_types(spec, {"products": {"id": "bigint"}}, {})


@pytest.mark.parametrize(
    ("pg", "family"),
    [
        ("numeric(12,2)", "numeric"),
        ("character varying", "text"),
        ("varchar(20)", "text"),
        ("timestamp with time zone", "time"),
        ("timestamptz", "time"),
        ("double precision", "float"),
        ("int8", "integer"),
        ("order_status", "other"),
        ("integer[]", "other"),
    ],
)
def test_type_families(pg: str, family: str) -> None:
    assert type_family(pg) == family


def test_assignable() -> None:
    assert assignable("integer", "numeric")
    assert assignable("text", "other") and assignable("other", "boolean")
    assert not assignable("numeric", "integer")
    assert not assignable("text", "integer")


# ---------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------


def test_the_shop_declares_its_invariants() -> None:
    spec: MappingSpec = load_mapping(SHOP / "mapping.toml")
    assert [(i.name, i.side, i.tables, i.domain) for i in spec.invariants] == [
        ("order_total", "target", ("orders", "order_lines"), "payment"),
        ("settled_payment_amount", "target", ("payments", "orders"), "payment"),
        ("invoice_link", "target", ("invoices",), "payment"),
    ]
    built = spec.invariants[2].build("commerce").as_string()
    assert 'FROM "commerce"."invoices"' in built
    assert built.endswith("ORDER BY 1 LIMIT 1000")


def test_the_shop_declares_its_domains() -> None:
    spec = load_mapping(SHOP / "mapping.toml")
    assert dict(spec.domains) == {"payment": 60, "data": 20, "merchant": 20}


INVARIANT = """
[invariants.check]
description = "a check"
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('tables = ["nope"]  # <-\nquery = "SELECT 1 FROM {nope}"', '"nope" is not a mapped'),
        ('tables = ["listings"]\nquery = "SELECT 1 FROM {other}"  # <-', "placeholder {other}"),
        ('tables = ["listings"]\nquery = "SELECT 1"  # <-', "never reads table listings"),
        ('side = "both"  # <-\ntables = ["listings"]\nquery = "x {listings}"', "not 'both'"),
        ('tables = ["listings"]\nquery = "{listings}"\nsides = 1', 'invariant key "sides"'),
        ('side = "source"\ntables = ["listings"]  # <-\nquery = "{listings}"', "mapped source"),
    ],
)
def test_invariant_errors(tmp_path: Path, body: str, expected: str) -> None:
    text = HEAD + PRODUCTS + INVARIANT + body + "\n"
    error, line, _ = mapping_error(tmp_path, text)
    assert expected in str(error)
    assert error.line == (line or error.line)


def test_a_source_invariant_uses_source_tables() -> None:
    spec = parse_mapping(
        HEAD + PRODUCTS + INVARIANT + 'side = "source"\ntables = ["products"]\n'
        'query = "SELECT id, title FROM {products} WHERE stock < 0"\n'
    )
    (inv,) = spec.invariants
    assert inv.domain == "payment"
    assert 'FROM "shop"."products"' in inv.build("shop").as_string()
