"""The ``cutover snapshot --where`` filter: a restricted expression, never SQL text.

The operator's filter runs in the producer's session (as the producer's role), so it is not
passed to PostgreSQL as written: it is tokenized and parsed here into a small expression tree and
rendered with :mod:`psycopg.sql`, every value a bound parameter. What the grammar accepts::

    expr    := and_ (OR and_)*
    and_    := not_ (AND not_)*
    not_    := NOT not_ | value [suffix]
    suffix  := (= | <> | != | < | <= | > | >=) value
             | IS [NOT] (NULL | TRUE | FALSE)
             | [NOT] IN ( value [, value]* )
             | [NOT] BETWEEN value AND value
             | [NOT] (LIKE | ILIKE) value
    value   := primary [:: type]
    primary := ( expr ) | number | -number | 'string' | TRUE | FALSE | NULL
             | function ( [value [, value]*] ) | column

* a column is one the publication publishes for the table (an excluded column is refused:
  the snapshot must not read what the stream never shows), bare (folded to lower case) or
  double-quoted;
* functions and cast types come from small allow-lists of side-effect-free built-ins, and the
  rendered name is this module's constant (schema-qualified ``pg_catalog``), not the input;
* numbers and strings become bound parameters (so a ``%`` or a quote in a value is just data).

Anything else (``;``, comments, ``$``, other functions, unknown columns, unbalanced
parentheses) is refused with :class:`~cutover.errors.UsageError` naming what is not allowed.
Pure: no I/O; the caller checks types against the table (EXPLAIN) and runs the query read-only.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal, Union

from psycopg import sql

from cutover.errors import UsageError

MAX_LENGTH: Final = 4000
MAX_DEPTH: Final = 32
MAX_IN_ITEMS: Final = 1000

KEYWORDS: Final = frozenset(
    {"and", "or", "not", "is", "null", "true", "false", "in", "between", "like", "ilike"}
)
COMPARISONS: Final = {"=": "=", "<>": "<>", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
# name -> (min args, max args or None for variadic). Immutable built-ins without side effects.
FUNCTIONS: Final[dict[str, tuple[int, int | None]]] = {
    "lower": (1, 1),
    "upper": (1, 1),
    "length": (1, 1),
    "char_length": (1, 1),
    "btrim": (1, 2),
    "ltrim": (1, 2),
    "rtrim": (1, 2),
    "substr": (2, 3),
    "left": (2, 2),
    "right": (2, 2),
    "abs": (1, 1),
    "round": (1, 2),
    "floor": (1, 1),
    "ceil": (1, 1),
    "coalesce": (1, None),
    "nullif": (2, 2),
}
# Accepted cast type -> the type name rendered (a constant of this module).
CAST_TYPES: Final = {
    "text": "text",
    "varchar": "varchar",
    "int": "int4",
    "integer": "int4",
    "int4": "int4",
    "bigint": "int8",
    "int8": "int8",
    "smallint": "int2",
    "int2": "int2",
    "numeric": "numeric",
    "bool": "bool",
    "boolean": "bool",
    "date": "date",
    "timestamp": "timestamp",
    "timestamptz": "timestamptz",
    "uuid": "uuid",
}

# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------

TokenKind = Literal["num", "str", "ident", "qident", "op", "(", ")", ",", "::", "-", "end"]


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    text: str  # the value: folded name, unescaped string, number text, operator
    pos: int


_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[^\W\d]\w*")
_OPERATORS = ("<=", ">=", "<>", "!=", "=", "<", ">")
# Characters refused outright, with the reason given to the operator.
_REFUSED: Final = {
    ";": "';' (a statement separator)",
    "$": "'$' (dollar quoting and positional parameters)",
    "%": "'%' outside a string literal",
    "\\": "a backslash outside a string literal",
}


def _refuse(what: str, pos: int | None = None) -> UsageError:
    where = f" (at character {pos + 1})" if pos is not None else ""
    return UsageError(f"--where: {what} is not allowed{where}")


def _scan_quoted(text: str, start: int, quote: str) -> tuple[str, int]:
    """The unescaped body of the quoted token at ``start`` and the index after it."""
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == quote:
            if text.startswith(quote, i + 1):  # a doubled quote is one quote character
                out.append(quote)
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    kind = "string literal" if quote == "'" else "quoted identifier"
    raise UsageError(f"--where: unterminated {kind} starting at character {start + 1}")


def _scan(text: str, i: int) -> tuple[Token, int]:
    """The token starting at ``text[i]`` (not whitespace) and the index after it."""
    ch = text[i]
    if text.startswith(("--", "/*"), i):
        raise _refuse("a comment", i)
    if ch in _REFUSED:
        raise _refuse(_REFUSED[ch], i)
    if ch == "'":
        body, end = _scan_quoted(text, i, "'")
        return Token("str", body, i), end
    if ch == '"':
        body, end = _scan_quoted(text, i, '"')
        if not body:
            raise UsageError(f"--where: empty quoted identifier at character {i + 1}")
        return Token("qident", body, i), end
    if text.startswith("::", i):
        return Token("::", "::", i), i + 2
    if ch in "(),-":
        return Token(ch, ch, i), i + 1  # type: ignore[arg-type]
    for op in _OPERATORS:
        if text.startswith(op, i):
            return Token("op", op, i), i + len(op)
    number = _NUMBER.match(text, i)
    if number:
        return Token("num", number.group(), i), number.end()
    ident = _IDENT.match(text, i)
    if ident:
        if text.startswith("'", ident.end()):
            raise _refuse("a prefixed string literal (E'...', U&'...', B'...')", i)
        return Token("ident", ident.group().lower(), i), ident.end()
    raise _refuse(f"character {ch!r}", i)


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an ``end`` token; UsageError on anything refused."""
    if len(text) > MAX_LENGTH:
        raise UsageError(f"--where: the filter is longer than {MAX_LENGTH} characters")
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if not text[i].isprintable():
            raise _refuse(f"control character {text[i]!r}", i)
        token, i = _scan(text, i)
        tokens.append(token)
    tokens.append(Token("end", "", len(text)))
    return tokens


# ---------------------------------------------------------------------------------------------
# the expression tree
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str


@dataclass(frozen=True, slots=True)
class Const:
    """A value: bound as a parameter (numbers, strings) or a keyword (TRUE, FALSE, NULL)."""

    value: int | Decimal | str | bool | None


@dataclass(frozen=True, slots=True)
class Cast:
    operand: Node
    type_name: str  # a value of CAST_TYPES


@dataclass(frozen=True, slots=True)
class Call:
    name: str  # a key of FUNCTIONS
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # a value of COMPARISONS, or LIKE / ILIKE
    left: Node
    right: Node
    negated: bool = False


@dataclass(frozen=True, slots=True)
class IsTest:
    operand: Node
    what: Literal["NULL", "TRUE", "FALSE"]
    negated: bool


@dataclass(frozen=True, slots=True)
class InList:
    operand: Node
    items: tuple[Node, ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class Between:
    operand: Node
    low: Node
    high: Node
    negated: bool


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: Literal["AND", "OR"]
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


Node = Union[Column, Const, Cast, Call, Compare, IsTest, InList, Between, BoolOp, Not]  # noqa: UP007


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, tokens: Sequence[Token], columns: Collection[str], table: str) -> None:
        self.tokens = tokens
        self.i = 0
        self.columns = columns
        self.table = table
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def _next(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def _is(self, *words: str) -> bool:
        return self.tok.kind == "ident" and self.tok.text in words

    def _accept(self, word: str) -> bool:
        if self._is(word):
            self.i += 1
            return True
        return False

    def _expect(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            raise self._unexpected(f"expected {what}")
        return self._next()

    def _unexpected(self, hint: str) -> UsageError:
        t = self.tok
        found = "the end of the filter" if t.kind == "end" else repr(t.text)
        return UsageError(f"--where: {hint}, found {found} at character {t.pos + 1}")

    def parse(self) -> Node:
        node = self.expr()
        if self.tok.kind != "end":
            hint = "unbalanced ')'" if self.tok.kind == ")" else "expected AND, OR or the end"
            raise self._unexpected(hint)
        return node

    def _enter(self) -> None:
        # Bounds the recursion (parentheses, NOT, nested calls and casts) with a usage error.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise UsageError(f"--where: nested deeper than {MAX_DEPTH} levels")

    def expr(self) -> Node:
        items = [self.and_()]
        while self._accept("or"):
            items.append(self.and_())
        return items[0] if len(items) == 1 else BoolOp("OR", tuple(items))

    def and_(self) -> Node:
        items = [self.not_()]
        while self._accept("and"):
            items.append(self.not_())
        return items[0] if len(items) == 1 else BoolOp("AND", tuple(items))

    def not_(self) -> Node:
        if self._accept("not"):
            self._enter()
            node = Not(self.not_())
            self.depth -= 1
            return node
        return self.suffix(self.value())

    def suffix(self, left: Node) -> Node:
        if self.tok.kind == "op":
            op = COMPARISONS[self._next().text]
            return Compare(op, left, self.value())
        if self._accept("is"):
            negated = self._accept("not")
            for word in ("null", "true", "false"):
                if self._accept(word):
                    return IsTest(left, word.upper(), negated)  # type: ignore[arg-type]
            raise self._unexpected("expected NULL, TRUE or FALSE after IS")
        negated = self._accept("not")
        if self._accept("in"):
            self._expect("(", "'(' after IN")
            items = [self.value()]
            while self.tok.kind == ",":
                self.i += 1
                items.append(self.value())
                if len(items) > MAX_IN_ITEMS:
                    raise UsageError(f"--where: an IN list longer than {MAX_IN_ITEMS} values")
            self._expect(")", "',' or ')' in the IN list")
            return InList(left, tuple(items), negated)
        if self._accept("between"):
            low = self.value()
            if not self._accept("and"):
                raise self._unexpected("expected AND in BETWEEN")
            return Between(left, low, self.value(), negated)
        if self._is("like", "ilike"):
            op = self._next().text.upper()
            return Compare(op, left, self.value(), negated)
        if negated:
            raise self._unexpected("expected IN, BETWEEN, LIKE or ILIKE after NOT")
        return left

    def value(self) -> Node:
        self._enter()
        node = self.primary()
        self.depth -= 1
        while self.tok.kind == "::":
            self.i += 1
            name = self._expect("ident", "a type name after '::'")
            if name.text not in CAST_TYPES:
                allowed = ", ".join(sorted(CAST_TYPES))
                raise UsageError(
                    f"--where: a cast to {name.text!r} is not allowed; types: {allowed}"
                )
            node = Cast(node, CAST_TYPES[name.text])
        return node

    def primary(self) -> Node:
        t = self.tok
        if t.kind == "(":
            self.i += 1
            node = self.expr()
            self._expect(")", "')'")
            return node
        if t.kind == "-" and self.tokens[self.i + 1].kind == "num":
            self.i += 1
            return Const(_number("-" + self._next().text))
        if t.kind == "num":
            return Const(_number(self._next().text))
        if t.kind == "str":
            return Const(self._next().text)
        if t.kind == "qident":
            return self._column(self._next().text)
        if t.kind == "ident":
            if t.text in ("true", "false", "null"):
                self.i += 1
                return Const({"true": True, "false": False, "null": None}[t.text])
            if t.text in KEYWORDS:
                raise self._unexpected("expected a column, a value or '('")
            self.i += 1
            if self.tok.kind == "(":
                return self._call(t.text)
            return self._column(t.text)
        raise self._unexpected("expected a column, a value or '('")

    def _call(self, name: str) -> Node:
        if name not in FUNCTIONS:
            allowed = ", ".join(sorted(FUNCTIONS))
            raise UsageError(f"--where: function {name!r} is not allowed; functions: {allowed}")
        self._expect("(", "'('")
        args: list[Node] = []
        if self.tok.kind != ")":
            args.append(self.value())
            while self.tok.kind == ",":
                self.i += 1
                args.append(self.value())
        self._expect(")", f"',' or ')' in the arguments of {name}")
        low, high = FUNCTIONS[name]
        if len(args) < low or (high is not None and len(args) > high):
            arity = str(low) if low == high else f"{low} to {high or 'any number of'}"
            raise UsageError(f"--where: {name} takes {arity} arguments, not {len(args)}")
        return Call(name, tuple(args))

    def _column(self, name: str) -> Node:
        if name not in self.columns:
            published = ", ".join(sorted(self.columns))
            raise UsageError(
                f"--where: column {name!r} is not published for {self.table} (excluded by the "
                f"mapping, or unknown): only published columns are allowed: {published}"
            )
        return Column(name)


def _number(text: str) -> int | Decimal:
    if any(c in text for c in ".eE"):
        return Decimal(text)
    return int(text)


def parse(text: str, columns: Collection[str], *, table: str) -> Node:
    """The expression tree of ``text``; ``columns``: the columns it may name (published ones)."""
    tokens = tokenize(text)
    if tokens[0].kind == "end":
        raise UsageError("--where: the filter is empty")
    return _Parser(tokens, frozenset(columns), table).parse()


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

_KEYWORD_CONST: Final = {True: "TRUE", False: "FALSE"}


def render(node: Node, alias: str = "t") -> tuple[sql.Composed, tuple[object, ...]]:
    """``node`` as composed SQL (columns qualified by ``alias``) and its parameters, in order.

    Every compound is parenthesised, so the tree's precedence is the SQL's, whatever it is
    embedded in.
    """
    params: list[object] = []
    query = _render(node, alias, params)
    return sql.Composed([query]), tuple(params)


def _render(node: Node, alias: str, params: list[object]) -> sql.Composable:
    # Every word rendered is a constant of this module (keywords, operators, allow-listed
    # names) or an Identifier of a checked column; values are placeholders.
    def sub(n: Node) -> sql.Composable:
        return _render(n, alias, params)

    def words(negated: bool, word: str) -> sql.SQL:
        return sql.SQL("NOT " + word if negated else word)

    match node:
        case Column(name):
            return sql.Identifier(alias, name)
        case Const(value) if value is None or isinstance(value, bool):
            return sql.SQL("NULL" if value is None else _KEYWORD_CONST[value])
        case Const(value):
            params.append(value)
            return sql.Placeholder()
        case Cast(operand, type_name):
            return sql.SQL("({})::{}").format(sub(operand), sql.Identifier("pg_catalog", type_name))
        case Call(name, args):
            fn = sql.Identifier("pg_catalog", name)
            return sql.SQL("{}({})").format(fn, sql.SQL(", ").join(sub(a) for a in args))
        case Compare(op, left, right, negated):
            return sql.SQL("({} {} {})").format(sub(left), words(negated, op), sub(right))
        case IsTest(operand, what, negated):
            test = sql.SQL("IS NOT " + what if negated else "IS " + what)
            return sql.SQL("({} {})").format(sub(operand), test)
        case InList(operand, items, negated):
            listed = sql.SQL(", ").join(sub(i) for i in items)
            return sql.SQL("({} {} ({}))").format(sub(operand), words(negated, "IN"), listed)
        case Between(operand, low, high, negated):
            return sql.SQL("({} {} {} AND {})").format(
                sub(operand), words(negated, "BETWEEN"), sub(low), sub(high)
            )
        case BoolOp(op, items):
            return sql.SQL("({})").format(sql.SQL(" " + op + " ").join(sub(i) for i in items))
        case Not(operand):
            return sql.SQL("(NOT {})").format(sub(operand))
    raise AssertionError(f"unknown node {node!r}")


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed ``--where`` filter: the operator's text, its SQL and its parameters."""

    text: str
    sql: sql.Composed
    params: tuple[object, ...]


def compile_filter(text: str, columns: Collection[str], *, table: str, alias: str = "t") -> Filter:
    """Parse and render ``text`` (UsageError, exit 2, naming what is not allowed)."""
    query, params = render(parse(text, columns, table=table), alias)
    return Filter(text, query, params)
