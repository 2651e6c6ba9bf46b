"""Table routes of the CDC producer: where a source table's changes go and how they are encoded.

A :class:`TableRoute` is built once per version of a table's published columns
(:func:`build_route`): its topic (``<prefix>.<domain>``), partition count, writer schema and
encoder, the constant part of its events' ``source`` block, and the value conversions its
columns need. Routing rules (docs/ARCHITECTURE.md is the contract):

* the key of a change is the aggregate id (:func:`cutover.mapping.aggregate_key`) as UTF-8 text;
  its partition is ``crc32(key) % partitions`` (:func:`partition_for`), chosen by the producer so
  that it knows which event is the last of its source transaction in each partition;
* decoded typed values go into the ``Value`` record as they are, except uuid → text and
  unconstrained numeric → exact decimal text (their Avro types are strings); a NaN or
  +-Infinity in a constrained numeric (an Avro decimal) raises
  :class:`~cutover.errors.UncarriableValue`. An unchanged TOAST
  value becomes null *and* its column is listed in ``unchanged_toast`` (:func:`avro_row`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

from cutover import codec
from cutover import envelope as env
from cutover.codec import ColumnSpec, WriterSchema
from cutover.errors import UncarriableValue
from cutover.mapping import TableMapping, aggregate_key
from cutover.values import UNCHANGED
from producers import fast_avro
from producers.change_encoder import ChangeEncoder, Tx, change_encoder

_UUID_OID: Final = 2950

Encoder = Callable[[Mapping[str, Any]], bytes]


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition of a message key: ``crc32(key as UTF-8) % partitions`` (the contract)."""
    data = key.encode() if isinstance(key, str) else key
    return zlib.crc32(data) % partitions


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """The constant part of every event's ``source`` block."""

    version: str
    name: str  # the logical server name: the topic prefix
    db: str
    connector: str = "postgresql"


def _to_text_decimal(value: object) -> object:
    if isinstance(value, Decimal):
        return format(value, "f") if value.is_finite() else str(value)
    return value


def _finite_decimal(value: object) -> object:
    # An Avro decimal has no NaN or +-Infinity (PostgreSQL 14+ numerics do): one row's problem.
    if isinstance(value, Decimal) and not value.is_finite():
        raise UncarriableValue(
            "numeric value is not finite: no Avro decimal representation",
            table="",
            column=None,
            reason="non_finite_decimal",
        )
    return value


def _to_text_uuid(value: object) -> object:
    return str(value) if isinstance(value, UUID) else value


def _converter(col: ColumnSpec) -> Callable[[object], object] | None:
    """How a decoded value must change to fit the column's Avro type (None: as it is)."""
    if col.type_oid == _UUID_OID:
        return _to_text_uuid
    if codec.avro_type(col.type_oid, col.type_modifier) == "string":
        # Unconstrained numeric is carried as exact text; other string types decode to str.
        return _to_text_decimal if col.type_oid == codec.NUMERIC_OID else None
    return _finite_decimal if col.type_oid == codec.NUMERIC_OID else None


@dataclass(frozen=True, slots=True)
class TableRoute:
    """Where and how the changes of one source table go, for one version of its columns."""

    schema: str
    table: str
    mapping: TableMapping
    columns: tuple[ColumnSpec, ...]
    writer: WriterSchema
    topic: str
    partitions: int
    encoder: Encoder
    # Columns whose decoded value needs a conversion or a check (uuid, numeric).
    conversions: tuple[tuple[str, Callable[[object], object]], ...] = ()
    source_block: Mapping[str, Any] = field(default_factory=dict)
    # Writes change events from their parts (producers.change_encoder), byte for byte what
    # ``encoder`` writes for the envelope dict; None: the dict path (another encoder factory).
    change: ChangeEncoder | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    def key_of(self, row: Mapping[str, object]) -> tuple[str, int]:
        """(message key, partition) of a row: the aggregate id, crc32 partitioning."""
        key = aggregate_key(self.mapping, row)
        return key, partition_for(key, self.partitions)

    def key_bytes_of(self, row: Mapping[str, object]) -> tuple[bytes, int]:
        """:meth:`key_of` with the key as the message's bytes (encoded once)."""
        key = aggregate_key(self.mapping, row).encode()
        return key, zlib.crc32(key) % self.partitions

    def pk_of(self, row: Mapping[str, object]) -> tuple[object, ...]:
        return tuple(row.get(c) for c in self.mapping.primary_key)


def build_route(
    mapping: TableMapping,
    schema: str,
    columns: Sequence[ColumnSpec],
    *,
    topic: str,
    partitions: int,
    source: SourceInfo,
    encoder_factory: Callable[[WriterSchema], Encoder] | None = None,
) -> TableRoute:
    """A :class:`TableRoute` for ``schema.table`` with the published ``columns``."""
    cols = tuple(columns)
    writer = codec.writer_schema(codec.envelope_schema(schema, mapping.source_table, cols))
    encoder: Encoder
    if encoder_factory is None:

        def encoder(record: Mapping[str, Any]) -> bytes:
            return codec.encode(writer, record)

    else:
        encoder = encoder_factory(writer)
    conversions = tuple((c.name, conv) for c in cols if (conv := _converter(c)) is not None)
    block = env.source_block(
        version=source.version,
        connector=source.connector,
        name=source.name,
        db=source.db,
        schema=schema,
        table=mapping.source_table,
    )
    header = getattr(encoder, fast_avro.HEADER_ATTR, None)
    return TableRoute(
        change=None if header is None else change_encoder(writer, header, block),
        schema=schema,
        table=mapping.source_table,
        mapping=mapping,
        columns=cols,
        writer=writer,
        topic=topic,
        partitions=partitions,
        encoder=encoder,
        conversions=conversions,
        source_block=block,
    )


def avro_row(route: TableRoute, row: dict[str, object]) -> tuple[dict[str, object], list[str]]:
    """The ``Value`` record of a decoded row (modified in place) and its unchanged-TOAST columns.

    Columns that are not in the route's column list are dropped (they cannot be encoded); the
    caller guarantees the row came from a tuple of this route's Relation.
    """
    unchanged: list[str] = []
    for name, value in row.items():
        if value is UNCHANGED:
            unchanged.append(name)
            row[name] = None
    for name, convert in route.conversions:
        value = row.get(name)
        if value is not None:
            try:
                row[name] = convert(value)
            except UncarriableValue as exc:
                raise UncarriableValue(
                    f"{route.qualified} column {name}: {exc.message}",
                    table=route.qualified,
                    column=name,
                    reason=exc.reason,
                ) from None
    return row, unchanged


@dataclass(slots=True)
class Pending:
    """One encoded-on-hold event: its value (or the record to encode) and where it goes."""

    route: TableRoute
    key: bytes
    partition: int
    #: The envelope record of the dict path (a truncate, or a route without a change encoder).
    record: dict[str, Any] | None
    #: Set for a truncate record (one schema for all tables), else the route's encoder.
    encoder: Encoder | None = None
    #: The value encoded by the route's change encoder, with its last_in_partition offset.
    value: bytearray | None = None
    last_at: int = -1
    #: The row it carries (after, else before) and whether it lists unchanged TOAST columns.
    row: Mapping[str, object] | None = None
    partial: bool = False

    def mark_last(self) -> None:
        """Flag the event as the last of its transaction in its partition."""
        if self.value is not None:
            self.value[self.last_at] = 1
        else:
            assert self.record is not None
            env.mark_last_in_partition(self.record)


def encode_change(
    route: TableRoute,
    op: str,
    old: dict[str, object] | None,
    new: dict[str, object] | None,
    *,
    tx: Tx,
    seq: int,
    order: int | None,
    now_ms: int,
) -> Pending:
    """The event of one change at (``tx``'s commit LSN, ``seq``): ``order`` is its
    data_collection_order, None for a snapshot row (op ``r``, no transaction block). Raises
    :class:`~cutover.errors.UncarriableValue` for a value the envelope cannot carry."""
    before = avro_row(route, old)[0] if old is not None else None
    after, unchanged = avro_row(route, new) if new is not None else (None, [])
    row = after if after is not None else before
    if route.change is not None:
        value, last_at = route.change.change(op, before, after, unchanged, tx, seq, order, now_ms)
        return Pending(route, b"", 0, None, None, value, last_at, row, bool(unchanged))
    record = env.change_record(
        route.source_block,
        op=op,
        before=before,
        after=after,
        unchanged=unchanged,
        position=(tx.commit_lsn, seq),
        tx_id=tx.xid,
        commit_ms=tx.ts_ms,
        now_ms=now_ms,
        transaction=None
        if order is None
        else env.transaction_block(tx.xid, tx.commit_lsn, seq + 1, order),
    )
    return Pending(route, b"", 0, record, None, None, -1, row, bool(unchanged))
