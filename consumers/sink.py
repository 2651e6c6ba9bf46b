"""The commerce-database side of the apply path: staging, set-based upserts/deletes, offsets.

:class:`Sink` applies changes inside the transaction its caller opened (the caller owns
BEGIN/COMMIT: the consumer loop commits rows and offsets together, ``cutover dlq retry``
commits its own). Per target table, one ``COPY`` into the table's staging table, then one
``INSERT ... ON CONFLICT DO UPDATE`` per column set and, when there are deletes, one ``DELETE``
plus one tombstone upsert. Every statement carries the source-position guard (see
:mod:`consumers.sql` for where positions live), so a redelivered, replayed or older event
changes nothing.

A carried TRUNCATE (op ``t``, one copy per partition) deletes its table's rows older than its
position before the batch's other operations, which skip what it made obsolete
(:meth:`Sink._truncate`, :mod:`consumers.sql`).

Poison isolation: each table is applied under a savepoint. When PostgreSQL refuses the data
(SQLSTATE class 22 data exception or 23 integrity violation, e.g. a CHECK constraint), the
table's operations are bisected under savepoints down to the failing row, whose source changes
are then re-applied one by one; only the change that fails alone becomes a dead letter, the good
rows of the batch are applied. Other database errors are not the data's fault and propagate
(translated to :class:`~cutover.errors.DatabaseError`).

Vendor errors are translated here, at the edge.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from consumers import sql as q
from consumers.batch import RowOp, column_groups, merge, row_key, to_ops
from consumers.events import Change, Position
from cutover import pg
from cutover.control_store import CONSUMER_TABLES, ControlStore, dead_letters, offsets
from cutover.control_store.offsets import OffsetUpdate
from cutover.errors import CutoverError, DatabaseError, UnmappableRow
from cutover.mapping import MappingSpec, TableMapping

# SQLSTATE classes that mean "this row's data is wrong", not "the database is unwell".
_ROW_LEVEL_CLASSES = frozenset({"22", "23"})
_SAVEPOINT = sql.Identifier("cutover_row_isolation")
Params: TypeAlias = Sequence[Any] | Mapping[str, Any] | None


def is_row_level(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    return state is not None and state[:2] in _ROW_LEVEL_CLASSES


@dataclass(slots=True)
class ApplyStats:
    upserted: int = 0
    deleted: int = 0
    #: Source tables of the TRUNCATEs applied (the first copy of each; other copies: nothing).
    truncated: list[str] = field(default_factory=list)

    def add(self, other: ApplyStats) -> None:
        self.upserted += other.upserted
        self.deleted += other.deleted
        self.truncated += other.truncated


class _RowRefused(Exception):
    """Internal: PostgreSQL refused the data of one attempt (carries the translated error)."""

    def __init__(self, error: DatabaseError) -> None:
        super().__init__(error.message)
        self.error = error


class Sink:
    """Applies changes to the commerce tables through one connection (autocommit mode, with
    transactions opened and ended explicitly by the caller)."""

    #: The control tables this sink writes (``cutover apply`` refuses to start without them).
    CONTROL_TABLES: tuple[str, ...] = CONSUMER_TABLES

    def __init__(
        self,
        conn: psycopg.Connection[tuple[object, ...]],
        mapping: MappingSpec,
        control_schema: str,
    ) -> None:
        self.conn = conn
        self.mapping = mapping
        self.control_schema = control_schema
        self.control = ControlStore(conn, control_schema, "target")
        self._stages: set[str] = set()
        self._dirty: set[str] = set()

    # ------------------------------------------------------------------ transaction helpers

    def execute(
        self, query: sql.Composed | sql.SQL | str, params: Params = None
    ) -> psycopg.Cursor[tuple[object, ...]]:
        """Run one statement; psycopg errors become DatabaseError."""
        try:
            return self.conn.execute(query, params)
        except psycopg.Error as exc:
            raise pg.translate(exc, "statement failed", "target") from exc

    def begin(self) -> None:
        self.prepare()
        self.execute("BEGIN")

    def prepare(self) -> None:
        """Create the staging tables, once per connection and outside any transaction (a
        rolled-back transaction or savepoint would take a table created inside it along)."""
        if self._stages:
            return
        for tm in self.mapping.tables.values():
            self.execute(
                q.create_stage(self.mapping.target_schema, tm.target_table, tm.target_columns)
            )
            self._stages.add(tm.target_table)

    def commit(self) -> None:
        self.execute("COMMIT")
        self._dirty.clear()

    def rollback(self) -> None:
        """Roll back the open transaction, if the connection still has one."""
        self._dirty.clear()
        if self.conn.broken or self.conn.closed:
            return
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        return (
            not self.conn.closed
            and self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        )

    # ------------------------------------------------------------------ applying changes

    def apply(self, changes: Sequence[Change]) -> tuple[ApplyStats, list[tuple[int, CutoverError]]]:
        """Apply ``changes`` in the open transaction.

        Returns the statistics and the poison changes as (index into ``changes``, error): those
        changes had no effect, every other one did.
        """
        failures: list[tuple[int, CutoverError]] = []
        ops: list[RowOp] = []
        stats = ApplyStats()
        horizons: dict[str, Position] = {}
        for i, change in enumerate(changes):
            try:
                tm = self.table_of(change)
            except UnmappableRow as exc:
                failures.append((i, exc))
                continue
            if change.truncate:
                # First: the batch's rows of the table newer than the TRUNCATE are applied
                # after it, the older ones are skipped (below, and by the upsert's guard).
                stats.add(self._truncate(tm, change))
                target = tm.target_table
                horizons[target] = max(horizons.get(target, change.position), change.position)
                continue
            try:
                ops.extend(to_ops(tm, change, i))
            except UnmappableRow as exc:
                # A dead letter keeps keys and column names, never a sensitive column's value.
                failures.append((i, exc.redacted(tm.sensitive)))
        by_table: dict[str, list[RowOp]] = {}
        for op in merge(ops):
            horizon = horizons.get(op.table.target_table)
            if horizon is not None and op.position < horizon:
                continue  # captured before a TRUNCATE of its table: gone, like in legacy
            by_table.setdefault(op.table.target_table, []).append(op)
        for target, table_ops in by_table.items():
            tm = self.mapping.by_target(target)
            stats.add(self._apply_isolating(tm, table_ops, changes, failures))
        return stats, failures

    def _truncate(self, tm: TableMapping, change: Change) -> ApplyStats:
        """One copy of a carried TRUNCATE: delete the rows (and tombstones) older than it and
        record it; every copy deletes again (see :mod:`consumers.sql`), only the first counts."""
        target = tm.target_table
        params = {"lsn": change.lsn, "seq": change.seq}
        removed = self.execute(q.truncate_rows(self.mapping.target_schema, target), params).rowcount
        self.execute(q.truncate_tombstones(self.control_schema, target), params)
        row = self.execute(
            q.record_truncate(self.control_schema),
            {
                **params,
                "target": target,
                "source": f"{change.schema}.{change.table}",
                "rows": max(removed, 0),
            },
        ).fetchone()
        if not (row and row[0]):
            return ApplyStats(deleted=max(removed, 0))
        self._audit_truncate(tm, change, max(removed, 0))
        return ApplyStats(deleted=max(removed, 0), truncated=[f"{change.schema}.{change.table}"])

    def _audit_truncate(self, tm: TableMapping, change: Change, removed: int) -> None:
        """One audit entry per carried TRUNCATE (its first copy). The commands create the audit
        table on first use; a TRUNCATE may come first, so it is created here then (idempotent,
        under the control store's DDL lock, in this transaction)."""
        if not self.control.exists("audit"):
            self.control.ensure("commands")
        source = f"{change.schema}.{change.table}"
        position = Position(change.lsn, change.seq)
        self.execute(
            q.audit_truncate(self.control_schema),
            {
                "domain": tm.domain,
                "reason": f"TRUNCATE of {source} at {position} carried into "
                f"{self.mapping.target_schema}.{tm.target_table}: rows written before it "
                "removed (all copies: cutover.truncates)",
                "detail": Jsonb(
                    {
                        "source_table": source,
                        "target_table": tm.target_table,
                        "src_lsn": change.lsn,
                        "src_seq": change.seq,
                        "rows_removed_first_copy": removed,
                    }
                ),
            },
        )

    def table_of(self, change: Change) -> TableMapping:
        tm = self.mapping.tables.get(change.table)
        if tm is None or change.schema != self.mapping.source_schema:
            raise UnmappableRow(
                f"{change.schema}.{change.table}",
                None,
                "no [tables] entry in the mapping file for this source table",
            )
        return tm

    def _apply_isolating(
        self,
        tm: TableMapping,
        ops: list[RowOp],
        changes: Sequence[Change],
        failures: list[tuple[int, CutoverError]],
    ) -> ApplyStats:
        try:
            with self._savepoint():
                return self._apply_table(tm, ops)
        except _RowRefused as refused:
            if len(ops) > 1:
                # Bisect: a poison row among thousands costs ~2·log2(n) attempts, not n.
                mid = len(ops) // 2
                stats = self._apply_isolating(tm, ops[:mid], changes, failures)
                stats.add(self._apply_isolating(tm, ops[mid:], changes, failures))
                return stats
            return self._apply_origins(tm, ops[0], changes, failures, refused.error)

    def _apply_origins(
        self,
        tm: TableMapping,
        op: RowOp,
        changes: Sequence[Change],
        failures: list[tuple[int, CutoverError]],
        error: DatabaseError,
    ) -> ApplyStats:
        """The merged row failed: re-apply its source changes one at a time, in order."""
        stats = ApplyStats()
        if len(op.origins) == 1:
            failures.append((op.origins[0], error))
            return stats
        for i in op.origins:
            try:
                with self._savepoint():
                    stats.add(self._apply_table(tm, merge(to_ops(tm, changes[i], i))))
            except _RowRefused as refused:
                failures.append((i, refused.error))
        return stats

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        self.execute(sql.SQL("SAVEPOINT {}").format(_SAVEPOINT))
        try:
            yield
        except _RowRefused:
            self.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(_SAVEPOINT))
            self.execute(sql.SQL("RELEASE SAVEPOINT {}").format(_SAVEPOINT))
            raise
        self.execute(sql.SQL("RELEASE SAVEPOINT {}").format(_SAVEPOINT))

    def _ensure_stage(self, tm: TableMapping) -> None:
        target = tm.target_table
        if target in self._dirty:
            # ON COMMIT DELETE ROWS empties it at COMMIT; within one (long) transaction the
            # previous sub-batch's rows are still there.
            self.execute(q.truncate_stage(target))
        self._dirty.add(target)

    def _apply_table(self, tm: TableMapping, ops: Sequence[RowOp]) -> ApplyStats:
        """Stage ``ops`` (merged, one per key) and apply them with the position guards."""
        target = tm.target_table
        columns = tm.target_columns
        groups = column_groups(ops)
        deletes = [op for op in ops if op.delete]
        key_at = [columns.index(k) for k in tm.target_key]
        stats = ApplyStats()
        try:
            self._ensure_stage(tm)
            with self.conn.cursor() as cur:
                with cur.copy(q.copy_stage(target, columns)) as copy:
                    write = copy.write_row
                    for n, group in enumerate(groups.values()):
                        for op in group:
                            row = list(map(op.values.get, columns))
                            lsn, seq = op.position
                            row += (lsn, seq, False, n, row_key(op.key))
                            write(row)
                    for op in deletes:
                        row = [None] * len(columns)
                        for i, value in zip(key_at, op.key, strict=True):
                            row[i] = value
                        lsn, seq = op.position
                        row += (lsn, seq, True, None, row_key(op.key))
                        write(row)
                schema = self.mapping.target_schema
                for n, cols in enumerate(groups):
                    upsert = q.upsert_from_stage(
                        schema,
                        target,
                        control_schema=self.control_schema,
                        key=tm.target_key,
                        columns=cols,
                        group=n,
                    )
                    cur.execute(upsert)
                    stats.upserted += max(cur.rowcount, 0)
                if deletes:
                    cur.execute(q.delete_from_stage(schema, target, tm.target_key))
                    stats.deleted += max(cur.rowcount, 0)
                    cur.execute(q.tombstones_from_stage(self.control_schema, target))
        except psycopg.Error as exc:
            if is_row_level(exc):
                raise _RowRefused(pg.translate(exc, f"applying to {target}", "target")) from exc
            raise pg.translate(exc, f"applying to {target}", "target") from exc
        return stats

    # ------------------------------------------------------------------ offsets and letters

    def read_offsets(
        self, group: str, partitions: Sequence[tuple[str, int]], *, lock: bool
    ) -> dict[tuple[str, int], int]:
        return offsets.load(self.control, group, partitions, lock=lock)

    def claim_offsets(self, group: str, partitions: Sequence[tuple[str, int]]) -> None:
        offsets.claim(self.control, group, partitions)

    def store_offsets(self, group: str, updates: Sequence[OffsetUpdate]) -> None:
        offsets.save(self.control, group, updates)

    def record_dead_letters(self, rows: Sequence[Sequence[object]]) -> None:
        """Insert dead letters (tuples in :data:`cutover.control_store.dead_letters.COLUMNS`
        order)."""
        dead_letters.insert(self.control, rows)
