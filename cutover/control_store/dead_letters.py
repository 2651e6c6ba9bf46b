"""Dead letters: every poison message gets one ``dead_letters`` row (status ``open``), written
in the same transaction as the batch's good rows; ``cutover dlq retry`` moves it to ``retried``
(or notes its new error), an operator to ``resolved``.

Producer dead letters (``producer_dead_letters``, in legacy next to the slot) are the rows the
producer could not carry (:mod:`producers.row_letters`); the producer resolves one itself when
a later full image of the same row is delivered. The gates and ``cutover dlq list`` read both.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final, NamedTuple

import psycopg
from psycopg import sql

from cutover.control_store.store import ControlStore

TABLE: Final = "dead_letters"

#: The columns an insert fills, in the order of the tuples :func:`insert` takes.
COLUMNS: Final = (
    "group_id",
    "domain",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "message_key",
    "payload",
    "error_class",
    "error_message",
    "source_table",
)

#: The columns :func:`list_rows` returns, in :class:`Letter` order.
LIST_COLUMNS: Final = (
    "id",
    "group_id",
    "domain",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "source_table",
    "error_class",
    "error_message",
    "status",
    "created_at",
    "resolved_at",
)


class Letter(NamedTuple):
    """One ``dead_letters`` row as listed (without key and payload)."""

    id: int
    group_id: str
    domain: str | None
    topic: str
    partition: int
    offset: int
    source_table: str | None
    error_class: str
    error_message: str
    status: str
    created_at: datetime
    resolved_at: datetime | None


class OpenLetter(NamedTuple):
    """An open dead letter to retry, with its message."""

    id: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    payload: bytes | None


def _ids(names: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def insert_query(control_schema: str) -> sql.Composed:
    """One dead letter (positional parameters in :data:`COLUMNS` order).

    A redelivered poison message (after a crash before COMMIT the batch is redone) finds its
    row and changes nothing: one row per (group, topic, partition, offset).
    """
    return sql.SQL(
        "INSERT INTO {t} ({cols}) VALUES ({vals}) "
        "ON CONFLICT (group_id, topic, kafka_partition, kafka_offset) DO NOTHING"
    ).format(
        t=sql.Identifier(control_schema, TABLE),
        cols=_ids(COLUMNS),
        vals=sql.SQL(", ").join(sql.Placeholder() for _ in COLUMNS),
    )


def insert(store: ControlStore, rows: Sequence[Sequence[object]]) -> None:
    """Insert dead letters (tuples in :data:`COLUMNS` order) in the open transaction."""
    if not rows:
        return
    try:
        with store.conn.cursor() as cur:
            cur.executemany(insert_query(store.schema), rows)
    except psycopg.Error as exc:
        raise store.error(exc, "recording dead letters") from None


def list_rows(store: ControlStore, status: str | None = None) -> list[Letter]:
    """Dead letters oldest first (only those in ``status`` when given)."""
    where = sql.SQL(" WHERE status = %(status)s") if status is not None else sql.SQL("")
    query = sql.SQL("SELECT {cols} FROM {t}{where} ORDER BY id").format(
        cols=_ids(LIST_COLUMNS), t=store.table(TABLE), where=where
    )
    rows = store.execute(query, {"status": status}, doing="listing dead letters").fetchall()
    return [Letter(*row) for row in rows]


def lock_open(store: ControlStore, letter_id: int | None = None) -> list[OpenLetter]:
    """Open dead letters to retry (one by id, or all), locked against a parallel retry."""
    where = sql.SQL(" AND id = %(id)s") if letter_id is not None else sql.SQL("")
    query = sql.SQL(
        "SELECT id, topic, kafka_partition, kafka_offset, message_key, payload FROM {t} "
        "WHERE status = 'open'{where} ORDER BY id FOR UPDATE SKIP LOCKED"
    ).format(t=store.table(TABLE), where=where)
    rows = store.execute(query, {"id": letter_id}, doing="reading open dead letters").fetchall()
    return [OpenLetter(*row) for row in rows]


def mark_retried(store: ControlStore, letter_id: int) -> None:
    store.execute(
        sql.SQL("UPDATE {} SET status = 'retried', resolved_at = now() WHERE id = %s").format(
            store.table(TABLE)
        ),
        [letter_id],
        doing="marking a dead letter retried",
    )


def note_retry_failure(
    store: ControlStore, letter_id: int, error_class: str, error_message: str
) -> None:
    """A retried letter failed again: it stays open, with its new error."""
    store.execute(
        sql.SQL("UPDATE {} SET error_class = %s, error_message = %s WHERE id = %s").format(
            store.table(TABLE)
        ),
        [error_class, error_message, letter_id],
        doing="recording a dead letter's new error",
    )


def open_by_domain(store: ControlStore) -> dict[str, int]:
    """Open dead letters per domain ("" for those whose domain is unknown)."""
    rows = store.execute(
        sql.SQL(
            "SELECT coalesce(domain, ''), count(*) FROM {} WHERE status = 'open' GROUP BY 1"
        ).format(store.table(TABLE)),
        doing=f"reading {store.schema}.{TABLE}",
    ).fetchall()
    return {str(d): int(c) for d, c in rows}


def open_of_domain(store: ControlStore, domain: str, topic: str) -> tuple[int, tuple[int, ...]]:
    """How many dead letters of ``domain`` (or its ``topic``) are open, and the first ten ids."""
    row = store.execute(
        sql.SQL(
            "SELECT count(*), (array_agg(id ORDER BY id))[1:10] FROM {} "
            "WHERE status = 'open' AND (domain = %s OR topic = %s)"
        ).format(store.table(TABLE)),
        [domain, topic],
        doing=f"reading {store.schema}.{TABLE}",
    ).fetchone()
    assert row is not None
    return int(row[0]), tuple(int(i) for i in row[1] or ())


# -- producer dead letters (legacy, schema cutover): rows the producer could not carry -------

PRODUCER_TABLE: Final = "producer_dead_letters"


class ProducerLetter(NamedTuple):
    """One row the producer withheld: where and why, never a value."""

    domain: str
    topic: str
    source_table: str
    row_key: str
    source_lsn: int
    reason: str
    column: str | None


class ProducerLetterRow(NamedTuple):
    """A ``producer_dead_letters`` row as listed."""

    id: int
    letter: ProducerLetter
    status: str
    created_at: datetime
    resolved_at: datetime | None


_PRODUCER_COLUMNS: Final = (
    "domain",
    "topic",
    "source_table",
    "row_key",
    "source_lsn",
    "reason",
    "column_name",
)


def record_producer(store: ControlStore, slot: str, letter: ProducerLetter) -> None:
    """Record one withheld row (a second reading of the same WAL changes nothing)."""
    store.execute(
        sql.SQL(
            "INSERT INTO {t} (slot_name, {cols}) VALUES (%s, {vals}) "
            "ON CONFLICT (slot_name, source_table, row_key, source_lsn) DO NOTHING"
        ).format(
            t=store.table(PRODUCER_TABLE),
            cols=_ids(_PRODUCER_COLUMNS),
            vals=sql.SQL(", ").join(sql.Placeholder() for _ in _PRODUCER_COLUMNS),
        ),
        [slot, *letter],
        doing="recording a producer dead letter",
    )


def open_producer_keys(store: ControlStore, slot: str) -> set[tuple[str, str]]:
    """(source_table, row_key) of the slot's open producer dead letters."""
    rows = store.execute(
        sql.SQL(
            "SELECT DISTINCT source_table, row_key FROM {} WHERE slot_name = %s AND status = 'open'"
        ).format(store.table(PRODUCER_TABLE)),
        [slot],
        doing="reading open producer dead letters",
    ).fetchall()
    return {(str(t), str(k)) for t, k in rows}


def resolve_producer(
    store: ControlStore, slot: str, cleared: Sequence[tuple[str, str, int]]
) -> int:
    """Resolve the open letters of rows a later full image carried: (table, row_key, lsn)."""
    done = 0
    for table, row_key, lsn in cleared:
        cur = store.execute(
            sql.SQL(
                "UPDATE {} SET status = 'resolved', resolved_at = now(), resolved_lsn = %s "
                "WHERE slot_name = %s AND source_table = %s AND row_key = %s "
                "AND status = 'open' AND source_lsn <= %s"
            ).format(store.table(PRODUCER_TABLE)),
            [lsn, slot, table, row_key, lsn],
            doing="resolving producer dead letters",
        )
        done += cur.rowcount
    return done


def list_producer_rows(store: ControlStore, status: str | None = None) -> list[ProducerLetterRow]:
    """Producer dead letters oldest first (only those in ``status`` when given)."""
    where = sql.SQL(" WHERE status = %(status)s") if status is not None else sql.SQL("")
    query = sql.SQL(
        "SELECT id, {cols}, status, created_at, resolved_at FROM {t}{where} ORDER BY id"
    ).format(cols=_ids(_PRODUCER_COLUMNS), t=store.table(PRODUCER_TABLE), where=where)
    rows = store.execute(query, {"status": status}, doing="listing producer dead letters")
    return [
        ProducerLetterRow(int(r[0]), ProducerLetter(*r[1:8]), r[8], r[9], r[10])
        for r in rows.fetchall()
    ]


def producer_open_of_domain(store: ControlStore, domain: str) -> tuple[int, tuple[int, ...]]:
    """How many producer dead letters of ``domain`` are open, and the first ten ids."""
    row = store.execute(
        sql.SQL(
            "SELECT count(*), (array_agg(id ORDER BY id))[1:10] FROM {} "
            "WHERE status = 'open' AND domain = %s"
        ).format(store.table(PRODUCER_TABLE)),
        [domain],
        doing=f"reading {store.schema}.{PRODUCER_TABLE}",
    ).fetchone()
    assert row is not None
    return int(row[0]), tuple(int(i) for i in row[1] or ())
