"""Slot safety: one producer per slot, and a slot that is where the producer left it.

* One producer per slot: a session advisory lock derived from the slot name (class ``'cutv'``,
  object ``crc32(slot)``), held for the producer's life; a second producer is refused naming the
  holder's backend.
* At start (:func:`check_slot`), the slot must exist, not be lost, and not be AHEAD of the
  position the producer recorded in ``producer_state`` (write-ahead of every advance, step 4 of
  the commit protocol in :mod:`producers.producer`): a slot ahead moved behind our back, and the
  changes in between may be in no topic.
* Before a re-snapshot (:func:`truncate_stops_ahead`): a TRUNCATE the producer stops on (policy
  "stop") that is still ahead in the slot would stop it again after the reload; ``cutover init
  --resnapshot`` refuses then, naming the command that carries it.
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
from cutover.mapping import MappingSpec
from producers import pgoutput, truncates
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


def slot_in_use(slot: str, active_pid: int | None) -> CheckFailed:
    """Another reader holds the slot (at start, or as the stream reader starts replication)."""
    pid = "?" if active_pid is None else str(active_pid)
    return CheckFailed(
        f"slot {slot} is in use by backend pid {pid}: another reader (not a cutover "
        "producer holding the lock) is attached; stop it first (on legacy: SELECT "
        f"pg_terminate_backend({pid})), then run `cutover produce` again"
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
        raise slot_in_use(slot, int(active_pid))
    if log is not None and int(confirmed) < recorded:
        log.info(
            "slot.behind_record",
            slot=slot,
            confirmed=lsn_to_str(int(confirmed)),
            recorded=lsn_to_str(recorded),
            note="crash between record and advance: that range is delivered again",
        )
    return SlotStatus(int(confirmed), recorded, wal_status)


# pgoutput message types a truncate check reads: Begin (commit LSN), Relation (names), Truncate.
_TRUNCATE_CHECK_TYPES: Final = (ord("B"), ord("R"), ord("T"))


def truncate_stops_ahead(
    conn: Conn, slot: str, publication: str, mapping: MappingSpec
) -> list[str]:
    """Why a re-snapshot now would be a trap: every TRUNCATE still ahead in ``slot`` of a table
    whose policy is "stop" (the producer would stop on it again after the reload), with the
    command that carries it. Reads the slot with a peek (never consumes); a missing or lost
    slot holds nothing to stop on."""
    query = (
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version',"
        " '1', 'publication_names', %s) WHERE get_byte(data, 0) = ANY(%s)"
    )
    quoted = '"' + publication.replace('"', '""') + '"'
    try:
        if (
            conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND wal_status <> 'lost'",
                (slot,),
            ).fetchone()
            is None
        ):
            return []
        rows = conn.execute(query, (slot, quoted, list(_TRUNCATE_CHECK_TYPES))).fetchall()
    except psycopg.Error as exc:
        raise _db(exc, f"reading slot {slot} for TRUNCATEs ahead") from None
    names: dict[int, str] = {}
    commit_lsn = 0
    problems: list[str] = []
    for (data,) in rows:
        msg = pgoutput.parse_message(bytes(data))
        if isinstance(msg, pgoutput.Begin):
            commit_lsn = msg.final_lsn
        elif isinstance(msg, pgoutput.Relation):
            names[msg.oid] = msg.qualified_name
        elif isinstance(msg, pgoutput.Truncate):
            stops = [
                name
                for name in (names.get(oid, str(oid)) for oid in msg.relation_oids)
                if _policy(mapping, name) == "stop"
            ]
            if stops:
                problems.append(
                    f"the slot still holds a TRUNCATE of {', '.join(stops)} (commit LSN "
                    f"{lsn_to_str(commit_lsn)}) that the producer stops on "
                    '(on_truncate = "stop"): after a re-snapshot it would stop on it again and '
                    "commerce would lose the reloaded rows; carry it instead: "
                    f"{truncates.resume_command(stops, commit_lsn)}"
                )
    return problems


def _policy(mapping: MappingSpec, qualified: str) -> str | None:
    schema, _, table = qualified.partition(".")
    tm = mapping.tables.get(table)
    return tm.on_truncate if tm is not None and schema == mapping.source_schema else None
