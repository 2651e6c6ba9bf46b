"""Dead letters: every poison message gets one ``dead_letters`` row (status ``open``), written
in the same transaction as the batch's good rows; ``cutover dlq retry`` moves it to ``retried``
(or notes its new error), an operator to ``resolved``.
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
