"""pgoutput messages as frozen dataclasses, and the raw column values their tuples hold.

:func:`producers.pgoutput.parse_message` builds them from the protocol bytes; column values stay
raw (see :data:`RawValue`) until :func:`producers.pgoutput.decode_tuple` types them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias

from cutover.errors import DecodeError
from cutover.values import Unchanged
from producers.pgoutput.values import Converter, converter


class BinaryValue(bytes):
    """A column value sent in binary (``send``) format, tuple kind ``b``; kept as raw bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"BinaryValue({bytes(self)!r})"


RawValue: TypeAlias = bytes | Unchanged | None
"""One column as sent: text-format ``bytes`` (or a :class:`BinaryValue`), UNCHANGED or NULL."""

RawTuple: TypeAlias = tuple[RawValue, ...]

OldKind: TypeAlias = Literal["K", "O"]
"""``K``: the old tuple holds the replica-identity key columns only (the others are NULL).
``O``: the old tuple is the whole old row (``REPLICA IDENTITY FULL``)."""

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""The PostgreSQL epoch: protocol timestamps count microseconds from here."""


def pg_ts_to_datetime(microseconds: int) -> datetime:
    """Convert a protocol timestamp (microseconds since 2000-01-01 UTC) to an aware datetime."""
    try:
        return PG_EPOCH + timedelta(microseconds=microseconds)
    except OverflowError:
        raise DecodeError(
            f"PostgreSQL timestamp {microseconds} µs since 2000-01-01 is outside datetime's range"
        ) from None


@dataclass(frozen=True, slots=True)
class Begin:
    """``B``: start of a transaction; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_time_us: int
    xid: int

    @property
    def commit_time(self) -> datetime:
        """The commit timestamp as an aware UTC datetime."""
        return pg_ts_to_datetime(self.commit_time_us)


@dataclass(frozen=True, slots=True)
class Commit:
    """``C``: end of a transaction. ``end_lsn`` is where the next transaction's changes start."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int

    @property
    def commit_time(self) -> datetime:
        """The commit timestamp as an aware UTC datetime."""
        return pg_ts_to_datetime(self.commit_time_us)


@dataclass(frozen=True, slots=True)
class Origin:
    """``O``: the transaction was replicated in from origin ``name`` at ``lsn`` there."""

    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a :class:`Relation`, in tuple order."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """``R``: describes a table; sent before the first change to it and after each DDL change.

    ``namespace`` is ``''`` for ``pg_catalog`` (as the protocol sends it). ``replica_identity`` is
    ``relreplident``: ``d`` default (primary key), ``n`` nothing, ``f`` full, ``i`` index.
    """

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    # Resolved once here because decode_tuple runs for every change: (name, converter).
    _plan: tuple[tuple[str, Converter], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        plan = tuple((c.name, converter(c.type_oid)) for c in self.columns)
        object.__setattr__(self, "_plan", plan)

    @property
    def qualified_name(self) -> str:
        """``schema.table`` (``pg_catalog.table`` when the protocol sent an empty namespace)."""
        return f"{self.namespace or 'pg_catalog'}.{self.name}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        """Names of the replica-identity key columns, in column order."""
        return tuple(c.name for c in self.columns if c.is_key)


@dataclass(frozen=True, slots=True)
class TypeMsg:
    """``Y``: names a non-built-in type used by a following Relation message."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """``I``: a new row."""

    relation_oid: int
    new: RawTuple


@dataclass(frozen=True, slots=True)
class Update:
    """``U``: a changed row. ``old``/``old_kind`` are ``None`` when no old tuple was sent (the key
    did not change and replica identity is not FULL)."""

    relation_oid: int
    old: RawTuple | None
    old_kind: OldKind | None
    new: RawTuple


@dataclass(frozen=True, slots=True)
class Delete:
    """``D``: a removed row, identified by ``old`` (key columns for ``K``, whole row for ``O``)."""

    relation_oid: int
    old: RawTuple
    old_kind: OldKind


@dataclass(frozen=True, slots=True)
class Truncate:
    """``T``: one TRUNCATE statement over ``relation_oids``."""

    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """``M``: a ``pg_logical_emit_message`` record (needs the ``messages`` option)."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMsg
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)
