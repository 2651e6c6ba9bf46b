"""``[source] read_mode = "stream"``: the slot read over the streaming replication protocol.

One ``replication=database`` connection runs ``START_REPLICATION SLOT "s" LOGICAL X/Y
(proto_version '1', publication_names '"pub"', messages 'true')`` (the options of the peek, so
the messages are byte-identical). The walsender decodes each change once and pushes it; there
is no peek that decodes from ``restart_lsn`` again and no ``pg_replication_slot_advance`` that
decodes a third time.

CopyData messages from the server (frames parsed by the pure functions below):

* ``w`` XLogData: 1 + 8 (start LSN) + 8 (end of WAL) + 8 (send time) bytes of header, then
  exactly one pgoutput message (the ``data`` column of a peek);
* ``k`` keepalive: end of WAL sent so far, send time, reply-requested flag.

What we send: the standby status update ``r`` (write = flush = apply = the confirmed position),
only from :meth:`WalStreamReader.confirm` (step 5 of the commit protocol, after every Kafka ack
and the recorded position) or repeating that position (keepalive replies, caught-up probes).
It never reports more than was confirmed, so after a crash ``slot <= record`` holds as with
the SQL reader. The slot's ``confirmed_flush_lsn`` only ever moves forward through us: the
walsender copies whatever flush position it receives, so the first status carries the slot's
own position, never 0 or less.

Caught up, exactly (``--exit-when-idle`` and the idle heartbeats rely on it): when no message
arrived for ``_QUIET_S``, read the WAL flush position X (``pg_current_wal_flush_lsn()``) on the
control connection and ask the walsender for a keepalive. A keepalive's end-of-WAL is the
walsender's ``sentPtr``: every record before it was decoded and its output written to the
socket ahead of the keepalive. So a keepalive with end ``>= X``, received outside a
transaction, proves that everything flushed when the quiet began has been handed over. Data
that is still being decoded (a big backlog can take the server long before the first byte)
keeps the keepalive's end below X.

Memory: one message at a time (libpq's buffer holds what the socket delivered), handed to the
producer as it comes; a message taken while idling waits in :attr:`_pending` (one message).
Errors are mapped at the edge: a dropped slot is the SQL reader's "disappeared" error, a slot
held by another process (SQLSTATE 55006) the start-up check's "in use" refusal, anything else
:func:`cutover.pg.translate` (DSN masked).
"""

from __future__ import annotations

import select
import struct
import threading
import time
from collections.abc import MutableMapping
from typing import Any, Final

import psycopg
from psycopg import pq

from cutover import pg
from cutover.errors import CutoverError, RuntimeFailure
from producers.pgoutput import lsn_to_str
from producers.slot_reader import Conn, Handler, apply_session_settings, ms_since, slot_gone
from producers.slot_safety import slot_in_use

# No message for this long: probe whether the stream is caught up.
_QUIET_S: Final = 0.02
# A read returns at the first transaction boundary after this long, caught up or not: under
# steady traffic the stream is never quiet, and the loop's other duties (the next snapshot
# chunk, the slot confirmation at the checkpoint) must still come round, as between peeks.
READ_BUDGET_S: Final = 0.5
# Longest blocking wait while idle, so that a stop is seen promptly.
_STOP_SLICE_S: Final = 0.1
# While the producer waits for Kafka, the confirmed position is repeated this often: far
# inside wal_sender_timeout (60 s by default), after which the walsender ends the stream.
_KEEP_ALIVE_EVERY_S: Final = 1.0
# How long close() waits for the walsender to apply the final confirmation.
_CLOSE_WAIT_S: Final = 10.0
_XLOGDATA_HEADER: Final = 25
_KEEPALIVE: Final = struct.Struct(">cQqB")
_STATUS: Final = struct.Struct(">cQQQqB")
# PostgreSQL's epoch (2000-01-01) in Unix microseconds.
_PG_EPOCH_US: Final = 946_684_800 * 1_000_000
_W, _K = ord("w"), ord("k")
_BEGIN, _COMMIT = ord("B"), ord("C")


def quote_ident(name: str) -> str:
    """A double-quoted identifier (the replication grammar's, like SQL's)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A single-quoted string literal (quotes doubled; the replication grammar has no escapes)."""
    return "'" + text.replace("'", "''") + "'"


def start_command(slot: str, publication: str, start_lsn: int) -> bytes:
    """``START_REPLICATION`` for ``slot`` with the peek's options (publication quoted as the
    peek quotes it: a double-quoted name inside the string literal)."""
    options = (
        "proto_version '1', publication_names "
        + quote_literal(quote_ident(publication))
        + ", messages 'true'"
    )
    command = (
        f"START_REPLICATION SLOT {quote_ident(slot)} LOGICAL {lsn_to_str(start_lsn)} ({options})"
    )
    return command.encode()


def xlogdata_start(frame: bytes | memoryview) -> int:
    """The WAL start position of an XLogData (``w``) frame."""
    start: int = struct.unpack_from(">Q", frame, 1)[0]
    return start


def keepalive(frame: bytes | memoryview) -> tuple[int, bool]:
    """(end of WAL sent, reply requested) of a keepalive (``k``) frame."""
    _, wal_end, _, reply = _KEEPALIVE.unpack_from(frame)
    return int(wal_end), bool(reply)


def status_update(lsn: int, now_us: int, *, reply: bool = False) -> bytes:
    """The standby status update: written, flushed and applied up to ``lsn``."""
    return _STATUS.pack(b"r", lsn, lsn, lsn, now_us - _PG_EPOCH_US, int(reply))


def is_caught_up(wal_end: int, target: int | None, in_transaction: bool) -> bool:
    """The caught-up rule (module docstring): a keepalive at or past the flush position read
    when the stream went quiet, outside a transaction."""
    return target is not None and wal_end >= target and not in_transaction


def transaction_open(payload: bytes, was_open: bool) -> bool:
    """Whether a transaction is open after the pgoutput message ``payload``."""
    kind = payload[0] if payload else 0
    if kind == _BEGIN:
        return True
    if kind == _COMMIT:
        return False
    return was_open


class WalStreamReader:
    """The :class:`~producers.slot_reader.SlotReader` over ``START_REPLICATION``."""

    def __init__(
        self,
        dsn: str,
        ctl: Conn,
        *,
        slot: str,
        publication: str,
        side: str,
        start_lsn: int,
        stop: threading.Event,
        timings: MutableMapping[str, float],
        application_name: str,
        log: Any = None,
    ) -> None:
        self.ctl = ctl
        self.slot = slot
        self.side = side
        self.stop = stop
        self.timings = timings
        self.log = log
        self.caught_up = False
        # The walsender copies the flush position it is sent: start at the slot's own.
        self.confirmed = start_lsn
        self._in_tx = False
        self._pending: memoryview | None = None
        self._broken = False
        self._kept_alive = 0.0
        self.conn = pg.connect(
            dsn,
            side=side,
            autocommit=True,
            application_name=application_name,
            doing="cannot connect for streaming replication",
            replication="database",
        )
        try:
            apply_session_settings(self.conn, side)
            self._pg = self.conn.pgconn
            self._poll = select.poll()
            self._poll.register(self._pg.socket, select.POLLIN)
            self._start(start_command(slot, publication, start_lsn))
        except BaseException:
            self.conn.close()
            raise

    @property
    def backend_pid(self) -> int:
        """The walsender serving this reader."""
        return int(self._pg.backend_pid)

    # -- the protocol ------------------------------------------------------------------------

    def _start(self, command: bytes) -> None:
        pgc = self._pg
        try:
            pgc.send_query(command)
            while True:
                pgc.consume_input()
                if not pgc.is_busy():
                    break
                self._poll.poll(1000)
            result = pgc.get_result()
        except psycopg.Error as exc:
            raise self._translate(exc, "starting replication") from None
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise self._failure(result, "starting replication")

    def _failure(self, result: pq.abc.PGresult | None, doing: str) -> CutoverError:
        """The error of a failed command or of the stream's end, mapped at the edge."""
        self._broken = True
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            exc: psycopg.Error = psycopg.errors.error_from_result(result)
        else:
            message = self._pg.error_message.decode(errors="replace").strip()
            exc = psycopg.OperationalError(message or "the server ended the replication stream")
        return self._translate(exc, doing)

    def _translate(self, exc: psycopg.Error, doing: str) -> CutoverError:
        self._broken = True
        if exc.sqlstate == "42704":
            return slot_gone(self.slot)
        if exc.sqlstate == "55006":
            return slot_in_use(self.slot, self._active_pid())
        return pg.translate(exc, f"{doing} from slot {self.slot}", self.side)

    def _active_pid(self) -> int | None:
        try:
            row = self.ctl.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
            ).fetchone()
        except psycopg.Error:
            return None
        return None if row is None or row[0] is None else int(row[0])

    def _next(self, timeout: float) -> memoryview | None:
        """The next CopyData frame, or None when none arrived within ``timeout``."""
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        pgc = self._pg
        try:
            while True:
                size, data = pgc.get_copy_data(1)
                if size > 0:
                    return memoryview(data)
                if size < 0:
                    raise self._failure(pgc.get_result(), "reading")
                if not self._poll.poll(int(timeout * 1000)):
                    return None
                pgc.consume_input()
        except psycopg.Error as exc:
            raise self._translate(exc, "reading") from None

    def _send_status(self, *, reply: bool = False) -> None:
        pgc = self._pg
        try:
            status = status_update(self.confirmed, time.time_ns() // 1000, reply=reply)
            if pgc.put_copy_data(status) != 1:
                raise psycopg.OperationalError(pgc.error_message.decode(errors="replace"))
            while pgc.flush() == 1:
                select.select([], [pgc.socket], [], 1.0)
        except psycopg.Error as exc:
            raise self._translate(exc, "confirming a position") from None

    def _keepalive(self, frame: memoryview) -> int:
        wal_end, reply = keepalive(frame)
        if reply:
            self._send_status()
        return wal_end

    def _flush_lsn(self) -> int:
        try:
            row = self.ctl.execute(
                "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint"
            ).fetchone()
        except psycopg.Error as exc:
            raise pg.translate(exc, "reading the WAL flush position", self.side) from None
        assert row is not None
        return int(row[0])

    # -- SlotReader ----------------------------------------------------------------------------

    def read(self, limit: int, handle: Handler) -> int:
        """Messages as the walsender pushes them, until ``limit`` (at a transaction boundary),
        a stop, :data:`READ_BUDGET_S`, or caught up (module docstring)."""
        rows = 0
        self.caught_up = False
        target: int | None = None
        go_on = True
        until = time.monotonic() + READ_BUDGET_S
        while True:
            frame = self._next(_QUIET_S)
            if frame is None:
                if not self._in_tx and (not go_on or self.stop.is_set()):
                    return rows
                if target is None:
                    target = self._flush_lsn()
                self._send_status(reply=True)  # the walsender answers with a keepalive
                continue
            kind = frame[0]
            if kind == _W:
                payload = bytes(frame[_XLOGDATA_HEADER:])
                self._in_tx = transaction_open(payload, self._in_tx)
                rows += 1
                go_on = handle(payload) and go_on
                if not self._in_tx and (
                    not go_on or rows >= limit or self.stop.is_set() or time.monotonic() >= until
                ):
                    return rows
            elif kind == _K:
                if is_caught_up(self._keepalive(frame), target, self._in_tx):
                    self.caught_up = True
                    return rows
            else:
                raise RuntimeFailure(
                    f"unexpected replication message {bytes(frame[:1])!r} from slot {self.slot}"
                )

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._pending is None and not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            frame = self._next(min(left, _STOP_SLICE_S))
            if frame is None:
                continue
            if frame[0] == _K:
                self._keepalive(frame)
            else:
                self._pending = frame  # data: read() takes it first

    def confirm(self, lsn: int) -> None:
        t0 = time.monotonic()
        # Never lower: the walsender would move the slot back.
        self.confirmed = max(self.confirmed, lsn)
        self._send_status()
        self.timings["advance_ms"] = ms_since(t0)

    def keep_alive(self) -> None:
        # Sends only: what the walsender pushes meanwhile waits in the socket (bounded
        # memory); the walsender reads our status while it waits to send more.
        now = time.monotonic()
        if now - self._kept_alive >= _KEEP_ALIVE_EVERY_S and not self._broken:
            self._kept_alive = now
            self._send_status()

    def close(self) -> None:
        """Final confirmation, applied by the walsender before the connection goes."""
        try:
            if not self._broken:
                self._send_status()
                self._await_confirmed()
        except (psycopg.Error, CutoverError) as exc:
            if self.log is not None:
                self.log.warning("slot.final_confirm_failed", error=str(exc))
        finally:
            self.conn.close()

    def _await_confirmed(self) -> None:
        """Wait until the slot shows the last confirmation (the status update is asynchronous)."""
        deadline = time.monotonic() + _CLOSE_WAIT_S
        while time.monotonic() < deadline:
            row = self.ctl.execute(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (self.slot,),
            ).fetchone()
            if row is None or (row[0] is not None and int(row[0]) >= self.confirmed):
                return
            time.sleep(0.01)
        if self.log is not None:
            self.log.warning("slot.final_confirm_pending", lsn=lsn_to_str(self.confirmed))
