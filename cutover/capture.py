"""The captured set: what the publication publishes against what the mapping needs.

Shared by the producer (which stops when a mapped table or column is no longer published, see
:mod:`producers.coverage`), the ``capture`` gate of ``cutover switch-reads``/``status``
(:mod:`control.gates`) and ``cutover monitor``: one comparison, so they cannot disagree.
A block stands as long as the publication misses what the mapping reads; it is lifted by the
one resume sequence in :data:`RESUME` (docs/ARCHITECTURE.md, "Captured set").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg

from cutover import pg
from cutover.mapping import MappingSpec

#: What the operator does once the cause is understood (one documented sequence).
RESUME = (
    "restore the source (re-add the table to the publication / the column) or update the "
    "mapping to the new shape; then `cutover init`, `cutover produce`, and "
    "`cutover snapshot --table {table}` to replay what was withheld"
)


_LEFT = (
    "the table left the publication (ALTER PUBLICATION ... DROP TABLE, or a DROP COLUMN ... "
    "CASCADE of a published column, which takes the table out of the publication)"
)


def resume(table: str) -> str:
    """The resume sequence for ``schema.table`` (the snapshot takes the mapping's table name)."""
    return RESUME.format(table=table.rsplit(".", 1)[-1])


def missing_columns(needed: Iterable[str], published: Iterable[str]) -> list[str]:
    """The needed source columns that are not published, sorted."""
    have = set(published)
    return sorted(c for c in needed if c not in have)


def column_cause(missing: Sequence[str]) -> str:
    return (
        f"mapped column(s) {', '.join(missing)} no longer published (dropped, renamed or "
        "removed from the publication's column list)"
    )


def compare(
    mapping: MappingSpec, published: Mapping[str, list[str]], domain: str | None = None
) -> list[tuple[str, str]]:
    """Every (table, cause) where ``published`` (table -> columns) misses what is mapped."""
    problems = []
    for name, tm in sorted(mapping.tables.items()):
        if domain is not None and tm.domain != domain:
            continue
        qualified = f"{mapping.source_schema}.{name}"
        cols = published.get(qualified)
        if cols is None:
            problems.append((qualified, _LEFT))
            continue
        missing = missing_columns(tm.source_columns_used(), cols)
        if missing:
            problems.append((qualified, column_cause(missing)))
    return problems


def published_columns(conn: psycopg.Connection[Any], publication: str) -> dict[str, list[str]]:
    """``schema.table`` -> published column names, from ``pg_publication_tables`` (PG15+)."""
    try:
        rows = conn.execute(
            "SELECT schemaname || '.' || tablename, attnames FROM pg_publication_tables"
            " WHERE pubname = %s",
            (publication,),
        ).fetchall()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the publication's tables", "source") from None
    return {str(r[0]): list(r[1] or []) for r in rows}


def blocks(
    conn: psycopg.Connection[Any], publication: str, mapping: MappingSpec, domain: str | None = None
) -> list[tuple[str, str]]:
    """The (table, cause) of every mapped table whose capture is blocked right now."""
    return compare(mapping, published_columns(conn, publication), domain)
