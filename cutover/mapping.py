"""The declarative mapping: load and validate the mapping file, and the pure transform engine.

The mapping file (TOML, documented in ``docs/MAPPING.md``) says, per source table, which target
table it feeds, which Kafka topic (domain) and message key it travels with, which columns are
never published (``exclude``), and how each target column is computed from the source row. One
file drives the producers (publication column lists, message keys), the apply consumers
(:func:`map_row`, :func:`is_delete`, :func:`target_key`) and verify (:func:`source_sql`).

Loading validates everything once and raises :class:`~cutover.errors.MappingError` naming the
file, the line, the key, the problem and the fix. The result is frozen: :class:`MappingSpec` →
:class:`TableMapping` → :class:`ColumnMapping`. Each :class:`TableMapping` compiles its columns
into closures when it is built, so :func:`map_row` (the apply hot path) is one tight loop with no
parsing and no dispatch on the transform kind.

Row values come typed from the decoder: ``int``, ``str``, ``Decimal``, ``datetime``, ``bool``,
``None`` or :data:`~cutover.values.UNCHANGED` (an unchanged TOAST value PostgreSQL did not send).
Rules of the engine, for every transform:

* a target column whose source value is ``UNCHANGED`` (for a template: any placeholder) is left
  out of the result, so the commerce row keeps the value it holds;
* ``None`` maps to ``None`` (rename, upper, enum, minor_units, template with a NULL placeholder),
  except a boolean predicate, which is ``False`` on ``None`` (as ``COALESCE(col = x, false)``);
* data the mapping cannot map (a missing source column, an enum value not in the table, a money
  value with more decimal places than ``minor_units``, a float where exact numbers are required,
  a value out of bigint range) raises :class:`~cutover.errors.UnmappableRow` and nothing else:
  the consumer sends that event to the dead-letter topic.
"""

from __future__ import annotations

import difflib
import re
import string
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Literal, NoReturn, TypeAlias

from psycopg import sql

from cutover.errors import MappingError, UnmappableRow
from cutover.values import UNCHANGED

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "TRANSFORM_KEYS",
    "ColumnMapping",
    "MappingSpec",
    "Predicate",
    "PredicateValue",
    "TableMapping",
    "TransformKind",
    "aggregate_key",
    "is_delete",
    "load_mapping",
    "map_row",
    "parse_mapping",
    "predicate_sql",
    "source_sql",
    "target_key",
]

TransformKind: TypeAlias = Literal["copy", "upper", "enum", "minor_units", "predicate", "template"]
#: A value a predicate (``equals`` / ``in``) compares with: TOML strings, integers, booleans.
PredicateValue: TypeAlias = str | int | bool
Row: TypeAlias = Mapping[str, object]
_Step: TypeAlias = Callable[[Row], object]

#: The bookkeeping columns every target table has; the tool writes them, a mapping may not.
BOOKKEEPING_COLUMNS: tuple[str, ...] = ("_src_lsn", "_src_seq")
#: The transform keys of a column entry (besides ``from``), in documentation order.
TRANSFORM_KEYS: tuple[str, ...] = ("enum", "minor_units", "equals", "in", "template", "upper")
MAX_MINOR_UNITS = 6

_TOP_KEYS = ("version", "source_schema", "target_schema", "domains", "tables")
_DOMAIN_KEYS = ("weight",)
_TABLE_KEYS = (
    "domain",
    "target",
    "aggregate_key",
    "primary_key",
    "exclude",
    "delete_when",
    "columns",
)
_COLUMN_KEYS = ("from", *TRANSFORM_KEYS)
_PREDICATE_KEYS = ("column", "equals", "in")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_BIGINT_MIN = -(2**63)
_BIGINT_MAX = 2**63 - 1
# Exact decimal arithmetic: no rounding, whatever the number of digits.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


# ---------------------------------------------------------------------------------------------
# The frozen model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Predicate:
    """``column`` equals one of ``values`` (``equals = x`` is ``values == (x,)``)."""

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


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """How one target column is computed from the source row.

    ``kind`` says which of the parameters is used: ``source`` (the ``from`` column, for every kind
    but ``template``), ``enum`` (pairs source value → target value), ``minor_units`` (decimal
    places), ``values`` (the predicate's ``equals``/``in`` values), ``template`` (the text with
    ``{column}`` placeholders).
    """

    target: str
    kind: TransformKind
    source: str | None = None
    enum: tuple[tuple[str, str], ...] = ()
    minor_units: int | None = None
    values: tuple[PredicateValue, ...] = ()
    template: str | None = None

    def source_columns(self) -> tuple[str, ...]:
        """The source columns this column reads, in order of appearance."""
        if self.kind == "template":
            return tuple(
                dict.fromkeys(col for _, col in _template_parts(self.template or "") if col)
            )
        return (self.source,) if self.source is not None else ()


@dataclass(frozen=True, slots=True)
class TableMapping:
    """One source table mapped to one target table."""

    source_table: str
    target_table: str
    domain: str
    aggregate_key: str
    primary_key: tuple[str, ...]
    target_key: tuple[str, ...]
    columns: tuple[ColumnMapping, ...]
    exclude: frozenset[str] = frozenset()
    delete_when: Predicate | None = None
    # (target column, compiled step) pairs, built once from ``columns`` in __post_init__.
    _plan: tuple[tuple[str, _Step], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan = tuple((c.target, _compile(self.source_table, c)) for c in self.columns)
        object.__setattr__(self, "_plan", plan)

    @property
    def target_columns(self) -> tuple[str, ...]:
        """The mapped target columns, in file order (without the bookkeeping columns)."""
        return tuple(c.target for c in self.columns)

    def column(self, target: str) -> ColumnMapping:
        """The mapping of target column ``target`` (KeyError if it is not mapped)."""
        for c in self.columns:
            if c.target == target:
                return c
        raise KeyError(f"{self.target_table}.{target} is not mapped from {self.source_table}")

    def source_columns_used(self) -> frozenset[str]:
        """Every source column the mapping reads: columns, delete_when, primary and aggregate key.

        This is what the publication column list must contain (it always includes the primary
        key, which PostgreSQL requires for the replica identity).
        """
        used: set[str] = {*self.primary_key, self.aggregate_key}
        for c in self.columns:
            used.update(c.source_columns())
        if self.delete_when is not None:
            used.add(self.delete_when.column)
        return frozenset(used)


@dataclass(frozen=True, slots=True)
class MappingSpec:
    """The whole mapping file, validated."""

    source_schema: str
    target_schema: str
    domains: Mapping[str, int]
    tables: Mapping[str, TableMapping]
    _by_target: Mapping[str, TableMapping] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_target = {t.target_table: t for t in self.tables.values()}
        object.__setattr__(self, "_by_target", MappingProxyType(by_target))

    def tables_of(self, domain: str) -> tuple[TableMapping, ...]:
        """The tables of ``domain``, in file order (KeyError for an unknown domain)."""
        if domain not in self.domains:
            raise KeyError(f"unknown domain {domain!r}; declared: {', '.join(self.domains)}")
        return tuple(t for t in self.tables.values() if t.domain == domain)

    def by_target(self, target_table: str) -> TableMapping:
        """The table mapping that feeds ``target_table`` (KeyError if none does)."""
        try:
            return self._by_target[target_table]
        except KeyError:
            raise KeyError(f"no source table maps to target table {target_table!r}") from None


# ---------------------------------------------------------------------------------------------
# The engine (pure functions)
# ---------------------------------------------------------------------------------------------


def map_row(table: TableMapping, row: Row) -> dict[str, object]:
    """Map a source row (column → decoded value) to the target row (target column → value).

    Target columns whose source value is ``UNCHANGED`` are omitted: the target keeps its value.
    Source columns the mapping does not read are ignored. Raises only
    :class:`~cutover.errors.UnmappableRow`.
    """
    out: dict[str, object] = {}
    for target, step in table._plan:
        value = step(row)
        if value is not UNCHANGED:
            out[target] = value
    return out


def is_delete(table: TableMapping, row: Row) -> bool:
    """True when the row matches the table's ``delete_when`` (then its target row is deleted).

    ``None`` and ``UNCHANGED`` never match. A missing ``delete_when`` column is unmappable.
    """
    pred = table.delete_when
    if pred is None:
        return False
    try:
        value = row[pred.column]
    except KeyError:
        raise _missing(table.source_table, None, pred.column, "delete_when") from None
    return pred.matches(value)


def target_key(table: TableMapping, row: Row) -> tuple[object, ...]:
    """The target primary key values (in ``table.target_key`` order) from the source pk values."""
    key: list[object] = []
    for col in table.primary_key:
        try:
            value = row[col]
        except KeyError:
            raise _missing(table.source_table, None, col, "primary key") from None
        if value is None or value is UNCHANGED:
            raise UnmappableRow(
                table.source_table, col, f"primary key column {col} has no value ({value!r})"
            )
        key.append(value)
    return tuple(key)


def aggregate_key(table: TableMapping, row: Row) -> str:
    """The Kafka message key of the row, as text (the value of its ``aggregate_key`` column)."""
    col = table.aggregate_key
    try:
        value = row[col]
    except KeyError:
        raise _missing(table.source_table, None, col, "aggregate key") from None
    if value is None or value is UNCHANGED:
        raise UnmappableRow(
            table.source_table, col, f"aggregate key column {col} has no value ({value!r})"
        )
    if type(value) is int or type(value) is str:
        return str(value)
    return _as_text(table.source_table, col, col, value)


def _missing(table: str, target: str | None, source: str, role: str) -> UnmappableRow:
    return UnmappableRow(
        table,
        target,
        f"source column {source} ({role}) is missing from the row; "
        "is it in the publication column list?",
    )


def _as_text(table: str, target: str, source: str, value: object) -> str:
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
        f"{source} is {type(value).__name__} {value!r}; a template or key takes text, "
        "integer, numeric or boolean values",
    )


def _compile(table: str, col: ColumnMapping) -> _Step:
    """Build the closure computing ``col`` from a row: the only per-kind dispatch there is."""
    target = col.target
    if col.kind == "template":
        return _compile_template(table, target, col.template or "")
    src = col.source
    if src is None:
        raise ValueError(f"{table}.{target}: a {col.kind} column needs a source column")

    if col.kind == "copy":

        def copy(row: Row) -> object:
            try:
                return row[src]
            except KeyError:
                raise _missing(table, target, src, "from") from None

        return copy

    if col.kind == "upper":

        def upper(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise _missing(table, target, src, "from") from None
            if isinstance(value, str):
                return value.upper()
            if value is None or value is UNCHANGED:
                return value
            raise UnmappableRow(
                table, target, f"upper needs text; {src} is {type(value).__name__} {value!r}"
            )

        return upper

    if col.kind == "enum":
        lookup = dict(col.enum)
        allowed = ", ".join(repr(k) for k in lookup)

        def enum(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise _missing(table, target, src, "from") from None
            try:
                return lookup[value]  # type: ignore[index]
            except (KeyError, TypeError):
                if value is None or value is UNCHANGED:
                    return value
                raise UnmappableRow(
                    table,
                    target,
                    f"value {value!r} of {src} is not in the enum table (allowed: {allowed}); "
                    "add it to the mapping's enum",
                ) from None

        return enum

    if col.kind == "minor_units":
        places = col.minor_units or 0
        scale = 10**places

        def minor_units(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise _missing(table, target, src, "from") from None
            if isinstance(value, Decimal):
                if not value.is_finite():
                    raise UnmappableRow(table, target, f"{src} is {value}, not a finite number")
                scaled = value.scaleb(places, _EXACT)
                if scaled.adjusted() > 18:
                    raise UnmappableRow(
                        table, target, f"{src} = {value} times 10^{places} does not fit in bigint"
                    )
                result = int(scaled)
                if scaled != result:
                    raise UnmappableRow(
                        table,
                        target,
                        f"{src} = {value} has more than {places} decimal places",
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
                    f"{type(value).__name__} {value!r}",
                )
            if not _BIGINT_MIN <= result <= _BIGINT_MAX:
                raise UnmappableRow(
                    table, target, f"{src} = {value} times 10^{places} does not fit in bigint"
                )
            return result

        return minor_units

    if col.kind == "predicate":
        values = frozenset(col.values)

        def predicate(row: Row) -> object:
            try:
                value = row[src]
            except KeyError:
                raise _missing(table, target, src, "from") from None
            if value is None:
                return False
            if value is UNCHANGED:
                return value
            try:
                return value in values
            except TypeError:  # unhashable garbage (never from the decoder)
                return False

        return predicate

    raise ValueError(f"{table}.{target}: unknown transform kind {col.kind!r}")


def _compile_template(table: str, target: str, template: str) -> _Step:
    parts = tuple(_template_parts(template))

    def render(row: Row) -> object:
        pieces: list[str] = []
        for literal, src in parts:
            pieces.append(literal)
            if src is None:
                continue
            try:
                value = row[src]
            except KeyError:
                raise _missing(table, target, src, "template placeholder") from None
            if value is UNCHANGED or value is None:
                return value
            pieces.append(value if isinstance(value, str) else _as_text(table, target, src, value))
        return "".join(pieces)

    return render


def _template_parts(template: str) -> Iterable[tuple[str, str | None]]:
    """(literal text, placeholder column or None) pairs; assumes a validated template."""
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        yield literal, name


# ---------------------------------------------------------------------------------------------
# SQL over the source table (verify computes the mapped value inside the source database)
# ---------------------------------------------------------------------------------------------


def source_sql(column: ColumnMapping, *, qualifier: str | None = None) -> sql.Composable:
    """An SQL expression over the SOURCE table computing ``column``'s mapped value.

    ``qualifier`` (a table alias) prefixes the column references. The expression agrees with
    :func:`map_row` on every mappable value; where map_row raises UnmappableRow the SQL yields
    NULL (enum) or a rounded value (minor_units), which verify then reports as a difference.
    """

    def ref(name: str) -> sql.Composable:
        return sql.Identifier(qualifier, name) if qualifier else sql.Identifier(name)

    if column.kind == "template":
        pieces: list[sql.Composable] = []
        for literal, src in _template_parts(column.template or ""):
            if literal:
                pieces.append(sql.Literal(literal))
            if src is not None:
                pieces.append(sql.SQL("({})::text").format(ref(src)))
        if not pieces:
            return sql.Literal("")
        if len(pieces) == 1 and isinstance(pieces[0], sql.Literal):
            return pieces[0]
        return sql.SQL("({})").format(sql.SQL(" || ").join(pieces))
    if column.source is None:
        raise ValueError(f"{column.target}: a {column.kind} column needs a source column")
    src_ref = ref(column.source)
    if column.kind == "copy":
        return src_ref
    if column.kind == "upper":
        return sql.SQL("upper({})").format(src_ref)
    if column.kind == "enum":
        whens = sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(k), sql.Literal(v))
            for k, v in column.enum
        )
        return sql.SQL("(CASE {} {} END)").format(src_ref, whens)
    if column.kind == "minor_units":
        places = column.minor_units or 0
        if places == 0:
            return sql.SQL("({})::bigint").format(src_ref)
        return sql.SQL("({} * {})::bigint").format(src_ref, sql.Literal(10**places))
    if column.kind == "predicate":
        return _predicate_sql(src_ref, column.values)
    raise ValueError(f"{column.target}: unknown transform kind {column.kind!r}")


def predicate_sql(predicate: Predicate, *, qualifier: str | None = None) -> sql.Composable:
    """SQL that is true exactly when :meth:`Predicate.matches` is (never NULL)."""
    col = (
        sql.Identifier(qualifier, predicate.column)
        if qualifier
        else sql.Identifier(predicate.column)
    )
    return _predicate_sql(col, predicate.values)


def _predicate_sql(col: sql.Composable, values: tuple[PredicateValue, ...]) -> sql.Composable:
    if len(values) == 1:
        return sql.SQL("COALESCE({} = {}, false)").format(col, sql.Literal(values[0]))
    return sql.SQL("COALESCE({} IN ({}), false)").format(
        col, sql.SQL(", ").join(sql.Literal(v) for v in values)
    )


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

_BARE_KEY = r"[A-Za-z0-9_-]+"
_BASIC_STR = r'"(?:[^"\\]|\\.)*"'
_LITERAL_STR = r"'[^']*'"
_KEY_PART = f"(?:{_BARE_KEY}|{_BASIC_STR}|{_LITERAL_STR})"
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_LINE = re.compile(rf"^\s*\[\[?\s*(?P<key>{_DOTTED})\s*\]\]?")
_KEY_LINE = re.compile(rf"^\s*(?P<key>{_DOTTED})\s*=")
_KEY_TOKEN = re.compile(_KEY_PART)
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")


def _split_key(dotted: str) -> tuple[str, ...]:
    parts: list[str] = []
    for token in _KEY_TOKEN.findall(dotted):
        if token.startswith('"'):
            parts.append(token[1:-1].replace('\\"', '"').replace("\\\\", "\\"))
        elif token.startswith("'"):
            parts.append(token[1:-1])
        else:
            parts.append(token)
    return tuple(parts)


def _dotted(path: Iterable[str]) -> str:
    return ".".join(p if re.fullmatch(_BARE_KEY, p) else f'"{p}"' for p in path)


class _LineIndex:
    """Where each key of a TOML file is written (tomllib gives no positions).

    Scans the text for ``[section]`` headers and ``key =`` lines and records the full key path
    of each. Good enough for the files people write: inline tables on one line, no keys inside
    multi-line strings.
    """

    def __init__(self, text: str) -> None:
        self.entries: list[tuple[tuple[str, ...], int]] = []
        section: tuple[str, ...] = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            stripped = line.lstrip()
            if stripped.startswith("#"):
                continue
            header = _HEADER_LINE.match(line)
            if header is not None:
                section = _split_key(header.group("key"))
                self.entries.append((section, number))
                continue
            key = _KEY_LINE.match(line)
            if key is not None:
                self.entries.append(((*section, *_split_key(key.group("key"))), number))
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
                    break

    def line_of(self, path: tuple[str, ...]) -> int | None:
        """The line that best matches ``path``: the key itself, else its closest written parent."""
        best: tuple[int, bool, int] | None = None
        for entry, number in self.entries:
            common = 0
            for a, b in zip(entry, path, strict=False):
                if a != b:
                    break
                common += 1
            if common == 0:
                continue
            score = (common, common == len(entry), -number)
            if best is None or score > best:
                best = score
        return -best[2] if best is not None else None


class _Loader:
    """Turns the parsed TOML document into a MappingSpec, or raises MappingError."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self._lines: _LineIndex | None = None

    def fail(
        self, key: tuple[str, ...], problem: str, *, line_of: tuple[str, ...] | None = None
    ) -> NoReturn:
        """Raise MappingError for ``key``, at the line of ``line_of`` (default: of ``key``)."""
        if self._lines is None:
            self._lines = _LineIndex(self.text)
        where = f"{_dotted(key)}: " if key else ""
        line = self._lines.line_of(key if line_of is None else line_of)
        raise MappingError(self.path, f"{where}{problem}", line)

    # -- helpers ------------------------------------------------------------------------------

    def check_keys(
        self, key: tuple[str, ...], table: Mapping[str, object], known: tuple[str, ...], what: str
    ) -> None:
        for name in table:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                self.fail(
                    key,
                    f'unknown {what} key "{name}"{hint} (known: {", ".join(known)})',
                    line_of=(*key, name),
                )

    def table(self, key: tuple[str, ...], value: object, hint: str) -> dict[str, object]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a table ({hint}), not {_describe(value)}")
        return value

    def string(self, key: tuple[str, ...], value: object, hint: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string ({hint}), not {_describe(value)}")
        return value

    def required(
        self, key: tuple[str, ...], table: Mapping[str, object], name: str, hint: str
    ) -> object:
        if name not in table:
            self.fail((*key, name), f'missing required key "{name}"; add {hint}')
        return table[name]

    def names(self, key: tuple[str, ...], value: object, hint: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(key, f"must be an array of column names ({hint}), not {_describe(value)}")
        out: list[str] = []
        for item in value:
            if not isinstance(item, str) or not item:
                self.fail(key, f"must hold non-empty column names, not {_describe(item)}")
            if item in out:
                self.fail(key, f'lists "{item}" twice; list each column once')
            out.append(item)
        return tuple(out)

    def predicate_values(
        self, key: tuple[str, ...], op: str, value: object
    ) -> tuple[PredicateValue, ...]:
        if op == "equals":
            items: list[object] = [value]
        elif isinstance(value, list) and value:
            items = value
        else:
            self.fail((*key, op), f"`in` needs a non-empty array of values, not {_describe(value)}")
        out: list[PredicateValue] = []
        for item in items:
            if not isinstance(item, str | int):  # bool is an int
                self.fail(
                    (*key, op),
                    f"compares with strings, integers or booleans, not {_describe(item)}; "
                    "floats cannot be compared exactly",
                )
            out.append(item)
        return tuple(out)

    # -- the document -------------------------------------------------------------------------

    def load(self, doc: dict[str, object]) -> MappingSpec:
        self.check_keys((), doc, _TOP_KEYS, "top-level")
        version = self.required((), doc, "version", "`version = 1` at the top of the file")
        if type(version) is not int or version != 1:
            self.fail(("version",), f"unsupported version {version!r}; this tool reads version = 1")
        source_schema = self.string(
            ("source_schema",),
            self.required((), doc, "source_schema", '`source_schema = "shop"`'),
            "the schema of the source tables",
        )
        target_schema = self.string(
            ("target_schema",),
            self.required((), doc, "target_schema", '`target_schema = "commerce"`'),
            "the schema of the target tables",
        )
        domains = self.load_domains(doc)
        raw_tables = self.table(
            ("tables",),
            self.required((), doc, "tables", "one [tables.NAME] section per source table"),
            "one [tables.NAME] section per source table",
        )
        if not raw_tables:
            self.fail(("tables",), "maps no table; add a [tables.NAME] section per source table")
        tables: dict[str, TableMapping] = {}
        targets: dict[str, str] = {}
        for name, raw in raw_tables.items():
            table = self.load_table(name, raw, domains)
            if table.target_table in targets:
                self.fail(
                    ("tables", name, "target"),
                    f'target table "{table.target_table}" is already the target of '
                    f"tables.{targets[table.target_table]}; two source tables cannot feed one "
                    "target table",
                )
            targets[table.target_table] = name
            tables[name] = table
        return MappingSpec(
            source_schema=source_schema,
            target_schema=target_schema,
            domains=MappingProxyType(domains),
            tables=MappingProxyType(tables),
        )

    def load_domains(self, doc: Mapping[str, object]) -> dict[str, int]:
        hint = "one [domains.NAME] section with `weight = N` per domain"
        raw = self.table(("domains",), self.required((), doc, "domains", hint), hint)
        if not raw:
            self.fail(("domains",), f"declares no domain; add {hint}")
        domains: dict[str, int] = {}
        for name, body in raw.items():
            key = ("domains", name)
            if not _DOMAIN_NAME.match(name):
                self.fail(key, "a domain name may hold letters, digits, _ and - only (topic names)")
            section = self.table(key, body, "with `weight = N`")
            self.check_keys(key, section, _DOMAIN_KEYS, "domain")
            weight = self.required(key, section, "weight", "`weight = N` (progress weight, 0-100)")
            if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
                self.fail((*key, "weight"), f"must be an integer from 0 to 100, not {weight!r}")
            domains[name] = weight
        total = sum(domains.values())
        if total != 100:
            listed = ", ".join(f"{n}={w}" for n, w in domains.items())
            self.fail(
                ("domains",),
                f"weights add up to {total} ({listed}); they must add up to 100",
            )
        return domains

    def load_table(self, name: str, raw: object, domains: Mapping[str, int]) -> TableMapping:
        key = ("tables", name)
        body = self.table(key, raw, "a source table's mapping")
        self.check_keys(key, body, _TABLE_KEYS, "table")

        domain = self.string(
            (*key, "domain"),
            self.required(key, body, "domain", '`domain = "NAME"` (a declared domain)'),
            "a declared domain",
        )
        if domain not in domains:
            close = difflib.get_close_matches(domain, list(domains), n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            self.fail(
                (*key, "domain"),
                f'unknown domain "{domain}"{hint} (declared: {", ".join(domains)})',
            )
        target = self.string(
            (*key, "target"),
            self.required(key, body, "target", '`target = "TABLE"` (the target table)'),
            "the target table",
        )
        exclude = frozenset(
            self.names((*key, "exclude"), body.get("exclude", []), "columns never published")
        )

        def not_excluded(at: tuple[str, ...], column: str, role: str) -> None:
            if column in exclude:
                self.fail(
                    at,
                    f'column "{column}" is excluded (tables.{_dotted([name])}.exclude) but used '
                    f"as {role}; an excluded column is never published, so remove it from "
                    "exclude or stop using it",
                )

        primary_key = self.names(
            (*key, "primary_key"),
            self.required(key, body, "primary_key", '`primary_key = ["id"]` (source columns)'),
            "the source primary key",
        )
        if not primary_key:
            self.fail((*key, "primary_key"), "must name at least one source column")
        for col in primary_key:
            not_excluded((*key, "primary_key"), col, "primary key")
        agg = self.string(
            (*key, "aggregate_key"),
            self.required(
                key, body, "aggregate_key", '`aggregate_key = "COLUMN"` (the Kafka message key)'
            ),
            "the source column whose value is the Kafka message key",
        )
        not_excluded((*key, "aggregate_key"), agg, "aggregate key")

        delete_when: Predicate | None = None
        if "delete_when" in body:
            delete_when = self.load_predicate((*key, "delete_when"), body["delete_when"])
            not_excluded((*key, "delete_when"), delete_when.column, "delete_when column")

        raw_columns = self.table(
            (*key, "columns"),
            self.required(key, body, "columns", f"a [tables.{_dotted([name])}.columns] section"),
            "target column = source column or transform",
        )
        if not raw_columns:
            self.fail((*key, "columns"), 'maps no column; add `target_column = "source_column"`')
        columns: list[ColumnMapping] = []
        seen: dict[str, str] = {}
        for target_col, entry in raw_columns.items():
            at = (*key, "columns", target_col)
            if target_col in BOOKKEEPING_COLUMNS:
                self.fail(
                    at,
                    f'"{target_col}" is a bookkeeping column the tool writes itself; '
                    "map the data into another column",
                )
            folded = target_col.lower()
            if folded in seen:
                self.fail(
                    at,
                    f'target column "{target_col}" differs from "{seen[folded]}" only by case; '
                    "target column names must be unique",
                )
            seen[folded] = target_col
            column = self.load_column(at, target_col, entry)
            for src in column.source_columns():
                not_excluded(at, src, f"a source of {target_col}")
            columns.append(column)

        target_key: list[str] = []
        for col in primary_key:
            copies = [c.target for c in columns if c.kind == "copy" and c.source == col]
            if not copies:
                self.fail(
                    (*key, "primary_key"),
                    f'primary key column "{col}" must be mapped by a plain rename, '
                    f'e.g. `{col} = "{col}"` under [tables.{_dotted([name])}.columns]',
                )
            target_key.append(copies[0])

        return TableMapping(
            source_table=name,
            target_table=target,
            domain=domain,
            aggregate_key=agg,
            primary_key=primary_key,
            target_key=tuple(target_key),
            columns=tuple(columns),
            exclude=exclude,
            delete_when=delete_when,
        )

    def load_predicate(self, key: tuple[str, ...], raw: object) -> Predicate:
        body = self.table(key, raw, '{ column = "COLUMN", equals = VALUE } or in = [VALUES]')
        self.check_keys(key, body, _PREDICATE_KEYS, "delete_when")
        column = self.string(
            (*key, "column"),
            self.required(key, body, "column", 'column = "COLUMN"'),
            "the source column to test",
        )
        ops = [op for op in ("equals", "in") if op in body]
        if len(ops) != 1:
            self.fail(key, "needs exactly one of `equals = VALUE` or `in = [VALUES]`")
        return Predicate(column, self.predicate_values(key, ops[0], body[ops[0]]))

    def load_column(self, at: tuple[str, ...], target: str, entry: object) -> ColumnMapping:
        if isinstance(entry, str):
            if not entry:
                self.fail(at, 'names no source column; write `target = "source_column"`')
            return ColumnMapping(target, "copy", source=entry)
        if not isinstance(entry, dict):
            self.fail(
                at,
                f'must be a source column name or an inline table like {{ from = "col", ... }}, '
                f"not {_describe(entry)}",
            )
        self.check_keys(at, entry, _COLUMN_KEYS, "transform")
        transforms = [k for k in TRANSFORM_KEYS if k in entry]
        if len(transforms) > 1:
            self.fail(
                (*at, transforms[1]),
                f"one transform per column, found {' and '.join(transforms)}; keep one",
            )
        kind = transforms[0] if transforms else None
        if kind == "template":
            if "from" in entry:
                self.fail(
                    (*at, "from"),
                    "a template reads its source columns from its {column} placeholders; "
                    "remove `from`",
                )
            template = entry["template"]
            if not isinstance(template, str):
                self.fail((*at, "template"), f"must be a string, not {_describe(template)}")
            self.check_template((*at, "template"), template)
            return ColumnMapping(target, "template", template=template)
        source = self.string(
            (*at, "from"),
            self.required(at, entry, "from", '`from = "SOURCE_COLUMN"`'),
            "the source column",
        )
        if kind is None:
            return ColumnMapping(target, "copy", source=source)
        value = entry[kind]
        if kind == "upper":
            if value is not True:
                self.fail((*at, "upper"), f"takes `upper = true` only, not {_describe(value)}")
            return ColumnMapping(target, "upper", source=source)
        if kind == "enum":
            if not isinstance(value, dict) or not value:
                self.fail(
                    (*at, "enum"),
                    "needs a non-empty table of source value = target value, "
                    f'e.g. {{ active = "ACTIVE" }}, not {_describe(value)}',
                )
            pairs: list[tuple[str, str]] = []
            for k, v in value.items():
                if not isinstance(v, str):
                    self.fail(
                        (*at, "enum"),
                        f'maps "{k}" to {_describe(v)}; enum values must be strings',
                    )
                pairs.append((k, v))
            return ColumnMapping(target, "enum", source=source, enum=tuple(pairs))
        if kind == "minor_units":
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not 0 <= value <= MAX_MINOR_UNITS
            ):
                self.fail(
                    (*at, "minor_units"),
                    f"must be an integer from 0 to {MAX_MINOR_UNITS} (decimal places of the "
                    f"currency), not {value!r}",
                )
            return ColumnMapping(target, "minor_units", source=source, minor_units=value)
        # equals / in: a boolean predicate
        values = self.predicate_values(at, kind, value)
        return ColumnMapping(target, "predicate", source=source, values=values)

    def check_template(self, at: tuple[str, ...], template: str) -> None:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            self.fail(at, f"is not a valid template ({exc}); write {{{{ and }}}} for braces")
        for _literal, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name or not re.fullmatch(r"[^.\[\]{}!:]+", name):
                self.fail(
                    at,
                    f"placeholder {{{name}}} must name one source column, like {{invoice_no}}",
                )
            if spec or conversion:
                self.fail(at, f"placeholder {{{name}}} takes no format spec or conversion")


def _describe(value: object) -> str:
    kinds = {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}
    kind = kinds.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, dict | list) else kind


def parse_mapping(text: str, path: str = "<mapping>") -> MappingSpec:
    """Validate the mapping file content ``text``; ``path`` is used in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_POSITION.search(str(exc))
        line = int(found.group(1)) if found else None
        problem = _TOML_POSITION.sub("", str(exc)).strip()
        raise MappingError(path, f"invalid TOML: {problem}", line) from None
    return _Loader(text, path).load(doc)


def load_mapping(path: Path) -> MappingSpec:
    """Read and validate the mapping file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MappingError(
            str(path), "mapping file not found; set [mapping] file in the config file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingError(str(path), f"cannot read the mapping file: {exc}") from None
    return parse_mapping(text, str(path))
