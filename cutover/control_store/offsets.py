"""Consumer offsets: ``consumer_offsets`` holds, per group and partition, the next offset to
consume, written by the apply consumers in the same transaction as the rows (so the position and
the effect commit together); Kafka's committed offsets are only a monitoring hint.

The apply path claims, locks, reads and stores rows inside the transaction its caller opened;
the cutover commands (monitor, gates, verify, init) only read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from psycopg import sql

from cutover.control_store.store import ControlStore

TABLE: Final = "consumer_offsets"

#: Marks an offsets row this transaction created and has not finished writing. It is replaced
#: before COMMIT, so it is never visible to anyone else.
NEW_ROW_OFFSET: Final = -1


@dataclass(slots=True)
class OffsetUpdate:
    """What one partition's offsets row becomes at COMMIT."""

    topic: str
    partition: int
    next_offset: int
    last_source_lsn: int | None = None
    last_source_ts_ms: int | None = None
    last_heartbeat_ms: int | None = None


# Statements of the apply path. Parameters: %(group)s, and the partitions as two parallel arrays
# %(topics)s, %(parts)s.


def claim_query(control_schema: str) -> sql.Composed:
    """Create absent offsets rows (so the fence can lock them); existing rows are left alone."""
    return sql.SQL(
        "INSERT INTO {t} (group_id, topic, kafka_partition, next_offset) "
        "SELECT %(group)s, u.topic, u.part, {new} "
        "FROM unnest(%(topics)s::text[], %(parts)s::int[]) AS u(topic, part) "
        "ON CONFLICT (group_id, topic, kafka_partition) DO NOTHING"
    ).format(t=sql.Identifier(control_schema, TABLE), new=sql.Literal(NEW_ROW_OFFSET))


def read_query(control_schema: str, *, lock: bool) -> sql.Composed:
    """(topic, partition, next_offset) of the given partitions; ``lock`` adds FOR UPDATE."""
    return sql.SQL(
        "SELECT topic, kafka_partition, next_offset FROM {t} "
        "WHERE group_id = %(group)s AND (topic, kafka_partition) IN "
        "(SELECT * FROM unnest(%(topics)s::text[], %(parts)s::int[])) "
        "ORDER BY topic, kafka_partition{lock}"
    ).format(
        t=sql.Identifier(control_schema, TABLE),
        lock=sql.SQL(" FOR UPDATE") if lock else sql.SQL(""),
    )


def upsert_query(control_schema: str) -> sql.Composed:
    """Store next offsets (and source progress) of partitions; arrays in parameter order."""
    return sql.SQL(
        "INSERT INTO {t} AS o (group_id, topic, kafka_partition, next_offset, last_source_lsn, "
        "last_source_ts_ms, last_heartbeat_ms, applied_at) "
        "SELECT %(group)s, u.topic, u.part, u.next, u.lsn, u.ts, u.hb, now() "
        "FROM unnest(%(topics)s::text[], %(parts)s::int[], %(next)s::bigint[], "
        "%(lsn)s::bigint[], %(ts)s::bigint[], %(hb)s::bigint[]) "
        "AS u(topic, part, next, lsn, ts, hb) "
        "ON CONFLICT (group_id, topic, kafka_partition) DO UPDATE SET "
        "next_offset = EXCLUDED.next_offset, "
        "last_source_lsn = COALESCE(EXCLUDED.last_source_lsn, o.last_source_lsn), "
        "last_source_ts_ms = COALESCE(EXCLUDED.last_source_ts_ms, o.last_source_ts_ms), "
        "last_heartbeat_ms = COALESCE(EXCLUDED.last_heartbeat_ms, o.last_heartbeat_ms), "
        "applied_at = now()"
    ).format(t=sql.Identifier(control_schema, TABLE))


def _partition_params(group: str, partitions: Sequence[tuple[str, int]]) -> dict[str, Any]:
    return {
        "group": group,
        "topics": [t for t, _ in partitions],
        "parts": [p for _, p in partitions],
    }


def claim(store: ControlStore, group: str, partitions: Sequence[tuple[str, int]]) -> None:
    """Create the absent rows of ``partitions`` (marked :data:`NEW_ROW_OFFSET`)."""
    store.execute(
        claim_query(store.schema),
        _partition_params(group, partitions),
        doing="claiming consumer offsets",
    )


def load(
    store: ControlStore, group: str, partitions: Sequence[tuple[str, int]], *, lock: bool
) -> dict[tuple[str, int], int]:
    """The stored next offset per (topic, partition) of ``group`` (``lock``: FOR UPDATE)."""
    rows = store.execute(
        read_query(store.schema, lock=lock),
        _partition_params(group, partitions),
        doing="reading consumer offsets",
    ).fetchall()
    return {(str(t), int(p)): int(n) for t, p, n in rows}


def save(store: ControlStore, group: str, updates: Sequence[OffsetUpdate]) -> None:
    """Store the next offsets (and source progress) of ``updates``, in the open transaction."""
    params: dict[str, Any] = {
        "group": group,
        "topics": [u.topic for u in updates],
        "parts": [u.partition for u in updates],
        "next": [u.next_offset for u in updates],
        "lsn": [u.last_source_lsn for u in updates],
        "ts": [u.last_source_ts_ms for u in updates],
        "hb": [u.last_heartbeat_ms for u in updates],
    }
    store.execute(upsert_query(store.schema), params, doing="storing consumer offsets")


# Readings of the cutover commands (monitor, gates, verify, init).


@dataclass(frozen=True, slots=True)
class StoredOffset:
    """One ``consumer_offsets`` row (``applied_at_ms``: epoch milliseconds)."""

    topic: str
    partition: int
    next_offset: int
    last_source_lsn: int | None
    last_source_ts_ms: int | None
    last_heartbeat_ms: int | None
    applied_at_ms: int


def read_group(store: ControlStore, group: str, topic: str | None = None) -> list[StoredOffset]:
    """Every row of ``group`` (of ``topic`` only, when given), by topic and partition."""
    where = sql.SQL(" AND topic = %s") if topic is not None else sql.SQL("")
    query = sql.SQL(
        "SELECT topic, kafka_partition, next_offset, last_source_lsn, last_source_ts_ms, "
        "last_heartbeat_ms, (extract(epoch FROM applied_at) * 1000)::bigint "
        "FROM {} WHERE group_id = %s{} ORDER BY topic, kafka_partition"
    ).format(store.table(TABLE), where)
    params = [group] if topic is None else [group, topic]
    rows = store.execute(query, params, doing=f"reading {store.schema}.{TABLE}").fetchall()
    return [
        StoredOffset(str(t), int(p), int(n), lsn, ts, hb, int(at))
        for t, p, n, lsn, ts, hb, at in rows
    ]


def furthest(store: ControlStore) -> dict[tuple[str, int], int]:
    """The furthest next offset stored per (topic, partition), whatever the group."""
    rows = store.execute(
        sql.SQL(
            "SELECT topic, kafka_partition, max(next_offset) FROM {}"
            " GROUP BY topic, kafka_partition"
        ).format(store.table(TABLE)),
        doing=f"reading {store.schema}.{TABLE}",
    ).fetchall()
    return {(str(t), int(p)): int(n) for t, p, n in rows}
