"""How the producer reads its slot: the :class:`SlotReader` interface and the SQL (peek) reader.

``[source] read_mode`` picks one of two readers; both hand the producer the raw pgoutput
messages of whole transactions and confirm a position only when the producer says so (step 5
of the commit protocol in :mod:`producers.producer`, after every Kafka ack and the recorded
position):

* ``"sql"`` (:class:`PeekReader`): ``pg_logical_slot_peek_binary_changes`` through a
  server-side cursor, then ``pg_replication_slot_advance``. Every peek decodes the WAL from the
  slot's ``restart_lsn`` and the advance decodes it again.
* ``"stream"`` (:class:`producers.wal_stream.WalStreamReader`): the streaming replication
  protocol (``START_REPLICATION ... LOGICAL``); the walsender decodes each change once and
  pushes it; confirming is a standby status update.

Both readers' messages are byte-identical (pgoutput's text output of a value depends on the
decoding session's settings, :data:`SESSION_SETTINGS`, which both sessions get).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final, Protocol

import psycopg
from psycopg import sql

from cutover import pg
from cutover.errors import SlotSafetyError
from producers.pgoutput import lsn_to_str

Conn = psycopg.Connection[Any]
# Called with each raw pgoutput message; False asks the reader to stop at the next boundary.
Handler = Callable[[bytes], bool]

# The type output functions run in the decoding session: fix what producers.pgoutput assumes.
SESSION_SETTINGS: Final = (
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
)

_ITERSIZE: Final = 5_000


def apply_session_settings(conn: Conn, side: str) -> None:
    """:data:`SESSION_SETTINGS` for ``conn`` (a walsender session takes plain SQL too)."""
    try:
        for setting, value in SESSION_SETTINGS:
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(setting), sql.Literal(value)))
        if not conn.autocommit:
            conn.commit()
    except psycopg.Error as exc:
        raise pg.translate(exc, "cannot connect", side) from None


class SlotReader(Protocol):
    """What the producer needs from a reader of its slot."""

    #: After :meth:`read`: everything in the WAL when the read went quiet has been handed over.
    caught_up: bool

    def read(self, limit: int, handle: Handler) -> int:
        """Hand whole transactions to ``handle``; return after about ``limit`` messages, when
        caught up, or (at a transaction boundary) when ``handle`` returns False. Returns the
        number of messages handed over."""

    def wait(self, timeout: float) -> None:
        """Idle: return after ``timeout``, on stop, or (streaming) as soon as data arrives."""

    def confirm(self, lsn: int) -> None:
        """Step 5: the slot may release everything up to ``lsn`` (acknowledged and recorded)."""

    def keep_alive(self) -> None:
        """While the producer waits for Kafka: keep the connection to the slot alive (the
        stream: repeat the confirmed position, at most once a second; it never moves on)."""

    def close(self) -> None:
        """Release the reader's resources (the stream: final confirmation first)."""


def slot_gone(slot: str) -> SlotSafetyError:
    """The slot vanished under a running producer (both readers say it the same way)."""
    return SlotSafetyError(
        f"slot {slot} disappeared while the producer was reading it: possible "
        "data loss, re-snapshot required (`cutover init`, then `cutover init "
        "--resnapshot`)"
    )


def ms_since(start: float) -> float:
    """Milliseconds since ``start`` (a monotonic time), for the cycle timings."""
    return round((time.monotonic() - start) * 1000, 1)


class PeekReader:
    """``read_mode = "sql"``: peek through a server-side cursor, advance on confirm.

    A peek never consumes: the slot moves only by ``pg_replication_slot_advance`` in
    :meth:`confirm`. The peek result is materialised by PostgreSQL in a tuplestore that spills
    to disk and streamed through ``_ITERSIZE`` rows at a time, so a 1,000,000-row transaction
    never sits in client memory.
    """

    def __init__(
        self,
        reader: Conn,
        ctl: Conn,
        *,
        slot: str,
        publication: str,
        side: str,
        stop: threading.Event,
        timings: MutableMapping[str, float],
    ) -> None:
        self.reader = reader
        self.ctl = ctl
        self.slot = slot
        self.publication = publication
        self.side = side
        self.stop = stop
        self.timings = timings
        self.caught_up = False

    def read(self, limit: int, handle: Handler) -> int:
        """One peek of at most ``limit`` messages, streamed through ``handle``."""
        rows = 0
        query = (
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s,"
            " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
        )
        publication = '"' + self.publication.replace('"', '""') + '"'
        t0 = time.monotonic()
        try:
            with self.reader.cursor(name="cutover_peek", binary=True) as cur:
                cur.itersize = _ITERSIZE
                cur.execute(query, (self.slot, limit, publication))
                stopping = False
                first = True
                while not stopping:
                    batch = cur.fetchmany(_ITERSIZE)
                    if first:
                        # The first fetch runs the peek (decoding into a tuplestore): its time.
                        self.timings["peek_ms"] = ms_since(t0)
                        first = False
                    if not batch:
                        break
                    for (data,) in batch:
                        rows += 1
                        if not handle(data):
                            # Everything read so far is delivered and advanced: a signal
                            # need not wait for the rest of a long catch-up peek.
                            stopping = True
                            break
                    # A short fetch is the end of the peek: no round trip for an empty one.
                    stopping = stopping or len(batch) < _ITERSIZE
            self.reader.commit()
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                self.reader.rollback()
            if exc.sqlstate == "42704":
                raise slot_gone(self.slot) from None
            raise pg.translate(exc, f"reading slot {self.slot}", self.side) from None
        # A peek that returned less than asked read everything in the WAL.
        self.caught_up = rows < limit
        return rows

    def wait(self, timeout: float) -> None:
        self.stop.wait(timeout)

    def confirm(self, lsn: int) -> None:
        t0 = time.monotonic()
        try:
            self.ctl.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, lsn_to_str(lsn))
            )
        except psycopg.Error as exc:
            raise pg.translate(exc, f"advancing slot {self.slot}", self.side) from None
        self.timings["advance_ms"] = ms_since(t0)

    def keep_alive(self) -> None:
        """Nothing to keep: no connection holds the slot between peeks."""

    def close(self) -> None:
        self.reader.close()
