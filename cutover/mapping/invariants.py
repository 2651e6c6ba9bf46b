"""The ``[invariants.NAME]`` sections of the mapping file: the scenario's own consistency checks.

An invariant is a query over the mapped tables of one side that returns ``(key, detail)`` of
each row breaking a business rule (an order total that is not the sum of its lines...). Verify
runs every invariant whose tables it checks; a violation fails the domain of the first table.
``{name}`` placeholders in the query are that side's tables, qualified with the side's schema
when the query is built, so the file never repeats a schema name.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

from cutover.mapping.model import Invariant, Side, TableMapping
from cutover.mapping.reader import Reader

_INVARIANT_KEYS = ("side", "description", "tables", "query")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SIDES: tuple[Side, ...] = ("target", "source")


def load_invariants(
    loader: Reader,
    doc: Mapping[str, object],
    tables: Mapping[str, TableMapping],
    source_schema: str,
    target_schema: str,
) -> tuple[Invariant, ...]:
    """Validate ``[invariants.*]`` (optional) against the loaded tables."""
    if "invariants" not in doc:
        return ()
    hint = "one [invariants.NAME] section per check"
    raw = loader.table(("invariants",), doc["invariants"], hint)
    out: list[Invariant] = []
    for name, body in raw.items():
        out.append(
            _load_one(
                loader,
                name,
                raw=body,
                tables=tables,
                source_schema=source_schema,
                target_schema=target_schema,
            )
        )
    return tuple(out)


def _load_one(
    loader: Reader,
    name: str,
    *,
    raw: object,
    tables: Mapping[str, TableMapping],
    source_schema: str,
    target_schema: str,
) -> Invariant:
    key = ("invariants", name)
    if not _NAME.match(name):
        loader.fail(key, "an invariant name may hold letters, digits, _ and - only")
    body = loader.table(key, raw, "with description, tables and query")
    loader.check_keys(key, body, _INVARIANT_KEYS, "invariant")
    side = body.get("side", "target")
    if side not in _SIDES:
        loader.fail(
            (*key, "side"),
            f'must be "target" (checked in the commerce database, schema {target_schema}) or '
            f'"source" (in the legacy database, schema {source_schema}), not {side!r}',
        )
    description = loader.string(
        (*key, "description"),
        loader.required(key, body, "description", '`description = "what must hold"`'),
        "what the check means, for reports",
    )
    names = loader.names(
        (*key, "tables"),
        loader.required(key, body, "tables", '`tables = ["TABLE", ...]` (the tables it reads)'),
        f"the {side} tables the query reads",
    )
    if not names:
        loader.fail((*key, "tables"), "must name at least one table")
    owner: dict[str, TableMapping] = (
        {t.target_table: t for t in tables.values()} if side == "target" else dict(tables)
    )
    for table in names:
        if table not in owner:
            loader.fail(
                (*key, "tables"),
                f'"{table}" is not a mapped {side} table (mapped: {", ".join(owner)}); an '
                "invariant reads only tables the mapping covers",
            )
    query = loader.string(
        (*key, "query"),
        loader.required(key, body, "query", "`query = SELECT key, detail ... of each violation`"),
        "SELECT key, detail of each violating row",
    )
    _check_placeholders(loader, (*key, "query"), query, names)
    return Invariant(name, description, side, names, query, owner[names[0]].domain)


def _check_placeholders(
    loader: Reader, at: tuple[str, ...], query: str, names: tuple[str, ...]
) -> None:
    try:
        used = {n for _, n, _, _ in string.Formatter().parse(query) if n is not None}
    except ValueError as exc:
        loader.fail(at, f"is not a valid query template ({exc}); write {{{{ and }}}} for braces")
    for name in sorted(used - set(names)):
        loader.fail(
            at,
            f"placeholder {{{name}}} is not one of the invariant's tables ({', '.join(names)}); "
            "list it under tables or write {{ and }} for a literal brace",
        )
    for name in names:
        if name not in used:
            loader.fail(
                at, f"never reads table {name} (write it as {{{name}}}); drop it from tables"
            )
