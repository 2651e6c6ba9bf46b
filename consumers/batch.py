"""Batch planning (pure): units of atomicity, change → row operations, in-batch dedupe.

Three steps between the consumed messages and the SQL:

1. :func:`closed_prefix` — each partition's buffered messages are cut after the **last** event
   that closes its unit (``Change.closes`` / heartbeats). Only that prefix may be committed; the
   open tail waits for the next poll, so a committed batch never holds part of one source
   transaction's events of a partition (per-aggregate atomicity, docs/ARCHITECTURE.md).
2. :func:`to_ops` — a change becomes row operations on its target table through the mapping:
   an upsert (``map_row``: columns whose source is an unchanged TOAST value are omitted), or a
   delete (op ``d`` or the table's ``delete_when``). An update that changed the primary key
   becomes a delete of the old key plus an upsert of the new one.
   :func:`plan_step` decides, per partition, how much of its buffer one step of the consumer
   applies, and when a huge open unit is applied in sub-batches of one long transaction.
3. :func:`merge` — per target table and key, the operations of a batch fold into one, in source
   position order: the newest position wins; a later upsert that omits columns takes them from
   the earlier upsert of the same batch (the commerce row is older than both), so nothing is
   nulled; an upsert after a delete starts afresh. Each merged operation remembers the indexes of
   the messages it came from (``origins``), so the sink can re-apply them one by one to isolate a
   poison message.

The position guards in SQL (:mod:`consumers.sql`) then decide against what the database holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from consumers.events import Change, Event, Position
from cutover.errors import CutoverError
from cutover.mapping import TableMapping, is_delete, map_row, target_key

TP = tuple[str, int]


@dataclass(slots=True)
class Entry:
    """One consumed message of a partition, decoded (``event``) or not (``error``)."""

    offset: int
    key: bytes | None
    value: bytes | None
    event: Event | None = None
    error: CutoverError | None = None


def closed_prefix(entries: Sequence[Entry], *, at_boundary: bool = True) -> int:
    """How many leading entries form complete units: the index after the last closing entry.

    ``at_boundary`` says whether ``entries[0]`` starts a unit (False while a long transaction
    of the partition is being applied in sub-batches). An undecodable message cannot tell
    whether it closes: inside an open unit it does not (committing there could expose half a
    source transaction; the unit closes with a later event, at worst the next heartbeat); at a
    unit boundary it closes by itself, which exposes nothing, since it has no effect anyway.
    """
    cut = 0
    boundary = at_boundary
    for i, entry in enumerate(entries):
        closes = entry.event.closes if entry.event is not None else boundary
        if closes:
            cut = i + 1
        boundary = closes
    return cut


@dataclass(slots=True)
class StepPlan:
    """What one step of the consumer applies: how many leading entries of each partition."""

    take: dict[TP, int]
    #: The partitions applied in sub-batches afterwards (an open unit spanning batches).
    streaming: set[TP]
    #: Partitions that started streaming in this step, with their open tail's length.
    opened: list[tuple[TP, int]] = field(default_factory=list)
    #: Partitions whose long unit closed in this step.
    closed: list[TP] = field(default_factory=list)


def plan_step(
    buffers: Mapping[TP, Sequence[Entry]],
    streaming: set[TP],
    *,
    batch_max: int,
    long_tx_events: int,
) -> StepPlan:
    """Per partition, the entries a step applies: the closed prefix; all of a partition whose
    open tail reached ``long_tx_events`` (it streams: sub-batches of ``batch_max`` inside one
    long transaction, committed once its closing event arrives). ``streaming`` is not changed."""
    out = StepPlan({}, set(streaming))
    stream = out.streaming

    def closed(tp: TP) -> int:
        # A streaming partition's buffer starts inside its open source transaction.
        return closed_prefix(buffers[tp], at_boundary=tp not in stream)

    def start(tp: TP, tail: int) -> None:
        stream.add(tp)
        out.opened.append((tp, tail))

    # Bound the memory of open tails as a whole, not only per partition.
    tails = {tp: len(buf) - closed(tp) for tp, buf in buffers.items()}
    total = sum(len(buf) for buf in buffers.values())
    while total > 2 * long_tx_events:
        candidates = [tp for tp in tails if tp not in stream and tails[tp] > 0]
        if not candidates:
            break
        big = max(candidates, key=lambda tp: tails[tp])
        start(big, tails[big])
        total -= len(buffers[big])
    for tp, buf in buffers.items():
        if not buf:
            continue
        cut = closed(tp)
        if tp in stream:
            if cut:
                take = cut  # its closing event arrived: commit once all are closed
                stream.discard(tp)
                out.closed.append(tp)
            elif len(buf) >= batch_max:
                take = len(buf)
            else:
                take = 0
        elif len(buf) - cut >= long_tx_events:
            start(tp, len(buf) - cut)
            take = len(buf)
        else:
            take = cut
        if take:
            out.take[tp] = take
    return out


def row_key(key: Sequence[object]) -> str:
    """The text form of a target key stored in ``cutover.tombstones.row_key``.

    A JSON array of the key values in target-key order; for integer and text keys it is exactly
    what PostgreSQL prints for ``jsonb_build_array(k1, k2, ...)::text``.
    """
    if len(key) == 1 and type(key[0]) is int:  # the usual case: one integer
        return f"[{key[0]}]"
    if all(type(k) is int for k in key):  # 5x faster than json.dumps
        return "[" + ", ".join([str(k) for k in key]) + "]"
    return json.dumps(list(key), ensure_ascii=False, default=str)


@dataclass(slots=True)
class RowOp:
    """An upsert or delete of one target row at one source position."""

    table: TableMapping
    key: tuple[object, ...]
    position: Position
    delete: bool
    #: Mapped target columns (upsert only; omitted columns keep the commerce value).
    values: dict[str, object]
    #: Indexes (into the caller's list of changes) of the messages this operation stems from.
    origins: list[int] = field(default_factory=list)

    @property
    def row_key(self) -> str:
        return row_key(self.key)

    @property
    def columns(self) -> tuple[str, ...]:
        """The target columns this upsert writes, in the mapping's column order."""
        return columns_of(self.table, self.values)


def columns_of(table: TableMapping, values: dict[str, object]) -> tuple[str, ...]:
    """The mapped columns of ``table`` present in ``values``, in the mapping's order."""
    cols = table.target_columns
    if len(values) == len(cols):  # nothing omitted: the usual case
        return cols
    return tuple(c for c in cols if c in values)


def to_ops(table: TableMapping, change: Change, origin: int) -> list[RowOp]:
    """The row operations of ``change`` on ``table``'s target; UnmappableRow on bad data."""
    position = change.position
    key = target_key(table, change.row)
    if change.op == "d":
        return [RowOp(table, key, position, True, {}, [origin])]
    ops: list[RowOp] = []
    if change.before is not None:
        # An update that changed the key: pgoutput sends the old key in `before`.
        try:
            old = target_key(table, change.before)
        except CutoverError:
            old = key  # before without the key columns: not a key change
        if old != key:
            ops.append(RowOp(table, old, position, True, {}, [origin]))
    if is_delete(table, change.row):
        ops.append(RowOp(table, key, position, True, {}, [origin]))
    else:
        ops.append(RowOp(table, key, position, False, map_row(table, change.row), [origin]))
    return ops


def merge(ops: Iterable[RowOp]) -> list[RowOp]:
    """Fold the operations per (target table, key) in position order; see the module doc.

    The input operations are never changed: a key's first operation is taken as it is, and
    copied only when a second one folds into it (most keys have one operation per batch).
    """
    ordered = sorted(ops, key=_position)  # stable: batch order breaks ties
    merged: dict[tuple[str, tuple[object, ...]], RowOp] = {}
    copied: set[tuple[str, tuple[object, ...]]] = set()
    for op in ordered:
        slot = (op.table.target_table, op.key)
        prev = merged.get(slot)
        if prev is None:
            merged[slot] = op
            continue
        if op.position == prev.position and op.delete == prev.delete:
            continue  # the same event twice in one batch (a redelivery): changes nothing
        if slot not in copied:
            copied.add(slot)
            prev = merged[slot] = RowOp(
                prev.table, prev.key, prev.position, prev.delete, dict(prev.values),
                list(prev.origins),
            )  # fmt: skip
        prev.origins.extend(op.origins)
        prev.position = op.position
        if op.delete:
            prev.delete = True
            prev.values = {}
        elif prev.delete:
            prev.delete = False
            prev.values = dict(op.values)
        else:
            prev.values.update(op.values)
    return list(merged.values())


_position = attrgetter("position")


def column_groups(ops: Iterable[RowOp]) -> dict[tuple[str, ...], list[RowOp]]:
    """Upserts grouped by the set of columns they write (one INSERT ... SET list per group)."""
    groups: dict[tuple[str, ...], list[RowOp]] = {}
    for op in ops:
        if not op.delete:
            groups.setdefault(op.columns, []).append(op)
    return groups
