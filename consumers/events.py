"""Decoded Avro records → typed change events (pure: no I/O).

A message on a domain topic (docs/ARCHITECTURE.md, "Messages on a domain topic") is either a
change event (``cutover.<schema>.<table>.Envelope``) or a producer heartbeat
(``cutover.Heartbeat``). :func:`from_record` turns the record that
:meth:`cutover.codec.SchemaStore.decode` returns into a :class:`Change` or a :class:`Heartbeat`:

* the row a change carries is ``after`` for ``c``/``u``/``r`` and ``before`` for ``d``; every
  column listed in ``unchanged_toast`` is put back as :data:`~cutover.values.UNCHANGED` (its
  ``after`` value is a null placeholder: PostgreSQL did not send it, and the commerce row must
  keep the value it holds);
* the source position is ``(source.lsn, source.seq)``: the commit LSN of the source transaction
  and the event's ordinal in it. It totally orders the changes of one source database;
* ``closes`` tells whether the event ends its unit of atomicity in its partition: a snapshot row
  or any event without a ``transaction`` block is a unit of its own; otherwise the unit ends at
  ``transaction.last_in_partition``. Heartbeats are sent between transactions, so they close too.

Malformed records raise :class:`~cutover.errors.DecodeError` (a poison message).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from cutover.errors import DecodeError
from cutover.values import UNCHANGED

HEARTBEAT_SCHEMA: Final = "cutover.Heartbeat"
HEARTBEAT_KEY: Final = b"__heartbeat__"
OPS: Final = frozenset({"c", "u", "d", "r"})

Position = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Change:
    """One row change of a source table, as the apply path needs it."""

    schema: str
    table: str
    op: str
    lsn: int
    seq: int
    #: Source commit time (ms since the epoch): commit-to-applied latency is measured from it.
    ts_ms: int
    #: ``after`` (with UNCHANGED restored) for c/u/r; ``before`` (at least the key) for d.
    row: Mapping[str, object]
    #: ``before`` of an update when the producer sent one (a primary-key change needs it).
    before: Mapping[str, object] | None
    closes: bool
    snapshot: bool

    @property
    def position(self) -> Position:
        return (self.lsn, self.seq)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A producer heartbeat: proves the pipeline is idle, not stuck. Never applied to rows."""

    ts_ms: int
    lsn: int
    producer: str

    @property
    def closes(self) -> bool:
        return True


Event = Change | Heartbeat


def from_record(schema_name: str, record: Mapping[str, Any]) -> Event:
    """The typed event of a decoded record written with the schema named ``schema_name``."""
    try:
        if schema_name == HEARTBEAT_SCHEMA:
            return Heartbeat(
                ts_ms=int(record["ts_ms"]), lsn=int(record["lsn"]), producer=str(record["producer"])
            )
        return _change(record)
    except KeyError as exc:
        raise DecodeError(f"{schema_name} record has no field {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"{schema_name} record is malformed: {exc}") from None


def _change(record: Mapping[str, Any]) -> Change:
    source = record["source"]
    op = record["op"]
    if op not in OPS:
        raise DecodeError(f"change event op {op!r} is none of c, u, d, r")
    before = record.get("before")
    if op == "d":
        if not isinstance(before, dict):
            raise DecodeError("delete event without a before row")
        row: Mapping[str, object] = before
    else:
        after = record.get("after")
        if not isinstance(after, dict):
            raise DecodeError(f"{op} event without an after row")
        unchanged = record.get("unchanged_toast")
        if unchanged:
            restored = dict(after)
            for col in unchanged:
                if col not in restored:
                    raise DecodeError(f"unchanged_toast names {col!r}, which after does not hold")
                restored[col] = UNCHANGED
            row = restored
        else:
            row = after
    tx = record.get("transaction")
    snapshot = op == "r" or source.get("snapshot") == "true"
    if tx is None or snapshot:
        closes = True
    elif isinstance(tx, dict):
        closes = bool(tx.get("last_in_partition", False))
    else:
        raise DecodeError(f"transaction block is {type(tx).__name__}, unexpected")
    schema, table = source["schema"], source["table"]
    if type(schema) is not str or type(table) is not str:
        raise DecodeError("source.schema and source.table must be strings")
    return Change(
        schema=schema,
        table=table,
        op=op,
        lsn=int(source["lsn"]),
        seq=int(source["seq"]),
        ts_ms=int(source["ts_ms"]),
        row=row,
        before=before if op == "u" and isinstance(before, dict) else None,
        closes=closes,
        snapshot=snapshot,
    )
