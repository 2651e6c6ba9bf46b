"""The ``cutover snapshot --where`` filter: golden parses and renderings, refusals, a fuzz test.

Pure: the rendering is checked as text (psycopg composes identifiers without a connection).
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

import pytest

from cutover.errors import UsageError
from producers import predicate
from producers.predicate import (
    CAST_TYPES,
    FUNCTIONS,
    Between,
    BoolOp,
    Call,
    Column,
    Compare,
    Const,
    InList,
    IsTest,
    Not,
    compile_filter,
    parse,
)

COLUMNS = ("id", "stock", "title", "status", "price_idr", "updated_at", "Mixed")
TABLE = "shop.products"


def sql_of(text: str) -> tuple[str, tuple[object, ...]]:
    flt = compile_filter(text, COLUMNS, table=TABLE)
    return flt.sql.as_string(None), flt.params


def refused(text: str) -> str:
    with pytest.raises(UsageError) as err:
        compile_filter(text, COLUMNS, table=TABLE)
    assert err.value.exit_code == 2
    return err.value.message


# --- golden parses ----------------------------------------------------------------------------


def test_precedence_or_and_not() -> None:
    tree = parse("NOT id = 1 AND stock > 2 OR status IS NULL", COLUMNS, table=TABLE)
    assert tree == BoolOp(
        "OR",
        (
            BoolOp(
                "AND",
                (
                    Not(Compare("=", Column("id"), Const(1))),
                    Compare(">", Column("stock"), Const(2)),
                ),
            ),
            IsTest(Column("status"), "NULL", False),
        ),
    )


def test_every_construct() -> None:
    tree = parse(
        "id NOT IN (1, -2) AND price_idr NOT BETWEEN 1.5 AND 2e3 AND lower(title) ILIKE '%it''s%'"
        " AND \"Mixed\" IS NOT TRUE AND updated_at >= '2024-01-01'::timestamptz",
        COLUMNS,
        table=TABLE,
    )
    assert isinstance(tree, BoolOp) and tree.op == "AND"
    assert tree.items[0] == InList(Column("id"), (Const(1), Const(-2)), True)
    assert tree.items[1] == Between(
        Column("price_idr"), Const(Decimal("1.5")), Const(Decimal("2e3")), True
    )
    assert tree.items[2] == Compare("ILIKE", Call("lower", (Column("title"),)), Const("%it's%"))
    assert tree.items[3] == IsTest(Column("Mixed"), "TRUE", True)


def test_rendering_binds_every_value() -> None:
    text, params = sql_of("stock > 10 AND (title LIKE '%x%' OR status != 'a;b') AND id <> 0")
    assert text == (
        '(("t"."stock" > %s) AND (("t"."title" LIKE %s) OR ("t"."status" <> %s))'
        ' AND ("t"."id" <> %s))'
    )
    assert params == (10, "%x%", "a;b", 0)
    text, params = sql_of("coalesce(stock, 0)::bigint BETWEEN 1 AND 2 AND status IS NOT NULL")
    assert text == (
        '((("pg_catalog"."coalesce"("t"."stock", %s))::"pg_catalog"."int8" BETWEEN %s AND %s)'
        ' AND ("t"."status" IS NOT NULL))'
    )
    assert params == (0, 1, 2)
    assert sql_of("TRUE") == ("TRUE", ())
    assert sql_of("stock = NULL OR FALSE") == ('(("t"."stock" = NULL) OR FALSE)', ())
    # Bare names fold to lower case (as PostgreSQL does); quoted names keep theirs.
    assert sql_of('ID = 1 AND "Mixed" = 2')[0] == '(("t"."id" = %s) AND ("t"."Mixed" = %s))'


# --- refusals: the attack strings and friends -------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("1=1); COMMIT; DROP TABLE public.victim; --", "';'"),
        ("id = 1 AND pg_drop_replication_slot('victim_slot')::text = ''", "pg_drop_replication"),
        ("bio like '%x%'", "column 'bio' is not published"),
        ("stock > 10) OR (true", "unbalanced ')'"),
        ("stock > 10 -- comment", "a comment"),
        ("stock > 10 /* c */", "a comment"),
        ("stock > $1", "'$'"),
        ("title = $$x$$", "'$'"),
        ("stock > 10 %s", "'%' outside a string literal"),
        ("stock = E'\\x41'", "a prefixed string literal"),
        ("stock > 1 \\ 2", "backslash"),
        ("(stock > 1", "expected ')'"),
        ("stock > 1 stock", "expected AND, OR or the end"),
        ("stock::regclass = 1", "a cast to 'regclass'"),
        ("id = (SELECT 1)", "column 'select' is not published"),
        ("title = 'unterminated", "unterminated string literal"),
        ('"Id = 1', "unterminated quoted identifier"),
        ("lower(title, title) = 'a'", "lower takes 1 arguments, not 2"),
        ("", "empty"),
        ("stock > 1\x00", "control character"),
        ("NOT", "expected a column"),
        ("stock IS 5", "expected NULL, TRUE or FALSE"),
        ("stock NOT = 1", "expected IN, BETWEEN, LIKE or ILIKE"),
        ("stock > 1 OR " * 2000 + "TRUE", "longer than"),
        ("(" * 40 + "TRUE" + ")" * 40, "nested deeper"),
        ("lower(" * 40 + "title" + ")" * 40 + " = 'a'", "nested deeper"),
        ("NOT " * 40 + "TRUE", "nested deeper"),
    ],
)
def test_refused_naming_what_is_not_allowed(text: str, named: str) -> None:
    assert named in refused(text)


# --- fuzz ---------------------------------------------------------------------------------------

_PIECES = [
    "stock", "title", "id", "bio", '"Mixed"', '"x""y"', "lower(", "pg_sleep(", "upper(", ")", "(",
    ",", "'", "''", "'a''b'", "'%s'", "%s", "%", ";", "--", "/*", "*/", "COMMIT", "DROP TABLE t",
    "AND", "OR", "NOT", "IS", "NULL", "TRUE", "IN", "BETWEEN", "LIKE", "ILIKE", "=", "<>", "!=",
    "<", ">=", "::", "::text", "::regclass", "-", "1", "-1", "1.5e3", ".5", "$1", "$$", "\\",
    "é", "ß", "\u202e", "\x00", "\n", " ", "'\u2019'", "SELECT", "pg_drop_replication_slot(",
    "coalesce(", "t.id", "*", "+", "@", "#", "[", "]", "{", "}",
]  # fmt: skip

_CONST_WORDS = {
    "AND",
    "OR",
    "NOT",
    "IS",
    "NULL",
    "TRUE",
    "FALSE",
    "IN",
    "BETWEEN",
    "LIKE",
    "ILIKE",
} | set(predicate.COMPARISONS.values())
_ALLOWED_TOKEN = re.compile(
    r"\s+|%s|[(),]|::|<>|<=|>=|[=<>]|[A-Z]+"
    r'|"t"\."(?:' + "|".join(re.escape(c) for c in COLUMNS) + r')"'
    r'|"pg_catalog"\."(?:' + "|".join(sorted({*FUNCTIONS, *CAST_TYPES.values()})) + r')"'
)


def _only_allowed_tokens(rendered: str) -> bool:
    """The rendering is made of placeholders, module words and checked identifiers only."""
    pos = 0
    while pos < len(rendered):
        m = _ALLOWED_TOKEN.match(rendered, pos)
        if m is None:
            return False
        if m.group().isalpha() and m.group() not in _CONST_WORDS:
            return False
        pos = m.end()
    return True


def test_fuzz_every_input_is_refused_or_rendered_from_constants_only() -> None:
    rng = random.Random(20261129)
    parsed = 0
    for _ in range(6000):
        text = " ".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.3:
            # Mutate a valid filter, so that many inputs get deep into the grammar.
            base = "stock > 10 AND title LIKE 'a%' OR id IN (1, 2)"
            cut = rng.randint(0, len(base))
            text = base[:cut] + rng.choice(_PIECES) + base[cut:]
        try:
            flt = compile_filter(text, COLUMNS, table=TABLE)
        except UsageError as exc:
            assert exc.exit_code == 2 and exc.message.startswith("--where")
            continue
        parsed += 1
        rendered = flt.sql.as_string(None)
        assert _only_allowed_tokens(rendered), (text, rendered)
        assert rendered.count("%s") == len(flt.params), (text, rendered)
        assert all(isinstance(p, int | Decimal | str) for p in flt.params)
    assert parsed > 150  # the generator reaches the accepting paths too


def test_the_fuzz_oracle_catches_raw_text() -> None:
    # Break the renderer (pass a value through as SQL): the oracle must notice.
    assert not _only_allowed_tokens('("t"."stock" > 1); DROP TABLE victim')
    assert not _only_allowed_tokens('"pg_catalog"."pg_sleep"(%s)')
    assert not _only_allowed_tokens('"t"."bio" = %s')
    assert _only_allowed_tokens('(("t"."stock" > %s) AND TRUE)')
