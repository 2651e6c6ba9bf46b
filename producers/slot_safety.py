"""Slot safety: one producer per slot, and a slot that is where the producer left it.

* One producer per slot: a session advisory lock derived from the slot name (class ``'cutv'``,
  object ``crc32(slot)``), held for the producer's life; a second producer is refused naming the
  holder's backend.
* At start (:func:`check_slot`), the slot must exist, not be lost, and not be AHEAD of the
  position the producer recorded in ``producer_state`` (write-ahead of every advance, step 4 of
  the commit protocol in :mod:`producers.producer`): a slot ahead moved behind our back, and the
  changes in between may be in no topic.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from cutover import pg
from cutover.control_store import ControlStore
from cutover.control_store import producer as producer_state
from cutover.errors import CheckFailed, ConfigError, DatabaseError, SlotSafetyError
from producers.pgoutput import lsn_to_str

# Advisory lock namespace ('cutv'); the second key is crc32 of the slot name.
_LOCK_CLASS: Final = 0x63757476
# How long a starting producer waits for a slot still held by a (dead producer's) backend.
_SLOT_BUSY_WAIT_S: Final = 30.0

Conn = psycopg.Connection[Any]


def _db(exc: psycopg.Error, doing: str) -> DatabaseError:
    return pg.translate(exc, doing, "source")


def lock_keys(slot: str) -> tuple[int, int, int]:
    """(class key, signed object key for pg_try_advisory_lock, unsigned key as in pg_locks)."""
    unsigned = zlib.crc32(slot.encode())
    signed = unsigned - (1 << 32) if unsigned >= (1 << 31) else unsigned
    return _LOCK_CLASS, signed, unsigned


def acquire_producer_lock(conn: Conn, slot: str) -> None:
    """Hold a session advisory lock for the producer's life; refuse if another producer has it."""
    key1, key2, unsigned = lock_keys(slot)
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (key1, key2)).fetchone()
        if got and got[0]:
            return
        holder = conn.execute(
            "SELECT l.pid, a.application_name, a.client_addr::text FROM pg_locks l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 2"
            " AND l.granted",
            (key1, unsigned),
        ).fetchone()
    except psycopg.Error as exc:
        raise _db(exc, "taking the producer lock") from None
    who = (
        f"backend pid {holder[0]} ({holder[1] or 'unknown application'})"
        if holder
        else "another session"
    )
    raise CheckFailed(
        f"another producer is already running on slot {slot}: {who} holds its lock. "
        "Only one producer may read a slot; stop the other one first"
    )


@dataclass(frozen=True, slots=True)
class SlotStatus:
    confirmed: int
    recorded: int
    wal_status: str | None


def check_slot(
    store: ControlStore, slot: str, *, log: Any = None, busy_wait_s: float = _SLOT_BUSY_WAIT_S
) -> SlotStatus:
    """Slot safety at start: refuse a missing or lost slot, or one AHEAD of our record.

    ``confirmed <= recorded`` is normal (a crash between recording and advancing, or a
    PostgreSQL crash that lost an advance not yet checkpointed): the producer resumes from the
    slot and delivers that range again. ``store`` is the producer's control store, in the
    database of the slot. A slot still held by a backend is waited for a little:
    after a kill -9 the dead producer's backend finishes the peek it was running first.
    """
    deadline = time.monotonic() + busy_wait_s
    while True:
        try:
            row = store.conn.execute(
                "SELECT plugin, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, wal_status,"
                " active_pid, database = current_database() FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            ).fetchone()
        except psycopg.Error as exc:
            raise _db(exc, f"checking slot {slot}") from None
        recorded = producer_state.read_position(store, slot)
        if row is None or row[3] is None or time.monotonic() >= deadline:
            break
        if log is not None:
            log.info("slot.busy_waiting", active_pid=row[3])
        time.sleep(0.5)
    rec = f"{lsn_to_str(recorded)}" if recorded is not None else "nothing"
    if row is None:
        raise SlotSafetyError(
            f"slot {slot} does not exist (the producer had delivered up to {rec}): it was "
            "dropped; changes since then were not captured. Possible data loss, re-snapshot "
            "required: `cutover init` (recreates the slot), then `cutover init --resnapshot`"
        )
    plugin, confirmed, wal_status, active_pid, same_db = row
    if not same_db or plugin != "pgoutput":
        raise ConfigError(f"slot {slot} is not a pgoutput slot of this database")
    if wal_status == "lost":
        raise SlotSafetyError(
            f"slot {slot} is lost (wal_status = lost): PostgreSQL removed WAL it still needed "
            f"(max_slot_wal_keep_size). Possible data loss, re-snapshot required: drop the slot, "
            "`cutover init`, then `cutover init --resnapshot`"
        )
    if recorded is None:
        raise ConfigError(
            f"no delivered position recorded for slot {slot} in {store.schema}.producer_state: "
            "run `cutover init` first"
        )
    if confirmed is None or int(confirmed) > recorded:
        raise SlotSafetyError(
            f"slot {slot} is at {lsn_to_str(int(confirmed or 0))}, AHEAD of the last position "
            f"the producer delivered ({lsn_to_str(recorded)}): it was advanced, or dropped and "
            "recreated, behind the producer's back, so changes in between may be in no topic. "
            "Possible data loss, re-snapshot required: `cutover init --resnapshot`"
        )
    if active_pid is not None:
        raise CheckFailed(
            f"slot {slot} is in use by backend pid {active_pid}: another reader (not a cutover "
            "producer holding the lock) is attached; stop it first"
        )
    if log is not None and int(confirmed) < recorded:
        log.info(
            "slot.behind_record",
            slot=slot,
            confirmed=lsn_to_str(int(confirmed)),
            recorded=lsn_to_str(recorded),
            note="crash between record and advance: that range is delivered again",
        )
    return SlotStatus(int(confirmed), recorded, wal_status)
