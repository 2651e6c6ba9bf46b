"""The mapping file: the shipped reference mapping against both schemas, and every validation error.

Validation cases are small TOML snippets; the line an error must name is marked in the snippet
with a ``# <-`` comment, so the expected line number is never counted by hand.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from cutover.errors import ConfigError, MappingError
from cutover.mapping import (
    BOOKKEEPING_COLUMNS,
    ColumnMapping,
    MappingSpec,
    Predicate,
    ReverseRule,
    load_mapping,
    parse_mapping,
)

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
_KEYWORDS = {"PRIMARY", "CONSTRAINT", "CHECK", "UNIQUE", "FOREIGN", "EXCLUDE"}
_CREATE = re.compile(
    r"CREATE TABLE IF NOT EXISTS (?P<schema>\w+)\.(?P<table>\w+) \((?P<body>.*?)\n\);", re.DOTALL
)


class Table:
    """A CREATE TABLE statement, parsed just enough for these tests."""

    def __init__(self, body: str) -> None:
        self.columns: dict[str, str] = {}
        self.primary_key: tuple[str, ...] = ()
        for raw in body.splitlines():
            line = raw.strip()
            found = re.match(r"^([a-z_][a-z0-9_]*)\s+([a-z]+(?:\(\d+,\d+\))?)", line)
            if found and found.group(1).upper() not in _KEYWORDS:
                self.columns[found.group(1)] = found.group(2)
                if "PRIMARY KEY" in line:
                    self.primary_key = (found.group(1),)
            composite = re.match(r"^PRIMARY KEY \(([^)]*)\)", line)
            if composite:
                self.primary_key = tuple(c.strip() for c in composite.group(1).split(","))
        self.checks: dict[str, tuple[str, ...]] = {
            m.group(1): tuple(re.findall(r"'([^']*)'", m.group(2)))
            for m in re.finditer(r"CHECK\s*\((\w+) IN \(([^)]*)\)\)", body)
        }


def parse_ddl(path: Path, schema: str) -> dict[str, Table]:
    tables = {m["table"]: Table(m["body"]) for m in _CREATE.finditer(path.read_text())}
    assert all(m["schema"] == schema for m in _CREATE.finditer(path.read_text()))
    assert tables, f"no CREATE TABLE found in {path}"
    return tables


@pytest.fixture(scope="module")
def spec() -> MappingSpec:
    return load_mapping(SHOP / "mapping.toml")


@pytest.fixture(scope="module")
def legacy() -> dict[str, Table]:
    return parse_ddl(SHOP / "legacy.sql", "shop")


@pytest.fixture(scope="module")
def commerce() -> dict[str, Table]:
    return parse_ddl(SHOP / "commerce.sql", "commerce")


# ---------------------------------------------------------------------------------------------
# The shipped reference mapping
# ---------------------------------------------------------------------------------------------


def test_reference_mapping_loads(spec: MappingSpec) -> None:
    assert spec.source_schema == "shop"
    assert spec.target_schema == "commerce"
    assert dict(spec.domains) == {"payment": 60, "data": 20, "merchant": 20}
    assert {name: t.target_table for name, t in spec.tables.items()} == {
        "users": "customers",
        "merchants": "sellers",
        "products": "listings",
        "orders": "orders",
        "order_items": "order_lines",
        "payments": "payments",
        "invoices": "invoices",
    }


def test_domains_and_aggregate_keys_follow_design(spec: MappingSpec) -> None:
    assert [t.source_table for t in spec.tables_of("payment")] == [
        "orders",
        "order_items",
        "payments",
        "invoices",
    ]
    assert [t.source_table for t in spec.tables_of("data")] == ["users"]
    assert [t.source_table for t in spec.tables_of("merchant")] == ["merchants", "products"]
    assert {name: t.aggregate_key for name, t in spec.tables.items()} == {
        "users": "id",
        "merchants": "id",
        "products": "merchant_id",
        "orders": "id",
        "order_items": "order_id",
        "payments": "order_id",
        "invoices": "order_id",
    }
    with pytest.raises(KeyError):
        spec.tables_of("social")


def test_by_target(spec: MappingSpec) -> None:
    assert spec.by_target("order_lines").source_table == "order_items"
    assert spec.by_target("customers") is spec.tables["users"]
    with pytest.raises(KeyError, match="nope"):
        spec.by_target("nope")


def test_every_legacy_column_is_used_or_excluded(
    spec: MappingSpec, legacy: dict[str, Table]
) -> None:
    assert set(spec.tables) == set(legacy)
    for name, table in legacy.items():
        mapping = spec.tables[name]
        used = mapping.source_columns_used()
        assert not used & mapping.exclude, name
        assert used | mapping.exclude == set(table.columns), name
        assert set(mapping.primary_key) == set(table.primary_key), name
        assert mapping.primary_key == table.primary_key, name


def test_social_columns_are_exactly_excluded(spec: MappingSpec) -> None:
    assert spec.tables["users"].exclude == {"handle", "follower_count", "bio"}
    # The other exclusions are columns commerce does not hold (not social data).
    assert spec.tables["products"].exclude == {"updated_at"}
    assert spec.tables["invoices"].exclude == {"url"}
    assert {name for name, t in spec.tables.items() if t.exclude} == {
        "users",
        "products",
        "invoices",
    }


def test_every_commerce_column_is_produced(spec: MappingSpec, commerce: dict[str, Table]) -> None:
    assert {t.target_table for t in spec.tables.values()} == set(commerce)
    for name, table in commerce.items():
        mapping = spec.by_target(name)
        expected = [c for c in table.columns if c not in BOOKKEEPING_COLUMNS]
        assert list(mapping.target_columns) == expected, name
        assert set(BOOKKEEPING_COLUMNS) <= set(table.columns), name
        assert table.columns["_src_lsn"] == "bigint"
        assert table.columns["_src_seq"] == "bigint"


def test_target_key_is_the_commerce_primary_key(
    spec: MappingSpec, commerce: dict[str, Table]
) -> None:
    for name, table in commerce.items():
        assert spec.by_target(name).target_key == table.primary_key, name
    assert spec.tables["order_items"].target_key == ("order_id", "line_no")


def test_column_types_fit_the_transforms(spec: MappingSpec, commerce: dict[str, Table]) -> None:
    for mapping in spec.tables.values():
        types = commerce[mapping.target_table].columns
        for column in mapping.columns:
            if column.kind == "minor_units":
                assert column.target.endswith("_minor")
                assert types[column.target] == "bigint"
                assert column.minor_units == 2
            if column.target.endswith("_minor"):
                assert column.kind == "minor_units"
            if column.kind == "predicate":
                assert types[column.target] == "boolean"
            if column.kind in ("enum", "template", "upper"):
                assert types[column.target] == "text"


def test_enums_match_both_check_constraints(
    spec: MappingSpec, legacy: dict[str, Table], commerce: dict[str, Table]
) -> None:
    seen = 0
    for mapping in spec.tables.values():
        for column in mapping.columns:
            if column.kind != "enum":
                continue
            seen += 1
            assert column.source is not None
            keys = tuple(k for k, _ in column.enum)
            values = tuple(v for _, v in column.enum)
            assert keys == legacy[mapping.source_table].checks[column.source]
            assert values == commerce[mapping.target_table].checks[column.target]
            assert values == tuple(k.upper() for k in keys)
    assert seen == 4  # sellers.state, orders.state, payments.method, payments.state


def test_reference_mapping_has_the_design_transforms(spec: MappingSpec) -> None:
    products = spec.tables["products"]
    assert products.delete_when == Predicate("status", ("deleted",))
    assert products.column("visible") == ColumnMapping(
        "visible",
        "predicate",
        source="status",
        values=("live",),
        reverse=ReverseRule(pairs=((True, "live"), (False, "hidden"))),
    )
    assert products.column("price_minor") == ColumnMapping(
        "price_minor", "minor_units", source="price_idr", minor_units=2
    )
    link = spec.tables["invoices"].column("link")
    assert link.kind == "template"
    assert link.template == "https://commerce.example/invoices/{invoice_no}"
    assert link.source_columns() == ("invoice_no",)
    with pytest.raises(KeyError):
        products.column("updated_at")


def test_mapping_error_is_a_config_error() -> None:
    assert issubclass(MappingError, ConfigError)
    assert MappingError.exit_code == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="not found") as info:
        load_mapping(tmp_path / "absent.toml")
    assert info.value.line is None


# ---------------------------------------------------------------------------------------------
# Validation errors: each names the line, the key, the problem and the fix
# ---------------------------------------------------------------------------------------------

HEAD = """\
version = 1
source_schema = "shop"
target_schema = "commerce"

[domains.payment]
weight = 60
[domains.data]
weight = 40
"""

USERS = """\
[tables.users]
domain = "data"
target = "customers"
primary_key = ["id"]
aggregate_key = "id"
exclude = ["bio"]

[tables.users.columns]
customer_id = "id"
display_name = "display_name"
"""

PRODUCTS = """\
[tables.products]
domain = "payment"
target = "listings"
primary_key = ["id"]
aggregate_key = "merchant_id"

[tables.products.columns]
listing_id = "id"
"""


def mapping_error(tmp_path: Path, text: str) -> tuple[MappingError, int | None, Path]:
    """Load ``text`` as mapping.toml; return the error and the line marked ``# <-`` (if any)."""
    text = textwrap.dedent(text)
    marked = [n for n, line in enumerate(text.splitlines(), start=1) if "# <-" in line]
    assert len(marked) <= 1
    path = tmp_path / "mapping.toml"
    path.write_text(text)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    return info.value, (marked[0] if marked else None), path


def test_the_valid_snippets_load() -> None:
    spec = parse_mapping(HEAD + USERS + PRODUCTS)
    assert spec.tables["users"].exclude == {"bio"}


def test_unknown_transform_key_message_is_exact(tmp_path: Path) -> None:
    error, line, path = mapping_error(
        tmp_path,
        HEAD
        + PRODUCTS
        + 'price_minor = { from = "price_idr", minor_unit = 2 }  # <- typo\n'
        + 'title = "title"\n',
    )
    assert error.line == line
    assert str(error) == (
        f'{path}:{line}: tables.products.columns.price_minor: unknown transform key "minor_unit";'
        ' did you mean "minor_units"? (known: from, enum, minor_units, equals, in, template, upper,'
        " reverse)"
    )
    assert error.path == str(path)


INVALID: list[tuple[str, str, list[str]]] = [
    (
        "invalid-toml",
        HEAD + "[tables.users]\ndomain = \n",
        ["invalid TOML"],
    ),
    (
        "invalid-toml-marked",
        HEAD + USERS + "phone = phone  # <- bare word\n",
        ["invalid TOML", "Invalid value"],
    ),
    (
        "duplicate-target-column-is-a-toml-error",
        HEAD + USERS + 'display_name = "handle"  # <- second time\n',
        ["invalid TOML", "overwrite"],
    ),
    (
        "version",
        'version = 2  # <-\nsource_schema = "shop"\n' + HEAD.split("\n", 2)[2] + USERS,
        ["version:", "unsupported version 2", "version = 1"],
    ),
    (
        "version-float",
        'version = 1.0  # <-\nsource_schema = "shop"\n' + HEAD.split("\n", 2)[2] + USERS,
        ["unsupported version 1.0"],
    ),
    (
        "missing-version",
        HEAD.split("\n", 1)[1] + USERS,
        ['missing required key "version"', "add `version = 1`"],
    ),
    (
        "unknown-top-level-key",
        'taget_schema = "x"  # <-\n' + HEAD + USERS,
        ['unknown top-level key "taget_schema"', 'did you mean "target_schema"?', "known: version"],
    ),
    (
        "unknown-table-key",
        HEAD + USERS.replace('aggregate_key = "id"', 'agregate_key = "id"  # <-'),
        [
            "tables.users: unknown table key",
            '"agregate_key"',
            'did you mean "aggregate_key"?',
        ],
    ),
    (
        "unknown-domain-key",
        HEAD.replace("weight = 40", "weigth = 40  # <-") + USERS,
        ['domains.data: unknown domain key "weigth"', 'did you mean "weight"?'],
    ),
    (
        "unknown-domain",
        HEAD + USERS.replace('domain = "data"', 'domain = "dta"  # <-'),
        ['tables.users.domain: unknown domain "dta"', 'did you mean "data"?', "payment, data"],
    ),
    (
        "weights-sum",
        HEAD.replace("[domains.payment]", "[domains.payment]  # <- first domain").replace(
            "weight = 40", "weight = 30"
        )
        + USERS,
        ["domains: weights add up to 90", "payment=60, data=30", "must add up to 100"],
    ),
    (
        "weight-type",
        HEAD.replace("weight = 40", "weight = 40.0  # <-") + USERS,
        ["domains.data.weight: must be an integer from 0 to 100"],
    ),
    (
        "excluded-and-used",
        HEAD + USERS + 'about = "bio"  # <- bio is excluded\n',
        [
            "tables.users.columns.about:",
            'column "bio" is excluded',
            "remove it from exclude or stop using it",
        ],
    ),
    (
        "excluded-and-used-in-transform",
        HEAD + USERS + 'about = { from = "bio", upper = true }  # <-\n',
        ['column "bio" is excluded', "a source of about"],
    ),
    (
        "template-placeholder-excluded",
        HEAD + USERS + 'link = { template = "https://x.example/{id}/{bio}" }  # <-\n',
        ["tables.users.columns.link:", 'column "bio" is excluded'],
    ),
    (
        "template-placeholder-not-a-column",
        HEAD + USERS + 'link = { template = "https://x.example/{user.id}" }  # <-\n',
        ["tables.users.columns.link.template:", "must name one source column"],
    ),
    (
        "template-format-spec",
        HEAD + USERS + 'link = { template = "{id:08d}" }  # <-\n',
        ["takes no format spec"],
    ),
    (
        "template-unbalanced",
        HEAD + USERS + 'link = { template = "https://x.example/{id" }  # <-\n',
        ["is not a valid template", "{{ and }}"],
    ),
    (
        "template-with-from",
        HEAD + USERS + 'link = { from = "id", template = "x/{id}" }  # <-\n',
        ["tables.users.columns.link.from:", "remove `from`"],
    ),
    (
        "aggregate-key-excluded",
        HEAD + USERS.replace('aggregate_key = "id"', 'aggregate_key = "bio"  # <-'),
        ["tables.users.aggregate_key:", 'column "bio" is excluded', "aggregate key"],
    ),
    (
        "primary-key-excluded",
        HEAD
        + USERS.replace('exclude = ["bio"]', 'exclude = ["bio", "id"]').replace(
            'primary_key = ["id"]', 'primary_key = ["id"]  # <-'
        ),
        ["tables.users.primary_key:", 'column "id" is excluded', "primary key"],
    ),
    (
        "primary-key-not-renamed",
        HEAD
        + USERS.replace('primary_key = ["id"]', 'primary_key = ["id", "handle"]  # <-')
        + 'nick = { from = "handle", upper = true }\n',
        ['primary key column "handle" must be mapped by a plain rename', 'handle = "handle"'],
    ),
    (
        "primary-key-missing",
        HEAD
        + USERS.replace('primary_key = ["id"]\n', "").replace(
            "[tables.users]\n", "[tables.users]  # <- section\n"
        ),
        ['tables.users.primary_key: missing required key "primary_key"', 'primary_key = ["id"]'],
    ),
    (
        "target-columns-differ-by-case",
        HEAD + USERS + 'Display_Name = "email"  # <-\n',
        ['"Display_Name" differs from "display_name" only by case', "must be unique"],
    ),
    (
        "bookkeeping-column",
        HEAD + USERS + '_src_lsn = "id"  # <-\n',
        ["bookkeeping column the tool writes itself"],
    ),
    (
        "minor-units-range",
        HEAD + PRODUCTS + 'price_minor = { from = "price_idr", minor_units = 7 }  # <-\n',
        ["tables.products.columns.price_minor.minor_units:", "integer from 0 to 6", "not 7"],
    ),
    (
        "minor-units-type",
        HEAD + PRODUCTS + 'price_minor = { from = "price_idr", minor_units = "2" }  # <-\n',
        ["integer from 0 to 6", "not '2'"],
    ),
    (
        "enum-empty",
        HEAD + PRODUCTS + 'state = { from = "status", enum = {} }  # <-\n',
        ["tables.products.columns.state.enum:", "non-empty table"],
    ),
    (
        "enum-non-string-value",
        HEAD + PRODUCTS + 'state = { from = "status", enum = { live = 1 } }  # <-\n',
        ['maps "live" to int 1', "enum values must be strings"],
    ),
    (
        "two-transforms",
        HEAD + PRODUCTS + 'state = { from = "status", enum = { a = "A" }, upper = true }  # <-\n',
        ["tables.products.columns.state.upper:", "one transform per column", "enum and upper"],
    ),
    (
        "upper-false",
        HEAD + PRODUCTS + 'state = { from = "status", upper = false }  # <-\n',
        ["takes `upper = true` only"],
    ),
    (
        "missing-from",
        HEAD + PRODUCTS + "state = { upper = true }  # <-\n",
        ['tables.products.columns.state.from: missing required key "from"'],
    ),
    (
        "column-entry-type",
        HEAD + PRODUCTS + "stock = 3  # <-\n",
        ["tables.products.columns.stock: must be a source column name or an inline table"],
    ),
    (
        "in-empty",
        HEAD + PRODUCTS + 'visible = { from = "status", in = [] }  # <-\n',
        ["tables.products.columns.visible.in:", "non-empty array"],
    ),
    (
        "equals-float",
        HEAD + PRODUCTS + 'cheap = { from = "price_idr", equals = 1.5 }  # <-\n',
        ["tables.products.columns.cheap.equals:", "strings, integers or booleans"],
    ),
    (
        "delete-when-two-ops",
        HEAD
        + PRODUCTS.replace(
            'aggregate_key = "merchant_id"',
            'aggregate_key = "merchant_id"\n'
            'delete_when = { column = "status", equals = "x", in = ["y"] }  # <-',
        ),
        ["tables.products.delete_when:", "exactly one of `equals = VALUE` or `in = [VALUES]`"],
    ),
    (
        "delete-when-unknown-key",
        HEAD
        + PRODUCTS.replace(
            'aggregate_key = "merchant_id"',
            'aggregate_key = "merchant_id"\ndelete_when = { col = "status", equals = "x" }  # <-',
        ),
        ['unknown delete_when key "col"', 'did you mean "column"?'],
    ),
    (
        "delete-when-excluded",
        HEAD
        + PRODUCTS.replace(
            'aggregate_key = "merchant_id"',
            'aggregate_key = "merchant_id"\nexclude = ["status"]\n'
            'delete_when = { column = "status", equals = "deleted" }  # <-',
        ),
        ['column "status" is excluded', "delete_when column"],
    ),
    (
        "two-sources-one-target",
        HEAD + USERS + PRODUCTS.replace('target = "listings"', 'target = "customers"  # <-'),
        [
            'tables.products.target: target table "customers" is already the target of '
            "tables.users",
        ],
    ),
    (
        "exclude-duplicate",
        HEAD + USERS.replace('exclude = ["bio"]', 'exclude = ["bio", "bio"]  # <-'),
        ['tables.users.exclude: lists "bio" twice'],
    ),
    (
        "columns-missing",
        HEAD
        + USERS.split("\n\n", maxsplit=1)[0].replace("[tables.users]", "[tables.users]  # <-")
        + "\n",
        ['tables.users.columns: missing required key "columns"', "[tables.users.columns]"],
    ),
    (
        "no-tables",
        HEAD,  # a missing top-level key has no line to point at
        ['tables: missing required key "tables"', "add one [tables.NAME] section"],
    ),
    (
        "quoted-target-column",
        HEAD + PRODUCTS + '"unit price" = { from = "price_idr", minor_units = 9 }  # <-\n',
        ['tables.products.columns."unit price".minor_units:', "integer from 0 to 6"],
    ),
    (
        "dotted-key-in-table-section",
        HEAD
        + PRODUCTS.replace(
            '\n[tables.products.columns]\nlisting_id = "id"\n',
            'columns.listing_id = "id"\n'
            'columns.price_minor = { from = "price_idr", minor_units = -1 }  # <-\n',
        ),
        ["tables.products.columns.price_minor.minor_units:", "not -1"],
    ),
]


@pytest.mark.parametrize(
    ("text", "needles"), [(t, n) for _, t, n in INVALID], ids=[case[0] for case in INVALID]
)
def test_validation_errors(tmp_path: Path, text: str, needles: list[str]) -> None:
    error, line, path = mapping_error(tmp_path, text)
    if "invalid TOML" in needles[0] and line is None:
        assert error.line is not None  # from the TOMLDecodeError, whatever it is
    else:
        assert error.line == line, str(error)
    where = f"{path}:{error.line}" if error.line is not None else str(path)
    assert str(error).startswith(f"{where}: "), str(error)
    for needle in needles:
        assert needle in error.problem, (needle, str(error))


def test_invalid_toml_line_comes_from_the_parser(tmp_path: Path) -> None:
    text = HEAD + "[tables.users]\ndomain = \n"
    error, _, _ = mapping_error(tmp_path, text)
    assert error.line == text.count("\n")
    assert "(at line" not in error.problem


def test_errors_report_the_first_problem_in_file_order(tmp_path: Path) -> None:
    text = HEAD + USERS.replace('domain = "data"', 'domain = "nope"  # <-') + PRODUCTS
    error, line, _ = mapping_error(tmp_path, text)
    assert error.line == line


def test_the_documented_example_is_valid() -> None:
    doc = (REPO / "docs" / "MAPPING.md").read_text()
    example = re.search(r"## A small example\n\n```toml\n(.*?)```", doc, re.DOTALL)
    assert example is not None
    spec = parse_mapping(example.group(1), "MAPPING.md")
    assert spec.tables["products"].target_key == ("listing_id",)
    assert spec.tables["users"].exclude == {"handle", "follower_count", "bio"}


def test_documented_error_messages_match_the_code(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "MAPPING.md").read_text()
    error, _, _ = mapping_error(
        tmp_path, HEAD + PRODUCTS + 'price_minor = { from = "price_idr", minor_unit = 2 }\n'
    )
    assert error.problem in doc


def test_on_truncate_defaults_to_apply_and_accepts_stop() -> None:
    spec = parse_mapping(HEAD + USERS + PRODUCTS)
    assert spec.tables["users"].on_truncate == "apply"
    stop = USERS.replace('exclude = ["bio"]\n', 'exclude = ["bio"]\non_truncate = "stop"\n')
    assert parse_mapping(HEAD + stop + PRODUCTS).tables["users"].on_truncate == "stop"


def test_on_truncate_names_the_policies(tmp_path: Path) -> None:
    bad = USERS.replace('exclude = ["bio"]\n', 'exclude = ["bio"]\non_truncate = "ignore"  # <-\n')
    error, line, path = mapping_error(tmp_path, HEAD + bad + PRODUCTS)
    assert error.line == line
    assert str(error) == (
        f"{path}:{line}: tables.users.on_truncate: must be one of 'apply', 'stop', not 'ignore'"
    )
