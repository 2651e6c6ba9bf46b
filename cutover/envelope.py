"""The change-event envelope: its field names, its position, how it is built and how it is read.

Both sides of the pipeline go through this module: the producer builds envelope records with
:func:`change_record` / :func:`heartbeat_record`, the consumer turns decoded records back into
typed events with :func:`from_record`; :mod:`cutover.codec` fills the per-table schema by field
name. Changing the envelope therefore touches this module and the templates in ``schemas/``.

An envelope (``cutover.<schema>.<table>.Envelope``, Debezium-shaped) holds:

* ``before`` / ``after``: the row before and after the change (``Value`` records); an unchanged
  TOAST column is null in ``after`` and listed in ``unchanged_toast`` (it is not NULL: the target
  keeps the value it holds);
* ``source``: where the change comes from; ``source.lsn`` is the commit LSN of the source
  transaction, ``source.seq`` the event's 0-based ordinal in it. Together they are the event's
  :class:`Position`, which totally orders the changes of one source database;
* ``op``: ``c``, ``u``, ``d`` or ``r`` (a snapshot row); ``ts_ms``: when the producer wrote it;
* ``transaction``: null for a unit of its own (snapshot rows), else the transaction block whose
  ``last_in_partition`` marks the last event of the source transaction in its Kafka partition.

A TRUNCATE of a source table (``cutover.Truncate``, op ``t``) carries the same ``source``, ``op``,
``ts_ms`` and ``transaction`` fields and no rows. It is written to every partition of the table's
domain topic, each copy at the same position (the table's rows are spread over the partitions).
It is a record of its own, not a fifth symbol of the Envelope's ``Op`` enum: that would change the
fingerprint, hence the wire bytes, of every table's existing events.

A producer heartbeat (``cutover.Heartbeat``) is sent between transactions and always closes.
Malformed records raise :class:`~cutover.errors.DecodeError` (a poison message).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from cutover.errors import DecodeError
from cutover.values import UNCHANGED

# -- field names ------------------------------------------------------------------------------

# The envelope record (schemas/envelope.avsc), in schema order.
BEFORE: Final = "before"
AFTER: Final = "after"
SOURCE: Final = "source"
OP: Final = "op"
TS_MS: Final = "ts_ms"
TRANSACTION: Final = "transaction"
UNCHANGED_TOAST: Final = "unchanged_toast"
FIELDS: Final = (BEFORE, AFTER, SOURCE, OP, TS_MS, TRANSACTION, UNCHANGED_TOAST)

# The source block (schemas/source.avsc).
SRC_VERSION: Final = "version"
SRC_CONNECTOR: Final = "connector"
SRC_NAME: Final = "name"
SRC_TS_MS: Final = "ts_ms"
SRC_SNAPSHOT: Final = "snapshot"
SRC_DB: Final = "db"
SRC_SCHEMA: Final = "schema"
SRC_TABLE: Final = "table"
SRC_TX_ID: Final = "txId"
SRC_LSN: Final = "lsn"
SRC_SEQ: Final = "seq"

# The transaction block (schemas/transaction.avsc).
TX_ID: Final = "id"
TX_TOTAL_ORDER: Final = "total_order"
TX_DATA_COLLECTION_ORDER: Final = "data_collection_order"
TX_LAST_IN_PARTITION: Final = "last_in_partition"

# The heartbeat record (schemas/heartbeat.avsc).
HEARTBEAT_SCHEMA: Final = "cutover.Heartbeat"
HEARTBEAT_KEY: Final = b"__heartbeat__"
HB_TS_MS: Final = "ts_ms"
HB_LSN: Final = "lsn"
HB_PRODUCER: Final = "producer"

# The truncate record (schemas/truncate.avsc).
TRUNCATE_SCHEMA: Final = "cutover.Truncate"
TRUNCATE_OP: Final = "t"
TR_CASCADE: Final = "cascade"
TR_RESTART_IDENTITY: Final = "restart_identity"

OPS: Final = frozenset({"c", "u", "d", "r"})
SNAPSHOT_OP: Final = "r"

# -- positions --------------------------------------------------------------------------------

_LSN_PART = re.compile(r"[0-9A-Fa-f]{1,8}")
_U64_MAX: Final = (1 << 64) - 1


def lsn_to_str(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints ``pg_lsn``: ``'16/B374D848'`` (upper-case hex)."""
    if not 0 <= lsn <= _U64_MAX:
        raise DecodeError(f"LSN {lsn} is outside the unsigned 64-bit range")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    """Parse PostgreSQL's ``pg_lsn`` text form (``'16/B374D848'``, any hex case) to an int."""
    high, sep, low = text.partition("/")
    if not sep or not _LSN_PART.fullmatch(high) or not _LSN_PART.fullmatch(low):
        raise DecodeError(f"{text!r} is not an LSN; expected two hex numbers like '16/B374D848'")
    return (int(high, 16) << 32) | int(low, 16)


class Position(NamedTuple):
    """Where a change sits in its source database's history: ordered by (commit LSN, seq).

    A NamedTuple rather than a dataclass: it is immutable and ordered as the tuple it is, and the
    apply path sorts and compares positions per change, where tuple comparison is the cheapest.
    """

    lsn: int
    seq: int

    def __str__(self) -> str:
        return f"{lsn_to_str(self.lsn)}#{self.seq}"


# -- building (producer side) -----------------------------------------------------------------


def source_block(
    *, version: str, connector: str, name: str, db: str, schema: str, table: str
) -> dict[str, Any]:
    """The constant part of a table's ``source`` block (built once per table route)."""
    return {
        SRC_VERSION: version,
        SRC_CONNECTOR: connector,
        SRC_NAME: name,
        SRC_DB: db,
        SRC_SCHEMA: schema,
        SRC_TABLE: table,
    }


def transaction_block(
    tx_id: int, commit_lsn: int, total_order: int, data_collection_order: int, last: bool = False
) -> dict[str, Any]:
    """The ``transaction`` block of a streamed change (``last`` may be set later)."""
    return {
        TX_ID: f"{tx_id}:{commit_lsn}",
        TX_TOTAL_ORDER: total_order,
        TX_DATA_COLLECTION_ORDER: data_collection_order,
        TX_LAST_IN_PARTITION: last,
    }


def change_record(
    source: Mapping[str, Any],
    *,
    op: str,
    before: Mapping[str, object] | None,
    after: Mapping[str, object] | None,
    unchanged: Sequence[str],
    position: tuple[int, int],
    tx_id: int,
    commit_ms: int,
    now_ms: int,
    transaction: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The envelope record of one change: ``source`` is the table's :func:`source_block`,
    ``position`` its (commit LSN, seq), ``commit_ms`` the source commit time and ``now_ms`` the
    producer's clock. A snapshot row (op ``r``) is flagged in ``source.snapshot``."""
    src = dict(source)
    src[SRC_TS_MS] = commit_ms
    src[SRC_SNAPSHOT] = "true" if op == SNAPSHOT_OP else "false"
    src[SRC_TX_ID] = tx_id
    src[SRC_LSN], src[SRC_SEQ] = position
    return {
        BEFORE: before,
        AFTER: after,
        SOURCE: src,
        OP: op,
        TS_MS: now_ms,
        TRANSACTION: transaction,
        UNCHANGED_TOAST: unchanged,
    }


def truncate_record(
    source: Mapping[str, Any],
    *,
    position: tuple[int, int],
    tx_id: int,
    commit_ms: int,
    now_ms: int,
    transaction: Mapping[str, Any],
    cascade: bool = False,
    restart_identity: bool = False,
) -> dict[str, Any]:
    """The record of a TRUNCATE of the table of ``source`` (its :func:`source_block`), at
    ``position`` (commit LSN, seq); one copy of it goes to every partition of the domain topic,
    each with a ``transaction`` block of its own (``last_in_partition`` is per partition)."""
    src = dict(source)
    src[SRC_TS_MS] = commit_ms
    src[SRC_SNAPSHOT] = "false"
    src[SRC_TX_ID] = tx_id
    src[SRC_LSN], src[SRC_SEQ] = position
    return {
        SOURCE: src,
        OP: TRUNCATE_OP,
        TS_MS: now_ms,
        TRANSACTION: transaction,
        TR_CASCADE: cascade,
        TR_RESTART_IDENTITY: restart_identity,
    }


def mark_last_in_partition(record: dict[str, Any]) -> None:
    """Flag a held-back streamed change as the last of its transaction in its partition."""
    record[TRANSACTION][TX_LAST_IN_PARTITION] = True


def heartbeat_record(ts_ms: int, lsn: int, producer: str) -> dict[str, Any]:
    """The value of a Heartbeat message (``codec.heartbeat_schema``)."""
    return {HB_TS_MS: ts_ms, HB_LSN: lsn, HB_PRODUCER: producer}


# -- reading (consumer side) ------------------------------------------------------------------


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
    #: ``after`` (with UNCHANGED restored) for c/u/r; ``before`` (at least the key) for d;
    #: empty for a truncate (op ``t``), which removes every row captured before its position.
    row: Mapping[str, object]
    #: ``before`` of an update when the producer sent one (a primary-key change needs it).
    before: Mapping[str, object] | None
    closes: bool
    snapshot: bool

    @property
    def position(self) -> Position:
        return Position(self.lsn, self.seq)

    @property
    def truncate(self) -> bool:
        return self.op == TRUNCATE_OP


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
                ts_ms=int(record[HB_TS_MS]),
                lsn=int(record[HB_LSN]),
                producer=str(record[HB_PRODUCER]),
            )
        if schema_name == TRUNCATE_SCHEMA:
            return _truncate(record)
        return _change(record)
    except KeyError as exc:
        raise DecodeError(f"{schema_name} record has no field {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"{schema_name} record is malformed: {exc}") from None


def _row(op: str, record: Mapping[str, Any]) -> Mapping[str, object]:
    """The row a change carries: ``before`` of a delete, else ``after`` with UNCHANGED put back."""
    if op == "d":
        before = record.get(BEFORE)
        if not isinstance(before, dict):
            raise DecodeError("delete event without a before row")
        return before
    after = record.get(AFTER)
    if not isinstance(after, dict):
        raise DecodeError(f"{op} event without an after row")
    unchanged = record.get(UNCHANGED_TOAST)
    if not unchanged:
        return after
    restored = dict(after)
    for col in unchanged:
        if col not in restored:
            raise DecodeError(f"unchanged_toast names {col!r}, which after does not hold")
        restored[col] = UNCHANGED
    return restored


def _closes(tx: object, snapshot: bool) -> bool:
    if tx is None or snapshot:
        return True
    if isinstance(tx, dict):
        return bool(tx.get(TX_LAST_IN_PARTITION, False))
    raise DecodeError(f"transaction block is {type(tx).__name__}, unexpected")


def _table_of(source: Mapping[str, Any]) -> tuple[str, str]:
    schema, table = source[SRC_SCHEMA], source[SRC_TABLE]
    if type(schema) is not str or type(table) is not str:
        raise DecodeError("source.schema and source.table must be strings")
    return schema, table


def _truncate(record: Mapping[str, Any]) -> Change:
    source = record[SOURCE]
    if record[OP] != TRUNCATE_OP:
        raise DecodeError(f"truncate event op {record[OP]!r} is not {TRUNCATE_OP}")
    schema, table = _table_of(source)
    return Change(
        schema=schema,
        table=table,
        op=TRUNCATE_OP,
        lsn=int(source[SRC_LSN]),
        seq=int(source[SRC_SEQ]),
        ts_ms=int(source[SRC_TS_MS]),
        row={},
        before=None,
        closes=_closes(record.get(TRANSACTION), False),
        snapshot=False,
    )


def _change(record: Mapping[str, Any]) -> Change:
    source = record[SOURCE]
    op = record[OP]
    if op not in OPS:
        raise DecodeError(f"change event op {op!r} is none of c, u, d, r")
    row = _row(op, record)
    snapshot = op == SNAPSHOT_OP or source.get(SRC_SNAPSHOT) == "true"
    tx = record.get(TRANSACTION)
    closes = True if tx is None or snapshot else _closes(tx, snapshot)
    schema, table = _table_of(source)
    before = record.get(BEFORE) if op == "u" else None
    lsn, seq, ts_ms = source[SRC_LSN], source[SRC_SEQ], source[SRC_TS_MS]
    # Positional, and int() only where the decoder did not give an int already: this runs
    # once per consumed event.
    return Change(
        schema,
        table,
        op,
        lsn if type(lsn) is int else int(lsn),
        seq if type(seq) is int else int(seq),
        ts_ms if type(ts_ms) is int else int(ts_ms),
        row,
        before if isinstance(before, dict) else None,
        closes,
        snapshot,
    )
