"""The change envelope of one table route encoded straight from its parts: the producer's hot path.

:func:`producers.fast_avro.encoder_for` encodes a record *dict*, so every change event used to
build the ``source`` and ``transaction`` dicts (:func:`cutover.envelope.change_record`) only for
the encoder to read them back field by field: ~20 varints and 8 strings per event, most of
them the same for every event of a table (``source.version`` ... ``source.table``) or of a
source transaction (``source.ts_ms``, ``txId``, ``lsn``, ``transaction.id``).
:class:`ChangeEncoder` writes those as bytes computed once (per route, per transaction), and
only the row (the generated ``Value`` writer), ``seq``, the op, ``ts_ms`` and the orders per
event.

The output is byte-identical to ``encoder_for(writer)(change_record(...))``: the layout below
is checked against the writer schema when the encoder is built (:func:`change_encoder` returns
None for any other layout, and the caller keeps the dict path), and unit tests compare both
paths (tests/unit/test_producer_wire.py pins the bytes).

``transaction.last_in_partition`` is a one-byte boolean near the end of the value:
:meth:`ChangeEncoder.change` returns the buffer and that byte's offset, so a held-back event is
marked by setting one byte (``buf[offset] = 1``) instead of being encoded when released.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

from cutover import envelope as env
from cutover.codec import WriterSchema
from producers.fast_avro import Unsupported, row_writer, write_long, write_str

_SOURCE_FIELDS: Final = (
    env.SRC_VERSION, env.SRC_CONNECTOR, env.SRC_NAME, env.SRC_TS_MS, env.SRC_SNAPSHOT,
    env.SRC_DB, env.SRC_SCHEMA, env.SRC_TABLE, env.SRC_TX_ID, env.SRC_LSN, env.SRC_SEQ,
)  # fmt: skip
_TX_FIELDS: Final = (
    env.TX_ID, env.TX_TOTAL_ORDER, env.TX_DATA_COLLECTION_ORDER, env.TX_LAST_IN_PARTITION,
)  # fmt: skip
_OPS: Final = ("c", "u", "d", "r")
#: The enum index of each op as its one-byte zigzag varint.
OP_BYTE: Final = {op: 2 * i for i, op in enumerate(_OPS)}

RowWriter = Callable[[bytearray, Mapping[str, Any]], None]


class Tx(Protocol):
    """What an event needs of its source transaction (the producer's TxContext)."""

    @property
    def xid(self) -> int: ...
    @property
    def commit_lsn(self) -> int: ...
    @property
    def ts_ms(self) -> int: ...


def _names(record: Any) -> tuple[str, ...]:
    return tuple(str(f["name"]) for f in record["fields"])


def _check_layout(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``Value`` record schema, after checking the envelope is the layout written here."""
    fields = {f["name"]: f for f in schema.get("fields", ())}
    if _names(schema) != env.FIELDS:
        raise Unsupported("envelope fields")
    source = fields[env.SOURCE]["type"]
    if not isinstance(source, dict) or _names(source) != _SOURCE_FIELDS:
        raise Unsupported("source fields")
    kinds = {f["name"]: f["type"] for f in source["fields"]}
    longs = (env.SRC_TS_MS, env.SRC_TX_ID, env.SRC_LSN, env.SRC_SEQ)
    if any(kinds[n] != ("long" if n in longs else "string") for n in _SOURCE_FIELDS):
        raise Unsupported("source field types")
    tx = fields[env.TRANSACTION]["type"]
    if not (isinstance(tx, list) and len(tx) == 2 and tx[0] == "null"):
        raise Unsupported("transaction union")
    block = tx[1]
    tx_kinds = ["string", "long", "long", "boolean"]
    if _names(block) != _TX_FIELDS or [f["type"] for f in block["fields"]] != tx_kinds:
        raise Unsupported("transaction fields")
    op = fields[env.OP]["type"]
    if not isinstance(op, dict) or tuple(op.get("symbols", ())) != _OPS:
        raise Unsupported("op symbols")
    if fields[env.TS_MS]["type"] != "long" or fields[env.UNCHANGED_TOAST]["type"] != {
        "type": "array",
        "items": "string",
    }:
        raise Unsupported("ts_ms or unchanged_toast")
    before, after = fields[env.BEFORE]["type"], fields[env.AFTER]["type"]
    if not (isinstance(before, list) and before[0] == "null" and isinstance(before[1], dict)):
        raise Unsupported("before union")
    if after != ["null", before[1]["name"]] and after != ["null", before[1]]:
        raise Unsupported("after union")
    value: dict[str, Any] = before[1]
    return value


def _strings(*texts: str) -> bytes:
    out = bytearray()
    for text in texts:
        write_str(out, text)
    return bytes(out)


class ChangeEncoder:
    """Encodes the change events of one route (see the module docstring)."""

    __slots__ = ("_head", "_mid", "_now", "_now_b", "_row", "_tx_id", "_tx_key", "_tx_source")

    def __init__(self, header: bytes, row: RowWriter, source: Mapping[str, Any]) -> None:
        self._head = header
        self._row = row
        # source.version, connector, name | ts_ms, snapshot | db, schema, table | txId, lsn, seq
        self._mid = (
            _strings(source[env.SRC_VERSION], source[env.SRC_CONNECTOR], source[env.SRC_NAME]),
            _strings(source[env.SRC_DB], source[env.SRC_SCHEMA], source[env.SRC_TABLE]),
        )
        self._tx_key: tuple[int, int, int, bool] | None = None
        self._tx_source = b""
        self._tx_id = b""
        self._now = -1
        self._now_b = b""

    def _source(self, commit_ms: int, tx_id: int, lsn: int, snapshot: bool) -> bytes:
        """``source`` up to ``seq`` (the same for every event of a transaction)."""
        key = (commit_ms, tx_id, lsn, snapshot)
        if key != self._tx_key:
            out = bytearray(self._mid[0])
            write_long(out, commit_ms)
            write_str(out, "true" if snapshot else "false")
            out += self._mid[1]
            write_long(out, tx_id)
            write_long(out, lsn)
            self._tx_source = bytes(out)
            tx = bytearray(b"\x02")  # the transaction union's second branch
            write_str(tx, f"{tx_id}:{lsn}")
            self._tx_id = bytes(tx)
            self._tx_key = key
        return self._tx_source

    def change(  # noqa: PLR0917 - once per event: positional binds cheapest
        self,
        op: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        unchanged: Sequence[str],
        tx: Tx,
        seq: int,
        order: int | None,
        now_ms: int,
    ) -> tuple[bytearray, int]:
        """The encoded event and the offset of its ``last_in_partition`` byte (-1: none).

        ``seq`` is the event's position in ``tx``; ``order`` its data_collection_order in a
        streamed change (total_order is ``seq + 1``), None for a snapshot row (a null
        transaction block, flagged in ``source.snapshot``)."""
        out = bytearray(self._head)
        append = out.append
        if before is None:
            append(0)
        else:
            append(2)
            self._row(out, before)
        if after is None:
            append(0)
        else:
            append(2)
            self._row(out, after)
        out += self._source(tx.ts_ms, tx.xid, tx.commit_lsn, order is None)
        write_long(out, seq)
        append(OP_BYTE[op])
        if now_ms != self._now:
            now = bytearray()
            write_long(now, now_ms)
            self._now, self._now_b = now_ms, bytes(now)
        out += self._now_b
        last = -1
        if order is None:
            append(0)
        else:
            out += self._tx_id
            write_long(out, seq + 1)
            write_long(out, order)
            last = len(out)
            append(0)
        if unchanged:
            write_long(out, len(unchanged))
            for name in unchanged:
                write_str(out, name)
        append(0)
        return out, last


def change_encoder(
    writer: WriterSchema, header: bytes, source: Mapping[str, Any]
) -> ChangeEncoder | None:
    """The :class:`ChangeEncoder` of ``writer`` (values framed with ``header``), or None when
    the schema is not the envelope layout it writes."""
    try:
        schema = json.loads(writer.json)
        value = _check_layout(schema)
        return ChangeEncoder(header, row_writer(value, str(schema.get("namespace", ""))), source)
    except (Unsupported, KeyError, TypeError, IndexError):
        return None
