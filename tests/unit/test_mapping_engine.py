"""The transform engine: golden map_row outputs for the reference scenario, NULL / UNCHANGED
rules, poison values, keys, and the SQL that verify runs over the source tables."""

from __future__ import annotations

import contextlib
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from cutover.errors import MappingError, UnmappableRow
from cutover.mapping import (
    ColumnMapping,
    MappingSpec,
    Predicate,
    TableMapping,
    aggregate_key,
    is_delete,
    load_mapping,
    map_row,
    parse_mapping,
    predicate_sql,
    source_sql,
    target_key,
)
from cutover.values import UNCHANGED

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "shop"
T0 = datetime(2024, 3, 1, 8, 30, tzinfo=UTC)
T1 = datetime(2024, 3, 2, 9, 45, tzinfo=UTC)


@pytest.fixture(scope="module")
def spec() -> MappingSpec:
    return load_mapping(REPO / "examples" / "shop" / "mapping.toml")


def rows() -> dict[str, dict[str, object]]:
    """One decoded source row per reference table (as the decoder delivers them)."""
    return {
        "users": {
            "id": 7,
            "display_name": "Sari",
            "email": "sari@example.com",
            "phone": None,
            "created_at": T0,
            "updated_at": T1,
        },
        "merchants": {
            "id": 3,
            "owner_user_id": 7,
            "shop_name": "Toko Sari",
            "status": "suspended",
            "rating": Decimal("4.75"),
            "created_at": T0,
            "updated_at": T1,
        },
        "products": {
            "id": 11,
            "merchant_id": 3,
            "title": "Batik shirt",
            "description": "Hand-made. " * 400,
            "price_idr": Decimal("15000.50"),
            "stock": 4,
            "status": "live",
        },
        "orders": {
            "id": 123,
            "buyer_id": 7,
            "merchant_id": 3,
            "status": "paid",
            "total_idr": Decimal("30001.00"),
            "created_at": T0,
            "updated_at": T1,
        },
        "order_items": {
            "order_id": 123,
            "line_no": 1,
            "product_id": 11,
            "qty": 2,
            "unit_price_idr": Decimal("15000.50"),
        },
        "payments": {
            "id": 501,
            "order_id": 123,
            "method": "bank_transfer",
            "amount_idr": Decimal("30001.00"),
            "status": "settled",
            "provider_ref": "PRV-9",
            "paid_at": T1,
        },
        "invoices": {
            "id": 900,
            "order_id": 123,
            "invoice_no": "INV-000123",
            "issued_at": T1,
        },
    }


GOLDEN: dict[str, dict[str, object]] = {
    "users": {
        "customer_id": 7,
        "display_name": "Sari",
        "email": "sari@example.com",
        "phone": None,
        "created_at": T0,
        "updated_at": T1,
    },
    "merchants": {
        "seller_id": 3,
        "owner_customer_id": 7,
        "name": "Toko Sari",
        "state": "SUSPENDED",
        "rating": Decimal("4.75"),
        "created_at": T0,
        "updated_at": T1,
    },
    "products": {
        "listing_id": 11,
        "seller_id": 3,
        "title": "Batik shirt",
        "description": "Hand-made. " * 400,
        "price_minor": 1500050,
        "stock": 4,
        "visible": True,
    },
    "orders": {
        "order_id": 123,
        "customer_id": 7,
        "seller_id": 3,
        "state": "PAID",
        "total_minor": 3000100,
        "created_at": T0,
        "updated_at": T1,
    },
    "order_items": {
        "order_id": 123,
        "line_no": 1,
        "listing_id": 11,
        "quantity": 2,
        "unit_price_minor": 1500050,
    },
    "payments": {
        "payment_id": 501,
        "order_id": 123,
        "method": "BANK_TRANSFER",
        "amount_minor": 3000100,
        "state": "SETTLED",
        "provider_ref": "PRV-9",
        "paid_at": T1,
    },
    "invoices": {
        "invoice_id": 900,
        "order_id": 123,
        "invoice_no": "INV-000123",
        "link": "https://commerce.example/invoices/INV-000123",
        "issued_at": T1,
    },
}

KEYS: dict[str, tuple[tuple[object, ...], str]] = {
    "users": ((7,), "7"),
    "merchants": ((3,), "3"),
    "products": ((11,), "3"),
    "orders": ((123,), "123"),
    "order_items": ((123, 1), "123"),
    "payments": ((501,), "123"),
    "invoices": ((900,), "123"),
}


@pytest.mark.parametrize("table", list(GOLDEN))
def test_golden_rows(spec: MappingSpec, table: str) -> None:
    mapping = spec.tables[table]
    row = rows()[table]
    out = map_row(mapping, row)
    assert out == GOLDEN[table]
    assert list(out) == list(mapping.target_columns)  # file order
    assert not is_delete(mapping, row)
    assert target_key(mapping, row) == KEYS[table][0]
    assert aggregate_key(mapping, row) == KEYS[table][1]
    assert tuple(out[c] for c in mapping.target_key) == KEYS[table][0]


def test_excluded_columns_are_never_copied(spec: MappingSpec) -> None:
    row = {**rows()["users"], "handle": "@sari", "follower_count": 10, "bio": "hi"}
    out = map_row(spec.tables["users"], row)
    assert out == GOLDEN["users"]
    assert {"@sari", 10, "hi"}.isdisjoint(out.values())


def test_extra_source_columns_are_ignored(spec: MappingSpec) -> None:
    # e.g. ALTER TABLE ... ADD COLUMN mid-stream: the new column is not mapped.
    row = {**rows()["orders"], "coupon": "SALE"}
    assert map_row(spec.tables["orders"], row) == GOLDEN["orders"]


@pytest.mark.parametrize(
    ("status", "visible", "deleted"),
    [("live", True, False), ("hidden", False, False), ("deleted", False, True)],
)
def test_product_status(spec: MappingSpec, status: str, visible: bool, deleted: bool) -> None:
    products = spec.tables["products"]
    row = {**rows()["products"], "status": status}
    assert map_row(products, row)["visible"] is visible
    assert is_delete(products, row) is deleted


@pytest.mark.parametrize(
    ("table", "column", "source", "pairs"),
    [
        (
            "merchants",
            "state",
            "status",
            {"active": "ACTIVE", "suspended": "SUSPENDED", "closed": "CLOSED"},
        ),
        (
            "orders",
            "state",
            "status",
            {s: s.upper() for s in ("created", "paid", "shipped", "completed", "cancelled")},
        ),
        (
            "payments",
            "method",
            "method",
            {m: m.upper() for m in ("card", "ewallet", "bank_transfer", "cod")},
        ),
        (
            "payments",
            "state",
            "status",
            {s: s.upper() for s in ("pending", "settled", "failed", "refunded")},
        ),
    ],
)
def test_enum_upper_casing(
    spec: MappingSpec, table: str, column: str, source: str, pairs: dict[str, str]
) -> None:
    mapping = spec.tables[table]
    for value, expected in pairs.items():
        assert map_row(mapping, {**rows()[table], source: value})[column] == expected


def test_enum_unknown_value_is_unmappable(spec: MappingSpec) -> None:
    with pytest.raises(UnmappableRow) as info:
        map_row(spec.tables["payments"], {**rows()["payments"], "method": "crypto"})
    error = info.value
    assert (error.table, error.column) == ("payments", "method")
    assert "'crypto'" in error.problem
    assert "'card', 'ewallet', 'bank_transfer', 'cod'" in error.problem
    # Upper-case input is not silently accepted either: the table is exact.
    with pytest.raises(UnmappableRow):
        map_row(spec.tables["payments"], {**rows()["payments"], "method": "CARD"})


# ---------------------------------------------------------------------------------------------
# UNCHANGED (unchanged TOAST) and NULL
# ---------------------------------------------------------------------------------------------


def test_unchanged_description_is_omitted(spec: MappingSpec) -> None:
    products = spec.tables["products"]
    out = map_row(products, {**rows()["products"], "description": UNCHANGED})
    expected = dict(GOLDEN["products"])
    del expected["description"]
    assert out == expected
    assert "description" not in out


def test_unchanged_is_omitted_for_every_transform(spec: MappingSpec) -> None:
    cases = [
        ("products", "status", "visible"),
        ("products", "price_idr", "price_minor"),
        ("merchants", "status", "state"),
        ("invoices", "invoice_no", "link"),
    ]
    for table, source, target in cases:
        out = map_row(spec.tables[table], {**rows()[table], source: UNCHANGED})
        assert target not in out, (table, target)
    assert not is_delete(spec.tables["products"], {**rows()["products"], "status": UNCHANGED})


def test_null_rules(spec: MappingSpec) -> None:
    products = spec.tables["products"]
    out = map_row(products, {**rows()["products"], "price_idr": None, "status": None})
    assert out["price_minor"] is None
    assert out["visible"] is False  # a predicate on NULL is false, like COALESCE(col = x, false)
    assert not is_delete(products, {**rows()["products"], "status": None})
    assert (
        map_row(spec.tables["merchants"], {**rows()["merchants"], "status": None})["state"] is None
    )
    assert (
        map_row(spec.tables["invoices"], {**rows()["invoices"], "invoice_no": None})["link"] is None
    )
    assert (
        map_row(spec.tables["payments"], rows()["payments"] | {"paid_at": None})["paid_at"] is None
    )


# ---------------------------------------------------------------------------------------------
# minor_units: exact decimals only
# ---------------------------------------------------------------------------------------------


def _money(places: int = 2) -> TableMapping:
    return TableMapping(
        source_table="t",
        target_table="t2",
        domain="d",
        aggregate_key="id",
        primary_key=("id",),
        target_key=("id",),
        columns=(
            ColumnMapping("id", "copy", source="id"),
            ColumnMapping("m", "minor_units", source="v", minor_units=places),
        ),
    )


@pytest.mark.parametrize(
    ("value", "places", "expected"),
    [
        (Decimal("15000.50"), 2, 1500050),
        (Decimal("15000.5"), 2, 1500050),
        (Decimal("0.01"), 2, 1),
        (Decimal("-12.34"), 2, -1234),
        (Decimal("0"), 2, 0),
        (Decimal("-0.00"), 2, 0),
        (Decimal("1E+3"), 2, 100000),
        (Decimal("1.5000"), 2, 150),
        (Decimal("999999999999.99"), 2, 99999999999999),
        (Decimal("9223372036854775807"), 0, 2**63 - 1),
        (Decimal("92233720368547758.07"), 2, 2**63 - 1),
        (Decimal("0.000001"), 6, 1),
        (15000, 2, 1500000),
        (-3, 0, -3),
        (
            Decimal("12345678901234567890123456789.01") - Decimal("12345678901234567890123456780"),
            2,
            901,
        ),
    ],
)
def test_minor_units_exact(value: object, places: int, expected: int) -> None:
    out = map_row(_money(places), {"id": 1, "v": value})["m"]
    assert out == expected
    assert type(out) is int


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (Decimal("1.005"), "more than 2 decimal places"),
        (Decimal("0.001"), "more than 2 decimal places"),
        (1.5, "exact number"),
        (1.0, "exact number"),
        (True, "exact number"),
        ("15000.50", "exact number"),
        (Decimal("NaN"), "not a finite number"),
        (Decimal("Infinity"), "not a finite number"),
        (Decimal("92233720368547758.08"), "does not fit in bigint"),
        (Decimal("1E+30"), "does not fit in bigint"),
        (2**62, "does not fit in bigint"),
    ],
)
def test_minor_units_unmappable(value: object, problem: str) -> None:
    with pytest.raises(UnmappableRow) as info:
        map_row(_money(2), {"id": 1, "v": value})
    assert info.value.column == "m"
    assert problem in info.value.problem


def test_minor_units_with_a_precise_decimal_context() -> None:
    # 30 significant digits: the default 28-digit context would round; the engine does not.
    value = Decimal("1234567890123456.78") + Decimal("0.000000000001")
    with pytest.raises(UnmappableRow, match="more than 2 decimal places"):
        map_row(_money(2), {"id": 1, "v": value})


# ---------------------------------------------------------------------------------------------
# Other transforms and keys
# ---------------------------------------------------------------------------------------------


def _table(*columns: ColumnMapping, delete_when: Predicate | None = None) -> TableMapping:
    return TableMapping(
        source_table="src",
        target_table="dst",
        domain="d",
        aggregate_key="k",
        primary_key=("a", "b"),
        target_key=("x", "y"),
        columns=(
            ColumnMapping("x", "copy", source="a"),
            ColumnMapping("y", "copy", source="b"),
            *columns,
        ),
        delete_when=delete_when,
    )


def test_upper_transform() -> None:
    table = _table(ColumnMapping("s", "upper", source="st"))
    assert map_row(table, {"a": 1, "b": 2, "st": "active"}) == {"x": 1, "y": 2, "s": "ACTIVE"}
    assert map_row(table, {"a": 1, "b": 2, "st": None})["s"] is None
    assert "s" not in map_row(table, {"a": 1, "b": 2, "st": UNCHANGED})
    with pytest.raises(UnmappableRow, match="upper needs text"):
        map_row(table, {"a": 1, "b": 2, "st": 5})


def test_predicate_in() -> None:
    table = _table(
        ColumnMapping("open", "predicate", source="st", values=("a", "b")),
        delete_when=Predicate("st", ("gone", "purged")),
    )
    assert map_row(table, {"a": 1, "b": 2, "st": "b"})["open"] is True
    assert map_row(table, {"a": 1, "b": 2, "st": "c"})["open"] is False
    assert is_delete(table, {"a": 1, "b": 2, "st": "purged"})
    assert not is_delete(table, {"a": 1, "b": 2, "st": "b"})


def test_template_values() -> None:
    table = _table(ColumnMapping("t", "template", template="{a}/{b}-{c}:{{literal}}"))
    render = {"a": 1, "b": "x", "c": Decimal("0.0000001")}
    assert map_row(table, render)["t"] == "1/x-0.0000001:{literal}"
    assert map_row(table, {**render, "c": True})["t"] == "1/x-true:{literal}"
    assert map_row(table, {**render, "c": None})["t"] is None
    assert "t" not in map_row(table, {**render, "c": UNCHANGED})
    with pytest.raises(UnmappableRow, match="template or key takes text"):
        map_row(table, {**render, "c": date(2024, 1, 1)})


def test_keys() -> None:
    table = _table()
    row = {"a": 5, "b": "L1", "k": 77}
    assert target_key(table, row) == (5, "L1")
    assert aggregate_key(table, row) == "77"
    assert aggregate_key(table, {**row, "k": Decimal("77")}) == "77"
    with pytest.raises(UnmappableRow, match="primary key column b has no value"):
        target_key(table, {"a": 5, "b": None})
    with pytest.raises(UnmappableRow, match="primary key"):
        target_key(table, {"a": 5})
    with pytest.raises(UnmappableRow, match="aggregate key column k has no value"):
        aggregate_key(table, {**row, "k": UNCHANGED})
    with pytest.raises(UnmappableRow, match="aggregate key"):
        aggregate_key(table, {"a": 5, "b": 1})


def test_delete_key_only_row(spec: MappingSpec) -> None:
    # A delete event carries only the replica-identity (primary key) columns.
    assert target_key(spec.tables["order_items"], {"order_id": 123, "line_no": 2}) == (123, 2)


def test_missing_source_column_is_unmappable(spec: MappingSpec) -> None:
    row = dict(rows()["products"])
    del row["price_idr"]
    with pytest.raises(UnmappableRow) as info:
        map_row(spec.tables["products"], row)
    assert (info.value.table, info.value.column) == ("products", "price_minor")
    assert "price_idr" in info.value.problem and "missing" in info.value.problem
    row = dict(rows()["products"])
    del row["status"]
    with pytest.raises(UnmappableRow, match="delete_when"):
        is_delete(spec.tables["products"], row)
    table = _table(ColumnMapping("t", "template", template="{a}/{c}"))
    with pytest.raises(UnmappableRow, match=r"c \(template placeholder\) is missing") as info:
        map_row(table, {"a": 1, "b": 2})
    assert info.value.column == "t"


class _Weird:
    pass


WEIRD: list[object] = [
    None,
    UNCHANGED,
    "",
    "x",
    -1,
    True,
    1.5,
    float("nan"),
    b"\x00",
    [],
    {},
    _Weird(),
    Decimal("NaN"),
    Decimal("sNaN"),
    Decimal("-Infinity"),
    Decimal("1E+999999"),
    10**40,
    date(2024, 1, 1),
    T0,
]


def test_bad_data_raises_only_unmappable_row(spec: MappingSpec) -> None:
    for name, base in rows().items():
        mapping = spec.tables[name]
        for column in base:
            for value in WEIRD:
                row = {**base, column: value}
                for call in (map_row, is_delete, target_key, aggregate_key):
                    with contextlib.suppress(UnmappableRow):
                        call(mapping, row)


# ---------------------------------------------------------------------------------------------
# SQL over the source table (for verify)
# ---------------------------------------------------------------------------------------------


def _sql(spec: MappingSpec, table: str, column: str, qualifier: str | None = None) -> str:
    return source_sql(spec.tables[table].column(column), qualifier=qualifier).as_string(None)


def test_source_sql_renders(spec: MappingSpec) -> None:
    assert _sql(spec, "users", "customer_id") == '"id"'
    assert _sql(spec, "users", "customer_id", "s") == '"s"."id"'
    assert _sql(spec, "products", "price_minor") == '("price_idr" * 100)::bigint'
    assert _sql(spec, "products", "visible", "p") == 'COALESCE("p"."status" = \'live\', false)'
    assert _sql(spec, "merchants", "state") == (
        "(CASE \"status\" WHEN 'active' THEN 'ACTIVE' WHEN 'suspended' THEN 'SUSPENDED' "
        "WHEN 'closed' THEN 'CLOSED' END)"
    )
    assert _sql(spec, "invoices", "link") == (
        "('https://commerce.example/invoices/' || (\"invoice_no\")::text)"
    )


def test_source_sql_other_kinds() -> None:
    def render(column: ColumnMapping) -> str:
        return source_sql(column).as_string(None)

    assert render(ColumnMapping("s", "upper", source="st")) == 'upper("st")'
    assert render(ColumnMapping("m", "minor_units", source="v", minor_units=0)) == '("v")::bigint'
    assert (
        render(ColumnMapping("b", "predicate", source="st", values=("a", "b")))
        == "COALESCE(\"st\" IN ('a', 'b'), false)"
    )
    assert render(ColumnMapping("b", "predicate", source="n", values=(3,))) == (
        'COALESCE("n" = 3, false)'
    )
    assert render(ColumnMapping("t", "template", template="{a}-{b}")) == (
        '(("a")::text || \'-\' || ("b")::text)'
    )
    assert render(ColumnMapping("t", "template", template="it's {a}")) == (
        "('it''s ' || (\"a\")::text)"
    )
    assert render(ColumnMapping("t", "template", template="const")) == "'const'"
    assert render(ColumnMapping("t", "template", template="")) == "''"
    assert render(ColumnMapping("w", "copy", source='we"ird')) == '"we""ird"'


def test_predicate_sql(spec: MappingSpec) -> None:
    delete_when = spec.tables["products"].delete_when
    assert delete_when is not None
    assert predicate_sql(delete_when, qualifier="p").as_string(None) == (
        'COALESCE("p"."status" = \'deleted\', false)'
    )


def test_a_sensitive_columns_value_is_redacted_from_the_reason_keys_stay() -> None:
    text = (EXAMPLES / "mapping.toml").read_text()
    text = text.replace('sensitive = ["provider_ref"]', 'sensitive = ["provider_ref", "method"]')
    spec = parse_mapping(text, "mapping.toml")
    assert spec.tables["payments"].sensitive == frozenset({"provider_ref", "method"})
    row = {"id": 7, "order_id": 3, "method": "crypto-secret", "amount_idr": Decimal("1.00"),
           "status": "pending", "provider_ref": "ref", "paid_at": None}  # fmt: skip
    with pytest.raises(UnmappableRow) as caught:
        map_row(spec.tables["payments"], row)
    assert "crypto-secret" in caught.value.message  # raw error: for the code, not for letters
    letter = caught.value.redacted(spec.tables["payments"].sensitive)
    assert "crypto-secret" not in letter.message
    assert "<redacted>" in letter.message and "payments.method" in letter.message
    # A column that is not sensitive keeps its value in the reason.
    assert caught.value.redacted(frozenset({"provider_ref"})).message == caught.value.message


def test_sensitive_must_name_mapped_columns() -> None:
    text = (EXAMPLES / "mapping.toml").read_text()
    bad = text.replace('sensitive = ["provider_ref"]', 'sensitive = ["nope"]')
    with pytest.raises(MappingError, match='"nope" is not read by any mapped column'):
        parse_mapping(bad, "mapping.toml")
    social = text.replace('sensitive = ["display_name", "email", "phone"]', 'sensitive = ["bio"]')
    with pytest.raises(MappingError, match="excluded"):
        parse_mapping(social, "mapping.toml")
