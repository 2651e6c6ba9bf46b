"""Load and validate the mapping file (TOML, documented in ``docs/MAPPING.md``) into the model.

Loading validates everything once and raises :class:`~cutover.errors.MappingError` naming the
file, the line, the key, the problem and the fix; errors come one at a time, in file order. The
result is the frozen :class:`~cutover.mapping.model.MappingSpec`. The ``[invariants]`` section is
validated by :mod:`cutover.mapping.invariants`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from cutover.errors import MappingError
from cutover.mapping.invariants import load_invariants
from cutover.mapping.model import (
    BOOKKEEPING_COLUMNS,
    ON_TRUNCATE,
    TRANSFORM_KEYS,
    ColumnMapping,
    MappingSpec,
    Origin,
    TableMapping,
    dotted,
)
from cutover.mapping.reader import Reader, describe
from cutover.mapping.reverse import PredicateValue, ReverseDelete, ReverseRule, template_parts
from cutover.mapping.transforms import Predicate, Rename

MAX_MINOR_UNITS = 6

_TOP_KEYS = ("version", "source_schema", "target_schema", "domains", "tables", "invariants")
_DOMAIN_KEYS = ("weight",)
_TABLE_KEYS = (
    "domain",
    "target",
    "aggregate_key",
    "primary_key",
    "exclude",
    "sensitive",
    "delete_when",
    "reverse_delete",
    "reverse_insert",
    "on_truncate",
    "columns",
)
_COLUMN_KEYS = ("from", *TRANSFORM_KEYS, "reverse")
_PREDICATE_KEYS = ("column", "equals", "in")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")


class Loader(Reader):
    """Turns the parsed TOML document into a MappingSpec, or raises MappingError."""

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
        invariants = load_invariants(self, doc, tables, source_schema, target_schema)
        return MappingSpec(
            source_schema=source_schema,
            target_schema=target_schema,
            domains=MappingProxyType(domains),
            tables=MappingProxyType(tables),
            invariants=invariants,
            origin=Origin(self.path, self.line_of),
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
        domain = self.domain_of(key, body, domains)
        target = self.string(
            (*key, "target"),
            self.required(key, body, "target", '`target = "TABLE"` (the target table)'),
            "the target table",
        )
        exclude = frozenset(
            self.names((*key, "exclude"), body.get("exclude", []), "columns never published")
        )
        primary_key = self.names(
            (*key, "primary_key"),
            self.required(key, body, "primary_key", '`primary_key = ["id"]` (source columns)'),
            "the source primary key",
        )
        if not primary_key:
            self.fail((*key, "primary_key"), "must name at least one source column")
        for col in primary_key:
            self.not_excluded(exclude, (*key, "primary_key"), col, "primary key")
        agg = self.string(
            (*key, "aggregate_key"),
            self.required(
                key, body, "aggregate_key", '`aggregate_key = "COLUMN"` (the Kafka message key)'
            ),
            "the source column whose value is the Kafka message key",
        )
        self.not_excluded(exclude, (*key, "aggregate_key"), agg, "aggregate key")
        delete_when: Predicate | None = None
        if "delete_when" in body:
            delete_when = self.load_predicate((*key, "delete_when"), body["delete_when"])
            self.not_excluded(
                exclude, (*key, "delete_when"), delete_when.column, "delete_when column"
            )
        columns = self.load_columns(key, body, exclude)
        sensitive = self.sensitive_of(key, body, exclude, columns)
        reverse_delete = None
        if "reverse_delete" in body:
            if delete_when is None:
                self.fail(
                    (*key, "reverse_delete"),
                    "without delete_when a commerce delete deletes the legacy row; remove "
                    "reverse_delete, or add the delete_when it reverses",
                )
            reverse_delete = self.load_reverse_delete((*key, "reverse_delete"), body, exclude)
        reverse_insert = self.load_reverse_insert(key, body, exclude, primary_key, columns)
        on_truncate = self.string(
            (*key, "on_truncate"), body.get("on_truncate", "apply"), "what a TRUNCATE does"
        )
        if on_truncate not in ON_TRUNCATE:
            self.fail(
                (*key, "on_truncate"),
                f"must be one of {', '.join(repr(p) for p in ON_TRUNCATE)}, not {on_truncate!r}",
            )
        return TableMapping(
            source_table=name,
            target_table=target,
            domain=domain,
            aggregate_key=agg,
            primary_key=primary_key,
            target_key=self.target_key_of(key, primary_key, columns),
            columns=columns,
            exclude=exclude,
            sensitive=sensitive,
            delete_when=delete_when,
            reverse_delete=reverse_delete,
            reverse_insert=reverse_insert,
            on_truncate=on_truncate,
        )

    def sensitive_of(
        self,
        key: tuple[str, ...],
        body: Mapping[str, object],
        exclude: frozenset[str],
        columns: tuple[ColumnMapping, ...],
    ) -> frozenset[str]:
        """``sensitive = [...]``: source columns whose values never appear in dead-letter reasons
        or errors (keys and column names do). Excluded columns never travel at all."""
        at = (*key, "sensitive")
        names = self.names(at, body.get("sensitive", []), "source columns whose values are secret")
        read = {src for c in columns for src in c.transform.sources()}
        for col in names:
            self.not_excluded(exclude, at, col, "a sensitive column (excluded is stronger)")
            if col not in read:
                self.fail(at, f'"{col}" is not read by any mapped column; list mapped columns only')
        return frozenset(names)

    def domain_of(
        self, key: tuple[str, ...], body: Mapping[str, object], domains: Mapping[str, int]
    ) -> str:
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
        return domain

    def not_excluded(
        self, exclude: frozenset[str], at: tuple[str, ...], column: str, role: str
    ) -> None:
        if column in exclude:
            self.fail(
                at,
                f'column "{column}" is excluded (tables.{dotted([at[1]])}.exclude) but used '
                f"as {role}; an excluded column is never published, so remove it from "
                "exclude or stop using it",
            )

    def load_columns(
        self, key: tuple[str, ...], body: Mapping[str, object], exclude: frozenset[str]
    ) -> tuple[ColumnMapping, ...]:
        raw_columns = self.table(
            (*key, "columns"),
            self.required(key, body, "columns", f"a [{dotted(key)}.columns] section"),
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
                self.not_excluded(exclude, at, src, f"a source of {target_col}")
            columns.append(column)
        return tuple(columns)

    def target_key_of(
        self, key: tuple[str, ...], primary_key: tuple[str, ...], columns: tuple[ColumnMapping, ...]
    ) -> tuple[str, ...]:
        """The target key: the plain rename of each source primary key column."""
        target_key: list[str] = []
        for col in primary_key:
            copies = [
                c.target for c in columns if isinstance(c.transform, Rename) and c.source == col
            ]
            if not copies:
                self.fail(
                    (*key, "primary_key"),
                    f'primary key column "{col}" must be mapped by a plain rename, '
                    f'e.g. `{col} = "{col}"` under [{dotted(key)}.columns]',
                )
            target_key.append(copies[0])
        return tuple(target_key)

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
                f"not {describe(entry)}",
            )
        self.check_keys(at, entry, _COLUMN_KEYS, "transform")
        transforms = [k for k in TRANSFORM_KEYS if k in entry]
        if len(transforms) > 1:
            self.fail(
                (*at, transforms[1]),
                f"one transform per column, found {' and '.join(transforms)}; keep one",
            )
        kind = transforms[0] if transforms else None
        column = self.load_transform(at, target, entry, kind)
        if "reverse" not in entry:
            return column
        rule = self.load_reverse((*at, "reverse"), column, entry["reverse"])
        return dataclasses.replace(column, reverse=rule)

    def load_transform(
        self, at: tuple[str, ...], target: str, entry: dict[str, object], kind: str | None
    ) -> ColumnMapping:
        if kind == "template":
            if "from" in entry:
                self.fail(
                    (*at, "from"),
                    "a template reads its source columns from its {column} placeholders; "
                    "remove `from`",
                )
            template = entry["template"]
            if not isinstance(template, str):
                self.fail((*at, "template"), f"must be a string, not {describe(template)}")
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
                self.fail((*at, "upper"), f"takes `upper = true` only, not {describe(value)}")
            return ColumnMapping(target, "upper", source=source)
        if kind == "enum":
            if not isinstance(value, dict) or not value:
                self.fail(
                    (*at, "enum"),
                    "needs a non-empty table of source value = target value, "
                    f'e.g. {{ active = "ACTIVE" }}, not {describe(value)}',
                )
            pairs: list[tuple[str, str]] = []
            for k, v in value.items():
                if not isinstance(v, str):
                    self.fail(
                        (*at, "enum"),
                        f'maps "{k}" to {describe(v)}; enum values must be strings',
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

    def load_reverse(self, at: tuple[str, ...], column: ColumnMapping, raw: object) -> ReverseRule:
        """The explicit inverse of a column entry (its meaning is checked by the round trip)."""
        if column.kind == "upper":
            if raw != "lower":
                self.fail(at, f'the reverse of upper is `reverse = "lower"`, not {describe(raw)}')
            return ReverseRule(lower=True)
        if column.kind not in ("enum", "predicate", "template"):
            self.fail(at, f"a {column.kind} column is inverted automatically; remove `reverse`")
        body = self.table(at, raw, "commerce value = legacy value")
        if column.kind == "template":
            self.check_keys(at, body, ("column", "template"), "reverse")
            legacy = self.string((*at, "column"), body.get("column"), "the legacy column")
            text = self.string((*at, "template"), body.get("template"), "the legacy text")
            self.check_template((*at, "template"), text)
            known = column.source_columns()
            for _, name, _, _ in string.Formatter().parse(text):
                if name is not None and name not in known:
                    self.fail(
                        (*at, "template"),
                        f"placeholder {{{name}}} is not in the forward template; the legacy "
                        f"text is rebuilt from {', '.join(known) or 'no placeholder'} only",
                    )
            return ReverseRule(column=legacy, template=text)
        pairs: list[tuple[object, PredicateValue]] = []
        for k, v in body.items():
            if column.kind == "predicate" and k not in ("true", "false"):
                self.fail(at, f'has key "{k}"; a predicate\'s reverse has keys true and false')
            if not isinstance(v, str | int) or (column.kind == "enum" and not isinstance(v, str)):
                self.fail(at, f'maps "{k}" to {describe(v)}; write the legacy value')
            pairs.append((k == "true" if column.kind == "predicate" else k, v))
        return ReverseRule(pairs=tuple(pairs))

    def load_reverse_delete(
        self, at: tuple[str, ...], body: Mapping[str, object], exclude: frozenset[str]
    ) -> ReverseDelete:
        raw = body["reverse_delete"]
        if raw == "delete":
            return ReverseDelete()
        section = self.table(at, raw, '{ set = { COLUMN = VALUE } } or "delete"')
        self.check_keys(at, section, ("set",), "reverse_delete")
        values = self.table((*at, "set"), section.get("set"), "legacy column = value")
        if not values:
            self.fail((*at, "set"), "sets no column; name the legacy column(s) marking a delete")
        pairs: list[tuple[str, PredicateValue]] = []
        for col, v in values.items():
            self.not_excluded(exclude, (*at, "set"), col, "a reverse_delete column")
            pairs.append((col, self.predicate_values((*at, "set"), "equals", v)[0]))
        return ReverseDelete(tuple(pairs))

    def load_reverse_insert(
        self,
        key: tuple[str, ...],
        body: Mapping[str, object],
        exclude: frozenset[str],
        primary_key: Sequence[str],
        columns: Sequence[ColumnMapping],
    ) -> tuple[tuple[str, PredicateValue], ...]:
        """``reverse_insert = { COLUMN = VALUE }``: what a legacy row created by the reverse
        applier gets in the legacy-only columns commerce never holds (a NOT NULL social column
        without a default). A string is a template over the legacy columns the row is written
        with (its key and the mapped ones): ``handle = "buyer-{id}"``."""
        if "reverse_insert" not in body:
            return ()
        at = (*key, "reverse_insert")
        values = self.table(at, body["reverse_insert"], "legacy-only column = value")
        known = {*primary_key, *(c for col in columns for c in col.source_columns())}
        pairs: list[tuple[str, PredicateValue]] = []
        for col, v in values.items():
            if col not in exclude:
                self.fail(
                    (*at, col),
                    "is not excluded: reverse_insert fills legacy-only (excluded) columns; a "
                    "mapped column is written by the inverse mapping",
                )
            if isinstance(v, str):
                self.check_template((*at, col), v)
                for _literal, name in template_parts(v):
                    if name is not None and name not in known:
                        self.fail((*at, col), f"uses {{{name}}}, which the row is not written with")
            elif isinstance(v, bool) or not isinstance(v, int):
                self.fail((*at, col), f"must be a string template or an integer, not {v!r}")
            pairs.append((col, v))
        return tuple(pairs)

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


def parse_mapping(text: str, path: str = "<mapping>") -> MappingSpec:
    """Validate the mapping file content ``text``; ``path`` is used in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_POSITION.search(str(exc))
        line = int(found.group(1)) if found else None
        problem = _TOML_POSITION.sub("", str(exc)).strip()
        raise MappingError(path, f"invalid TOML: {problem}", line) from None
    return Loader(text, path).load(doc)


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
