"""The frozen mapping model: what a validated mapping file says.

:class:`MappingSpec` → :class:`TableMapping` → :class:`ColumnMapping`, plus the domains (with
their progress weights) and the scenario :class:`Invariant` checks. Built by
:mod:`cutover.mapping.loader`; read by the producers, the apply engine and verify. Each column
holds its :class:`~cutover.mapping.transforms.Transform`, and each table compiles its columns
into closures once, when it is built, so the apply hot path does no dispatch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeAlias

from psycopg import sql

from cutover.errors import MappingError
from cutover.mapping.reverse import Inverse, PredicateValue, ReverseDelete, ReverseRule, Step
from cutover.mapping.transforms import (
    Predicate,
    Transform,
    TransformKind,
    build_transform,
)

#: The bookkeeping columns every target table has; the tool writes them, a mapping may not.
BOOKKEEPING_COLUMNS: tuple[str, ...] = ("_src_lsn", "_src_seq")
#: The transform keys of a column entry (besides ``from``), in documentation order.
TRANSFORM_KEYS: tuple[str, ...] = ("enum", "minor_units", "equals", "in", "template", "upper")
#: Rows an invariant reports at most (the samples come from them).
INVARIANT_LIMIT = 1000
#: The TRUNCATE policies of a table (``on_truncate``), the default first.
ON_TRUNCATE: tuple[str, ...] = ("apply", "stop")

Side: TypeAlias = Literal["source", "target"]
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted(path: Iterable[str]) -> str:
    """A key path as written in TOML (``tables."unit price".from``)."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else f'"{p}"' for p in path)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a mapping came from: the file, and the line of each key (for later errors)."""

    path: str
    line_of: Callable[[tuple[str, ...]], int | None] = field(compare=False)

    def error(self, key: tuple[str, ...], problem: str) -> MappingError:
        """A MappingError for ``key`` in the loader's format: ``FILE:LINE: KEY: problem``."""
        where = f"{dotted(key)}: " if key else ""
        return MappingError(self.path, f"{where}{problem}", self.line_of(key))


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """How one target column is computed from the source row.

    ``kind`` says which of the parameters is used: ``source`` (the ``from`` column, for every kind
    but ``template``), ``enum`` (pairs source value → target value), ``minor_units`` (decimal
    places), ``values`` (the predicate's ``equals``/``in`` values), ``template`` (the text with
    ``{column}`` placeholders). ``transform`` is the matching transform object.
    """

    target: str
    kind: TransformKind
    source: str | None = None
    enum: tuple[tuple[str, str], ...] = ()
    minor_units: int | None = None
    values: tuple[PredicateValue, ...] = ()
    template: str | None = None
    #: The explicit ``reverse = ...`` (write cutover); None where the inverse is derived.
    reverse: ReverseRule | None = None
    transform: Transform = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            transform = build_transform(
                self.kind,
                source=self.source,
                enum=self.enum,
                minor_units=self.minor_units,
                values=self.values,
                template=self.template,
            )
        except ValueError as exc:
            raise ValueError(f"{self.target}: {exc}") from None
        object.__setattr__(self, "transform", transform)

    def source_columns(self) -> tuple[str, ...]:
        """The source columns this column reads, in order of appearance."""
        return self.transform.sources()


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
    #: Source columns whose values never appear in dead-letter reasons or errors.
    sensitive: frozenset[str] = frozenset()
    delete_when: Predicate | None = None
    #: What a commerce delete does to legacy (write cutover); None: not written in the file.
    reverse_delete: ReverseDelete | None = None
    #: Legacy-only columns a row created by the reverse applier gets (templates or integers).
    reverse_insert: tuple[tuple[str, PredicateValue], ...] = ()
    #: What a TRUNCATE of the source table does: "apply" (carried as a truncate event) or
    #: "stop" (the producer stops before it, naming the table and the resume command).
    on_truncate: str = "apply"
    # (target column, compiled step) pairs, built once from ``columns`` in __post_init__.
    _plan: tuple[tuple[str, Step], ...] = field(init=False, repr=False, compare=False)
    # The inverse of each column, in file order (the reverse engine's plan).
    _inverses: tuple[Inverse, ...] = field(init=False, repr=False, compare=False)
    # ``target_columns``, built once: the apply path asks for it per row.
    _target_columns: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan = tuple(
            (c.target, c.transform.step(self.source_table, c.target)) for c in self.columns
        )
        object.__setattr__(self, "_plan", plan)
        inverses = tuple(
            c.transform.inverse(self.target_table, c.target, c.reverse) for c in self.columns
        )
        object.__setattr__(self, "_inverses", inverses)
        object.__setattr__(self, "_target_columns", tuple(c.target for c in self.columns))

    @property
    def target_columns(self) -> tuple[str, ...]:
        """The mapped target columns, in file order (without the bookkeeping columns)."""
        return self._target_columns

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

    def reverse_columns(self) -> frozenset[str]:
        """The legacy columns the reverse applier writes: every column's inverse (a template's
        ``reverse`` may name an excluded column on purpose: the legacy invoice url) and what
        ``reverse_delete`` sets (least-privilege grants, :mod:`cutover.grants`)."""
        written = {i.legacy for i in self._inverses if i.legacy is not None}
        if self.reverse_delete is not None:
            written.update(c for c, _ in self.reverse_delete.set)
        return frozenset(written)


@dataclass(frozen=True, slots=True)
class Invariant:
    """A scenario check: ``query`` returns (key, detail) of each row violating it.

    ``{name}`` placeholders in ``query`` are tables of ``side`` (target tables on the commerce
    side, source tables on the legacy side), qualified with that side's schema when built.
    ``domain`` is the domain of the first table: a violation fails that domain.
    """

    name: str
    description: str
    side: Side
    tables: tuple[str, ...]
    query: str
    domain: str

    def build(self, schema: str) -> sql.Composed:
        """The query over ``schema``'s tables, ordered by key, at most INVARIANT_LIMIT rows."""
        return self.build_over({t: sql.Identifier(schema, t) for t in self.tables})

    def build_over(self, relations: Mapping[str, sql.Composable]) -> sql.Composed:
        """The query with each table placeholder replaced by ``relations[table]`` (verify reads
        a target invariant over legacy's rows mapped through the mapping this way)."""
        inner = sql.SQL(self.query.strip().rstrip(";")).format(
            **{t: relations[t] for t in self.tables}
        )
        return sql.SQL("SELECT * FROM ({}) AS violation ORDER BY 1 LIMIT {}").format(
            inner, sql.Literal(INVARIANT_LIMIT)
        )


@dataclass(frozen=True, slots=True)
class MappingSpec:
    """The whole mapping file, validated."""

    source_schema: str
    target_schema: str
    domains: Mapping[str, int]
    tables: Mapping[str, TableMapping]
    invariants: tuple[Invariant, ...] = ()
    origin: Origin | None = field(default=None, repr=False, compare=False)
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

    def error(self, key: tuple[str, ...], problem: str) -> MappingError:
        """A MappingError about ``key`` of this mapping's file (line included when known)."""
        if self.origin is None:
            where = f"{dotted(key)}: " if key else ""
            return MappingError("<mapping>", f"{where}{problem}")
        return self.origin.error(key, problem)
