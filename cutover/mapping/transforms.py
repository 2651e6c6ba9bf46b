"""One class per transform, each holding its Python form, its SQL form and its column types.

A column entry of the mapping file names one transform (a plain rename, ``upper``, ``enum``,
``minor_units``, ``equals``/``in`` or ``template``); ``delete_when`` is a :class:`Predicate`.
Each class carries the three faces of the transform side by side, so they cannot drift apart:

* :meth:`Transform.step` builds the closure the apply engine runs per row (the hot path: the
  closure does no parsing and no dispatch);
* :meth:`Transform.sql` is the same computation as an SQL expression over the source table,
  which verify runs inside the legacy database to digest mapped values;
* :attr:`Transform.accepts` / :meth:`Transform.yields` say which source column types the
  transform can read and what type it produces, which ``cutover init`` checks against both
  databases' catalogs (:mod:`cutover.mapping.typecheck`).

Types are compared as families (:func:`type_family`): ``text``, ``integer``, ``numeric``,
``float``, ``boolean``, ``time`` and ``other`` (enums, json, uuid...: never refused, because the
tool cannot tell whether they fit).

The ``kind`` string of :class:`~cutover.mapping.model.ColumnMapping` picks the class once, in
:func:`build_transform`; nothing else dispatches on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar, Literal, TypeAlias

from psycopg import sql

from cutover.errors import UnmappableRow
from cutover.mapping.reverse import (
    DERIVED,
    EXACT,
    Inverse,
    PredicateValue,
    ReverseRule,
    Row,
    Step,
    copy_step,
    decimal_step,
    lookup_step,
    lower_step,
    template_parts,
    template_step,
)
from cutover.values import UNCHANGED

TransformKind: TypeAlias = Literal["copy", "upper", "enum", "minor_units", "predicate", "template"]
#: Builds the SQL reference to a source column (optionally qualified by a table alias).
ColumnRef: TypeAlias = Callable[[str], sql.Composable]

_BIGINT_MIN = -(2**63)
_BIGINT_MAX = 2**63 - 1

# ---------------------------------------------------------------------------------------------
# Column type families
# ---------------------------------------------------------------------------------------------

#: Every family; ``other`` is the catch-all the type check never refuses.
FAMILIES: tuple[str, ...] = ("text", "integer", "numeric", "float", "boolean", "time", "other")
ANY: frozenset[str] = frozenset(FAMILIES)
_FAMILY_NAMES: dict[str, str] = {
    "text": "text|character varying|varchar|character|char|bpchar|name|citext",
    "integer": "smallint|integer|bigint|int|int2|int4|int8|smallserial|serial|bigserial",
    "numeric": "numeric|decimal",
    "float": "real|double precision|float4|float8|float",
    "boolean": "boolean|bool",
    "time": "timestamp|timestamp with time zone|timestamp without time zone|timestamptz|date|"
    "time|time with time zone|time without time zone|timetz|interval",
}
_FAMILY_OF: dict[str, str] = {
    name: family for family, names in _FAMILY_NAMES.items() for name in names.split("|")
}
# Conversions PostgreSQL makes on assignment without losing anything.
_WIDENS: frozenset[tuple[str, str]] = frozenset({("integer", "numeric"), ("integer", "float")})


def type_family(pg_type: str) -> str:
    """The family of a PostgreSQL type name (``numeric(12,2)``, ``character varying``...)."""
    name = re.sub(r"\(.*?\)", "", pg_type.strip().lower())
    name = re.sub(r"\s+", " ", name).strip()
    if name.endswith("[]") or name == "array":
        return "other"
    return _FAMILY_OF.get(name, "other")


def assignable(produced: str, target: str) -> bool:
    """Whether a value of family ``produced`` can be written to a column of family ``target``."""
    return produced == target or "other" in (produced, target) or (produced, target) in _WIDENS


def _families(values: Iterable[PredicateValue]) -> frozenset[str]:
    """The source families a predicate's values can equal (bool before int: bool is an int)."""
    out: set[str] = set()
    for v in values:
        if isinstance(v, bool):
            out.add("boolean")
        elif isinstance(v, int):
            out.update(("integer", "numeric", "float"))
        else:
            out.add("text")
    return frozenset(out | {"other"})


# ---------------------------------------------------------------------------------------------
# Shared helpers of the Python forms
# ---------------------------------------------------------------------------------------------


def missing(table: str, target: str | None, source: str, role: str) -> UnmappableRow:
    """The error for a source column absent from the row (not in the publication column list)."""
    return UnmappableRow(
        table,
        target,
        f"source column {source} ({role}) is missing from the row; "
        "is it in the publication column list?",
    )


def as_text(table: str, target: str, source: str, value: object) -> str:
    """Text of a value inside a template or a key, as PostgreSQL's ``::text`` would write it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        return format(value, "f")
    raise UnmappableRow(
        table,
        target,
        f"{source} is {type(value).__name__} {{value!r}}; a template or key takes text, "
        "integer, numeric or boolean values",
        value=value,
        source_column=source,
    )


def _in_sql(col: sql.Composable, values: tuple[PredicateValue, ...]) -> sql.Composable:
    if len(values) == 1:
        return sql.SQL("COALESCE({} = {}, false)").format(col, sql.Literal(values[0]))
    return sql.SQL("COALESCE({} IN ({}), false)").format(
        col, sql.SQL(", ").join(sql.Literal(v) for v in values)
    )


# ---------------------------------------------------------------------------------------------
# The transforms
# ---------------------------------------------------------------------------------------------


class Transform:
    """Base of the transforms: what every one of them answers."""

    __slots__ = ()
    #: The file's name of the transform, as written in error messages.
    label: ClassVar[str]
    #: The source column families the transform reads (per source column).
    accepts: ClassVar[frozenset[str]] = ANY
    #: What the families are, in words, for error messages.
    accepts_text: ClassVar[str] = "any column"
    #: How to fix a source column the transform cannot read.
    fix: ClassVar[str] = "map another column or pick another transform"

    def sources(self) -> tuple[str, ...]:
        """The source columns the transform reads, in order of appearance."""
        raise NotImplementedError

    def accepted(self) -> frozenset[str]:
        """The source families accepted (a predicate's depend on its values)."""
        return self.accepts

    def yields(self, source_family: str) -> str:
        """The family of the produced value, given the family of the (first) source column."""
        raise NotImplementedError

    def step(self, table: str, target: str) -> Step:
        """The closure computing the target value from a row (see the engine's rules)."""
        raise NotImplementedError

    def sql(self, ref: ColumnRef) -> sql.Composable:
        """The SQL expression over the source table; agrees with :meth:`step` on mappable
        values, and yields NULL (enum) or a rounded value (minor_units) where step raises."""
        raise NotImplementedError

    def inverse(self, table: str, target: str, rule: ReverseRule | None) -> Inverse:
        """The write cutover's inverse: derived, from the file's ``rule``, or the problem."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Rename(Transform):
    """``target = "source"``: the value as it is (a copy when the names are equal)."""

    label: ClassVar[str] = "a plain rename"
    source: str

    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def yields(self, source_family: str) -> str:
        return source_family

    def step(self, table: str, target: str) -> Step:
        src = self.source

        def copy(row: Row) -> object:
            try:
                return row[src]
            except KeyError:
                raise missing(table, target, src, "from") from None

        return copy

    def sql(self, ref: ColumnRef) -> sql.Composable:
        return ref(self.source)

    def inverse(self, table: str, target: str, rule: ReverseRule | None) -> Inverse:
        if rule is not None:
            return Inverse(target, None, None, problem=f"{self.label} {DERIVED}")
        return Inverse(target, self.source, copy_step(table, target))


@dataclass(frozen=True, slots=True)
class Upper(Transform):
    """``upper = true``: text in upper case."""

    label: ClassVar[str] = "upper"
    accepts: ClassVar[frozenset[str]] = frozenset({"text", "other"})
    accepts_text: ClassVar[str] = "a text column"
    fix: ClassVar[str] = "upper works on text only; map the column with a plain rename"
    source: str

    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def yields(self, source_family: str) -> str:
        return "text"

    def step(self, table: str, target: str) -> Step:
        src = self.source

        def upper(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise missing(table, target, src, "from") from None
            if isinstance(value, str):
                return value.upper()
            if value is None or value is UNCHANGED:
                return value
            raise UnmappableRow(
                table,
                target,
                f"upper needs text; {src} is {type(value).__name__} {{value!r}}",
                value=value,
                source_column=src,
            )

        return upper

    def sql(self, ref: ColumnRef) -> sql.Composable:
        return sql.SQL("upper({})").format(ref(self.source))

    def inverse(self, table: str, target: str, rule: ReverseRule | None) -> Inverse:
        if rule is None or not rule.lower:
            problem = (
                "upper loses the case of the legacy value; if legacy holds lower case text "
                'write reverse = "lower"'
            )
            return Inverse(target, None, None, problem=problem)
        return Inverse(target, self.source, lower_step(table, target), lossy=True)


@dataclass(frozen=True, slots=True)
class EnumMap(Transform):
    """``enum = { a = "A" }``: a closed table of text values; anything else is unmappable."""

    label: ClassVar[str] = "enum"
    accepts: ClassVar[frozenset[str]] = frozenset({"text", "other"})
    accepts_text: ClassVar[str] = "a text (or enum) column"
    fix: ClassVar[str] = "enum keys are text; map a text column, or use equals/in for a flag"
    source: str
    pairs: tuple[tuple[str, str], ...]

    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def yields(self, source_family: str) -> str:
        return "text"

    def step(self, table: str, target: str) -> Step:
        src = self.source
        lookup = dict(self.pairs)
        allowed = ", ".join(repr(k) for k in lookup)

        def enum(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise missing(table, target, src, "from") from None
            try:
                return lookup[value]  # type: ignore[index]
            except (KeyError, TypeError):
                if value is None or value is UNCHANGED:
                    return value
                raise UnmappableRow(
                    table,
                    target,
                    f"value {{value!r}} of {src} is not in the enum table (allowed: {allowed}); "
                    "add it to the mapping's enum",
                    value=value,
                    source_column=src,
                ) from None

        return enum

    def sql(self, ref: ColumnRef) -> sql.Composable:
        whens = sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(k), sql.Literal(v)) for k, v in self.pairs
        )
        return sql.SQL("(CASE {} {} END)").format(ref(self.source), whens)

    def inverse(self, table: str, target: str, rule: ReverseRule | None) -> Inverse:
        inverted: dict[object, object] = {}
        for k, v in self.pairs:
            inverted.setdefault(v, k)
        lossy = len(inverted) < len(self.pairs)  # several legacy values share a commerce one
        if rule is not None and rule.pairs:
            pairs: dict[object, object] = dict(rule.pairs)
            return Inverse(target, self.source, lookup_step(table, target, pairs), lossy=lossy)
        if lossy:
            dup = next(v for v in inverted if sum(w == v for _, w in self.pairs) > 1)
            problem = (
                f"enum maps several legacy values to {dup!r}, so it cannot be inverted; write "
                f'reverse = {{ {dup} = "LEGACY_VALUE", ... }} for every commerce value'
            )
            return Inverse(target, None, None, problem=problem)
        return Inverse(target, self.source, lookup_step(table, target, inverted))


@dataclass(frozen=True, slots=True)
class MinorUnits(Transform):
    """``minor_units = N``: an exact number times 10^N as an integer; never rounded."""

    label: ClassVar[str] = "minor_units"
    accepts: ClassVar[frozenset[str]] = frozenset({"integer", "numeric", "other"})
    accepts_text: ClassVar[str] = "an exact number column (numeric or integer)"
    fix: ClassVar[str] = (
        "minor_units scales money amounts; point `from` at a numeric column, or drop "
        "minor_units and map this column with another transform"
    )
    source: str
    places: int

    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def yields(self, source_family: str) -> str:
        return "integer"

    def step(self, table: str, target: str) -> Step:
        src = self.source
        places = self.places
        scale = 10**places

        def too_big(value: object) -> UnmappableRow:
            return UnmappableRow(
                table,
                target,
                f"{src} = {{value}} times 10^{places} does not fit in bigint",
                value=value,
                source_column=src,
            )

        def minor_units(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise missing(table, target, src, "from") from None
            if isinstance(value, Decimal):
                if not value.is_finite():
                    raise UnmappableRow(
                        table,
                        target,
                        f"{src} is {{value}}, not a finite number",
                        value=value,
                        source_column=src,
                    )
                scaled = value.scaleb(places, EXACT)
                if scaled.adjusted() > 18:
                    raise too_big(value)
                result = int(scaled)
                if scaled != result:
                    raise UnmappableRow(
                        table,
                        target,
                        f"{src} = {{value}} has more than {places} decimal places",
                        value=value,
                        source_column=src,
                    )
            elif type(value) is int:
                result = value * scale
            elif value is None or value is UNCHANGED:
                return value
            else:
                raise UnmappableRow(
                    table,
                    target,
                    f"minor_units needs an exact number (numeric or integer); {src} is "
                    f"{type(value).__name__} {{value!r}}",
                    value=value,
                    source_column=src,
                )
            if not _BIGINT_MIN <= result <= _BIGINT_MAX:
                raise too_big(value)
            return result

        return minor_units

    def sql(self, ref: ColumnRef) -> sql.Composable:
        if self.places == 0:
            return sql.SQL("({})::bigint").format(ref(self.source))
        return sql.SQL("({} * {})::bigint").format(ref(self.source), sql.Literal(10**self.places))

    def inverse(self, table: str, target: str, rule: ReverseRule | None) -> Inverse:
        if rule is not None:
            return Inverse(target, None, None, problem=f"{self.label} {DERIVED}")
        return Inverse(target, self.source, decimal_step(table, target, self.places))


@dataclass(frozen=True, slots=True)
class Flag(Transform):
    """``equals = V`` / ``in = [V, ...]``: a boolean, ``false`` on NULL."""

    label: ClassVar[str] = "equals/in"
    accepts_text: ClassVar[str] = "a column of the type of the compared values"
    fix: ClassVar[str] = "compare with values of the column's type (text in quotes, numbers bare)"
    source: str
    values: tuple[PredicateValue, ...]

    def sources(self) -> tuple[str, ...]:
        return (self.source,)

    def accepted(self) -> frozenset[str]:
        return _families(self.values)

    def yields(self, source_family: str) -> str:
        return "boolean"

    def step(self, table: str, target: str) -> Step:
        src = self.source
        values = frozenset(self.values)

        def predicate(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise missing(table, target, src, "from") from None
            if value is None:
                return False
            if value is UNCHANGED:
                return value
            try:
                return value in values
            except TypeError:  # unhashable garbage (never from the decoder)
                return False

        return predicate

    def sql(self, ref: ColumnRef) -> sql.Composable:
        return _in_sql(ref(self.source), self.values)

    def inverse(self, table: str, target: str, rule: ReverseRule | None) -> Inverse:
        if rule is None or not rule.pairs:
            problem = (
                "a boolean predicate cannot be inverted; write the legacy value of each flag, "
                f'e.g. reverse = {{ true = "{self.values[0]}", false = "..." }}'
            )
            return Inverse(target, None, None, problem=problem)
        step = lookup_step(table, target, dict(rule.pairs))
        return Inverse(target, self.source, step, lossy=True)


@dataclass(frozen=True, slots=True)
class Template(Transform):
    """``template = "...{col}..."``: text with source values in place of the placeholders."""

    label: ClassVar[str] = "template"
    accepts: ClassVar[frozenset[str]] = frozenset(
        {"text", "integer", "numeric", "boolean", "other"}
    )
    accepts_text: ClassVar[str] = "text, integer, numeric or boolean columns"
    fix: ClassVar[str] = "use placeholders of text, integer, numeric or boolean columns only"
    template: str

    def sources(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(col for _, col in template_parts(self.template) if col))

    def yields(self, source_family: str) -> str:
        return "text"

    def step(self, table: str, target: str) -> Step:
        parts = tuple(template_parts(self.template))

        def render(row: Row) -> object:
            pieces: list[str] = []
            for literal, src in parts:
                pieces.append(literal)
                if src is None:
                    continue
                try:
                    value = row[src]
                except KeyError:
                    raise missing(table, target, src, "template placeholder") from None
                if value is UNCHANGED or value is None:
                    return value
                pieces.append(
                    value if isinstance(value, str) else as_text(table, target, src, value)
                )
            return "".join(pieces)

        return render

    def sql(self, ref: ColumnRef) -> sql.Composable:
        pieces: list[sql.Composable] = []
        for literal, src in template_parts(self.template):
            if literal:
                pieces.append(sql.Literal(literal))
            if src is not None:
                pieces.append(sql.SQL("({})::text").format(ref(src)))
        if not pieces:
            return sql.Literal("")
        if len(pieces) == 1 and isinstance(pieces[0], sql.Literal):
            return pieces[0]
        return sql.SQL("({})").format(sql.SQL(" || ").join(pieces))

    def inverse(self, table: str, target: str, rule: ReverseRule | None) -> Inverse:
        if rule is None or rule.column is None or rule.template is None:
            return Inverse(target, None, None)  # its placeholders come back by their own columns
        step = template_step(table, target, self.template, rule.template)
        return Inverse(target, rule.column, step)


@dataclass(frozen=True, slots=True)
class Predicate:
    """``delete_when``: ``column`` equals one of ``values`` (``equals = x`` is ``(x,)``)."""

    column: str
    values: tuple[PredicateValue, ...]

    def matches(self, value: object) -> bool:
        """True when ``value`` is one of the values; ``None`` and ``UNCHANGED`` never match."""
        if value is None or value is UNCHANGED:
            return False
        try:
            return value in self.values
        except TypeError:  # incomparable garbage (never from the decoder)
            return False

    def sql(self, ref: ColumnRef) -> sql.Composable:
        """SQL that is true exactly when :meth:`matches` is (never NULL)."""
        return _in_sql(ref(self.column), self.values)

    def accepted(self) -> frozenset[str]:
        """The source families the compared values can equal."""
        return _families(self.values)


def build_transform(
    kind: TransformKind,
    *,
    source: str | None,
    enum: tuple[tuple[str, str], ...],
    minor_units: int | None,
    values: tuple[PredicateValue, ...],
    template: str | None,
) -> Transform:
    """The transform object of a column entry: the one place the ``kind`` string is read."""
    if kind == "template":
        return Template(template or "")
    if source is None:
        raise ValueError(f"a {kind} column needs a source column")
    if kind == "copy":
        return Rename(source)
    if kind == "upper":
        return Upper(source)
    if kind == "enum":
        return EnumMap(source, enum)
    if kind == "minor_units":
        return MinorUnits(source, minor_units or 0)
    if kind == "predicate":
        return Flag(source, values)
    raise ValueError(f"unknown transform kind {kind!r}")
