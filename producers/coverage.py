"""The producer watches the captured set and stops before a change of a lost shape is applied.

A mapped table that left the publication, or a mapped column that is no longer published
(``DROP COLUMN``, ``RENAME COLUMN``, a narrowed column list) would otherwise be silent loss: the
table's changes stop flowing, or every change becomes a dead letter. The producer checks, with
the comparison of :mod:`cutover.capture`, at start, on every Relation message (before any change
of the new shape becomes an event) and periodically (a table that left the publication sends no
Relation message any more), and stops with :class:`~cutover.errors.SchemaIncompatible` (exit 3),
naming the table, the cause and the fix: the same stop as an incompatible type change.

Why stop the whole producer rather than park the table: ONE slot carries every domain and it
cannot advance past a change that was not delivered; parking would need withheld-range
bookkeeping that is not built. The trade-off (one slot per domain isolates domains, but each
slot decodes all WAL) is in docs/ARCHITECTURE.md, "Captured set".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import psycopg

from cutover import capture, metrics
from cutover.errors import SchemaIncompatible
from cutover.logging import get_logger
from cutover.mapping import MappingSpec

_ONE_SLOT = (
    " The producer stops for every domain: one slot carries them all and cannot advance past a "
    "change it did not deliver."
)


def refuse(table: str, cause: str) -> SchemaIncompatible:
    """The error that stops the producer for ``table`` (and raises its metric)."""
    metrics.capture_blocked(table)
    fix = capture.resume(table)
    get_logger("cutover.producer").error("capture.blocked", table=table, cause=cause, fix=fix)
    return SchemaIncompatible(table, f"{cause}; its changes are withheld. Fix: {fix}.{_ONE_SLOT}")


def check_relation(mapping: MappingSpec, table: str, published: Iterable[str]) -> None:
    """Raise if a Relation message of ``schema.table`` lacks a column the mapping reads."""
    tm = mapping.tables.get(table.split(".", 1)[-1])
    if tm is None:
        return
    missing = capture.missing_columns(tm.source_columns_used(), published)
    if missing:
        raise refuse(table, capture.column_cause(missing))


def check_publication(
    conn: psycopg.Connection[Any], publication: str, mapping: MappingSpec
) -> None:
    """Raise if the publication no longer publishes a mapped table or column."""
    problems = capture.blocks(conn, publication, mapping)
    if problems:
        raise refuse(*problems[0])
