"""The control store on a real database: it lives in the schema it is told (not "cutover"), its
schema file is idempotent, and each table group's API keeps its guarantees (positions never move
backwards, one dead letter per offset, errors name the side the store was told)."""

from __future__ import annotations

import psycopg
import pytest

from cutover.control_store import (
    COMMAND_TABLES,
    CONSUMER_TABLES,
    PRODUCER_TABLES,
    ControlStore,
    dead_letters,
    offsets,
)
from cutover.control_store import producer as producer_state
from cutover.control_store.offsets import OffsetUpdate
from cutover.errors import DatabaseError

pytestmark = pytest.mark.integration

SCHEMA = "ctl_elsewhere"
ALL_TABLES = (*CONSUMER_TABLES, *COMMAND_TABLES, *PRODUCER_TABLES)


def _tables(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)
    ).fetchall()
    return {str(r[0]) for r in rows}


def test_store_creates_every_table_in_its_schema_idempotently(fresh_commerce: str) -> None:
    with psycopg.connect(fresh_commerce, autocommit=True) as conn:
        store = ControlStore(conn, SCHEMA, "source")
        assert store.missing(ALL_TABLES) == list(ALL_TABLES)
        store.ensure()
        store.ensure()  # a second run changes nothing and does not fail
        assert store.missing(ALL_TABLES) == []
        assert _tables(conn, SCHEMA) >= set(ALL_TABLES)
        assert not _tables(conn, "cutover")  # nothing leaked into the default schema


def test_each_role_creates_only_its_own_tables(fresh_commerce: str) -> None:
    """The commands never create the consumers' tables: a missing dead_letters table must stay
    missing (the dead_letters gate fails closed on it)."""
    with psycopg.connect(fresh_commerce, autocommit=True) as conn:
        store = ControlStore(conn, SCHEMA, "target")
        store.ensure("commands")
        assert store.missing(ALL_TABLES) == [*CONSUMER_TABLES, *PRODUCER_TABLES]
        store.ensure("consumer")
        assert store.missing(ALL_TABLES) == list(PRODUCER_TABLES)


def test_table_groups_round_trip(fresh_commerce: str) -> None:
    with psycopg.connect(fresh_commerce, autocommit=True) as conn:
        store = ControlStore(conn, SCHEMA, "target")
        store.ensure()
        # producer_state: write-ahead record that never moves backwards; reset does.
        producer_state.record_position(store, "slot_a", "pub", 100, "test:1")
        producer_state.record_position(store, "slot_a", "pub", 40, "test:1")
        assert producer_state.read_position(store, "slot_a") == 100
        beat = producer_state.read_heartbeat(store, "slot_a")
        assert beat is not None and beat.delivered_lsn == 100 and beat.producer == "test:1"
        producer_state.reset_position(store, "slot_a", "pub", 40)
        assert producer_state.read_position(store, "slot_a") == 40
        assert producer_state.read_position(store, "slot_b") is None
        # snapshots: one initial request per table, never twice.
        assert len(producer_state.ensure_initial_requests(store, "slot_a", ["t1", "t2"])) == 2
        assert producer_state.ensure_initial_requests(store, "slot_a", ["t1", "t2"]) == []
        assert producer_state.unfinished_tables(store, "slot_a", ["t1"]) == 1
        # offsets: claim marks new rows, save stores them, load reads them back.
        parts = [("topic.a", 0), ("topic.a", 1)]
        with conn.transaction():
            offsets.claim(store, "g", parts)
            assert offsets.load(store, "g", parts, lock=True) == {
                p: offsets.NEW_ROW_OFFSET for p in parts
            }
            offsets.save(store, "g", [OffsetUpdate("topic.a", 0, 7, last_source_lsn=5)])
        assert offsets.load(store, "g", parts, lock=False)[("topic.a", 0)] == 7
        stored = offsets.read_group(store, "g", "topic.a")
        assert [(o.partition, o.next_offset, o.last_source_lsn) for o in stored] == [
            (0, 7, 5),
            (1, offsets.NEW_ROW_OFFSET, None),
        ]
        assert offsets.furthest(store)[("topic.a", 0)] == 7
        # dead letters: one row per offset, listed, retried.
        row = ("g", "payment", "topic.a", 0, 3, b"k", b"v", "DecodeError", "bad bytes", None)
        with conn.transaction():
            dead_letters.insert(store, [row, row])
        letters = dead_letters.list_rows(store, "open")
        assert [(x.offset, x.error_class) for x in letters] == [(3, "DecodeError")]
        assert dead_letters.open_by_domain(store) == {"payment": 1}
        assert dead_letters.open_of_domain(store, "payment", "topic.a") == (1, (letters[0].id,))
        with conn.transaction():
            (open_letter,) = dead_letters.lock_open(store)
            assert open_letter.payload == b"v"
            dead_letters.mark_retried(store, open_letter.id)
        assert dead_letters.list_rows(store, "open") == []


def test_errors_name_the_side_the_store_was_told(fresh_commerce: str) -> None:
    with psycopg.connect(fresh_commerce, autocommit=True) as conn:
        store = ControlStore(conn, "no_such_schema", "source")
        with pytest.raises(DatabaseError) as caught:
            producer_state.read_position(store, "slot")
        assert caught.value.side == "source"
        assert "no_such_schema.producer_state" in caught.value.message
