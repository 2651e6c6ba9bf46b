"""The reverse applier's writes (commerce → legacy): the inverse mapping and its position guard.

``cutover apply --reverse`` is the same :class:`~consumers.apply.ApplyConsumer` and
:class:`~consumers.engine.ApplyEngine` as forward; only the sink differs, because legacy is not
built for the tool: :class:`LegacySink` writes legacy rows through the inverse mapping
(:func:`cutover.mapping.map_row_reverse`, :func:`~cutover.mapping.legacy_key`,
:func:`~cutover.mapping.delete_reverse`), and only the legacy columns the mapping maps: the
social columns, and anything else the mapping drops, keep what legacy holds.

Position guard. Legacy tables have no ``_src_lsn``/``_src_seq`` columns, and we do not add any
(legacy is another team's schema, and its application writes those rows too). The position of
the change that last wrote a legacy row lives instead in ``row_positions (legacy_table,
row_key, src_lsn, src_seq)`` in legacy's ``[reverse] control_schema``: each change first moves
that position forward (``INSERT ... ON CONFLICT DO UPDATE ... WHERE old < new RETURNING``), in
the same transaction as the row write and the consumed offsets, and the row is written only if
it did. So a redelivered change (a reverse producer restarted between delivery and slot advance
produces it again at a later offset, which offsets alone cannot recognise), a replay from offset
0, or an older change reaching another partition is a no-op; a delete records its position too,
so nothing older can bring the row back. Offsets-with-rows plus per-key partition order alone
would be enough for the steady state but not for the producer's redeliveries, which would move a
row back to an older value for a moment: the table makes "no duplicate effect" hold always.

A commerce delete of a table with ``delete_when`` (a listing) marks the legacy row instead
(``reverse_delete``: ``status = 'deleted'``); other deletes delete it. An update that changes a
commerce primary key is not carried back (a dead letter naming it): commerce keys are the legacy
keys renamed, and neither application changes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import psycopg
from psycopg import sql

from consumers.batch import row_key
from consumers.events import Change
from consumers.sink import ApplyStats, Sink, _RowRefused, is_row_level
from cutover import pg
from cutover.control_store import CONSUMER_TABLES, REVERSE_TABLES, ControlStore
from cutover.direction import Direction
from cutover.errors import CutoverError, UnmappableRow
from cutover.mapping import (
    MappingSpec,
    TableMapping,
    delete_reverse,
    legacy_key,
    map_row_reverse,
)

Kind = Literal["upsert", "mark", "delete"]


@dataclass(frozen=True, slots=True)
class ReverseOp:
    """One legacy row write at one commerce position (``values``: the columns to set)."""

    table: TableMapping
    kind: Kind
    key: tuple[object, ...]
    values: dict[str, object]
    position: tuple[int, int]

    @property
    def row_key(self) -> str:
        return row_key(self.key)


def reverse_op(table: TableMapping, change: Change) -> ReverseOp:
    """The legacy write of a commerce ``change`` (pure; UnmappableRow on data it cannot map)."""
    position = (change.lsn, change.seq)
    key = legacy_key(table, change.row)
    if change.op == "d":
        marks = delete_reverse(table)
        if marks is None:
            return ReverseOp(table, "delete", key, {}, position)
        return ReverseOp(table, "mark", key, marks, position)
    if change.before is not None:
        try:
            old = legacy_key(table, change.before)
        except CutoverError:
            old = key  # a before image without the key columns: not a key change
        if old != key:
            raise UnmappableRow(
                table.target_table,
                None,
                f"the commerce key changed from {list(old)} to {list(key)}: a key change is not "
                "carried back to legacy; fix the legacy row by hand",
            )
    return ReverseOp(table, "upsert", key, map_row_reverse(table, change.row), position)


# ----------------------------------------------------------------------------------- the SQL


def _match(key: Sequence[str]) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in key)


def claim_position(control_schema: str) -> sql.Composed:
    """Move a row's position forward; returns a row only if it moved (the change is newer)."""
    return sql.SQL(
        "INSERT INTO {positions} AS p (legacy_table, row_key, src_lsn, src_seq) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (legacy_table, row_key) DO UPDATE "
        "SET src_lsn = EXCLUDED.src_lsn, src_seq = EXCLUDED.src_seq "
        "WHERE (p.src_lsn, p.src_seq) < (EXCLUDED.src_lsn, EXCLUDED.src_seq) RETURNING 1"
    ).format(positions=sql.Identifier(control_schema, "row_positions"))


Statement = tuple[sql.Composed, list[object]]


def _update(target: sql.Identifier, op: ReverseOp, values: dict[str, object]) -> Statement:
    sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values)
    query = sql.SQL("UPDATE {} SET {} WHERE {}").format(target, sets, _match(op.table.primary_key))
    return query, [*values.values(), *op.key]


def write_sql(schema: str, op: ReverseOp) -> list[Statement]:
    """The statements of ``op`` on legacy table ``schema.<op.table>``, in order: each one after
    the first runs only if the previous one touched no row.

    An upsert is an UPDATE of the mapped columns, then, for a row legacy does not have, an
    INSERT. Not ``INSERT ... ON CONFLICT DO UPDATE``: PostgreSQL checks NOT NULL before it
    looks for the conflict, so a legacy table with a NOT NULL column the mapping does not map
    (users.handle) would refuse every update of an existing row.
    """
    tm = op.table
    target = sql.Identifier(schema, tm.source_table)
    key_cols = tm.primary_key
    if op.kind == "delete":
        query = sql.SQL("DELETE FROM {} WHERE {}").format(target, _match(key_cols))
        return [(query, list(op.key))]
    if op.kind == "mark":
        return [_update(target, op, op.values)]
    values = {**dict(zip(key_cols, op.key, strict=True)), **op.values}
    non_key = {c: v for c, v in values.items() if c not in key_cols}
    # A row legacy does not have yet also gets its legacy-only columns ([tables.X]
    # reverse_insert): the update above never touches them.
    created = {**values, **insert_only(tm, values)}
    insert = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING").format(
        target,
        sql.SQL(", ").join(map(sql.Identifier, created)),
        sql.SQL(", ").join(sql.Placeholder() * len(created)),
        sql.SQL(", ").join(map(sql.Identifier, key_cols)),
    )
    first = [_update(target, op, non_key)] if non_key else []
    return [*first, (insert, list(created.values()))]


def insert_only(table: TableMapping, row: Mapping[str, object]) -> dict[str, object]:
    """The ``reverse_insert`` values of a new legacy row (templates filled from ``row``)."""
    return {
        col: value.format_map({k: "" if v is None else v for k, v in row.items()})
        if isinstance(value, str)
        else value
        for col, value in table.reverse_insert
    }


# ----------------------------------------------------------------------------------- the sink


class LegacySink(Sink):
    """The sink of the reverse appliers: commerce changes → legacy rows (module docstring)."""

    CONTROL_TABLES = (*CONSUMER_TABLES, *REVERSE_TABLES)

    def __init__(
        self,
        conn: psycopg.Connection[tuple[object, ...]],
        mapping: MappingSpec,
        control_schema: str,
    ) -> None:
        super().__init__(conn, mapping, control_schema)
        self.control = ControlStore(conn, control_schema, "source")
        self._claim = claim_position(control_schema)

    def prepare(self) -> None:
        return None  # no staging tables: changes are written one by one

    def table_of(self, change: Change) -> TableMapping:
        try:
            if change.schema != self.mapping.target_schema:
                raise KeyError(change.schema)
            return self.mapping.by_target(change.table)
        except KeyError:
            raise UnmappableRow(
                f"{change.schema}.{change.table}",
                None,
                "no [tables] entry in the mapping file has this commerce table as its target",
            ) from None

    def apply(self, changes: Sequence[Change]) -> tuple[ApplyStats, list[tuple[int, CutoverError]]]:
        failures: list[tuple[int, CutoverError]] = []
        ops: list[tuple[int, ReverseOp]] = []
        for i, change in enumerate(changes):
            try:
                tm = self.table_of(change)
            except UnmappableRow as exc:
                failures.append((i, exc))
                continue
            try:
                ops.append((i, reverse_op(tm, change)))
            except UnmappableRow as exc:
                failures.append((i, exc.redacted(tm.sensitive)))
        try:
            with self._savepoint():
                stats = self._write(op for _, op in ops)
        except _RowRefused:
            # One change's data is refused by legacy (a NOT NULL social column of a new row, a
            # CHECK): redo them one by one, each under its savepoint; only that one is poison.
            stats = ApplyStats()
            for i, op in ops:
                try:
                    with self._savepoint():
                        stats.add(self._write([op]))
                except _RowRefused as refused:
                    failures.append((i, refused.error))
        return stats, failures

    def _write(self, ops: Iterable[ReverseOp]) -> ApplyStats:
        stats = ApplyStats()
        schema = self.mapping.source_schema
        try:
            with self.conn.cursor() as cur:
                for op in ops:
                    cur.execute(
                        self._claim,
                        (op.table.source_table, op.row_key, op.position[0], op.position[1]),
                    )
                    if cur.fetchone() is None:
                        continue  # not newer than what wrote the row last: changes nothing
                    for query, params in write_sql(schema, op):
                        cur.execute(query, params)
                        if cur.rowcount > 0:
                            break
                    if op.kind == "upsert":
                        stats.upserted += 1
                    else:
                        stats.deleted += 1
        except psycopg.Error as exc:
            error = pg.translate(exc, "applying to legacy", "source")
            if is_row_level(exc):
                raise _RowRefused(error) from exc
            raise error from exc
        return stats


def sink_factory(direction: Direction) -> type[Sink]:
    """The sink class of ``direction``'s appliers."""
    return LegacySink if direction.reverse else Sink
