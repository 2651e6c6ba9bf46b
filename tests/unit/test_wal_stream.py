"""The pure parts of the stream reader (producers.wal_stream): the START_REPLICATION command and
its quoting, frame parsing, the status update, the caught-up rule, and read()'s use of them over
a scripted connection."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cutover.config import load_settings
from cutover.errors import CheckFailed, ConfigError, DatabaseError, SlotSafetyError
from producers import wal_stream
from producers.wal_stream import (
    WalStreamReader,
    is_caught_up,
    keepalive,
    start_command,
    status_update,
    transaction_open,
    xlogdata_start,
)

PG_EPOCH_US = 946_684_800 * 1_000_000


def test_start_command_quotes_the_slot_and_the_publication() -> None:
    assert start_command("cutover_slot", "cutover_pub", (0x16 << 32) | 0xB374D848) == (
        b"START_REPLICATION SLOT \"cutover_slot\" LOGICAL 16/B374D848 (proto_version '1',"
        b" publication_names '\"cutover_pub\"', messages 'true')"
    )


def test_start_command_cannot_be_escaped_from() -> None:
    command = start_command('s"x', "p'); DROP \"t", 0).decode()
    assert 'SLOT "s""x" LOGICAL 0/0' in command
    # The publication: a double-quoted name (quotes doubled) inside a string literal (single
    # quotes doubled), exactly what the peek passes as publication_names.
    assert "publication_names '\"p''); DROP \"\"t\"'," in command


def test_frames_are_parsed() -> None:
    frame = b"w" + struct.pack(">QQq", 0x1234, 0x5678, 99) + b"Bpayload"
    assert xlogdata_start(frame) == 0x1234
    assert keepalive(b"k" + struct.pack(">QqB", 0xABC, 5, 1)) == (0xABC, True)
    assert keepalive(memoryview(b"k" + struct.pack(">QqB", 7, 5, 0))) == (7, False)


def test_the_status_update_reports_exactly_the_confirmed_position() -> None:
    now_us = PG_EPOCH_US + 1_000_000
    msg = status_update(0x10, now_us, reply=True)
    assert msg[:1] == b"r" and len(msg) == 34
    assert struct.unpack(">QQQqB", msg[1:]) == (0x10, 0x10, 0x10, 1_000_000, 1)
    assert status_update(0x10, now_us)[-1] == 0


@pytest.mark.parametrize(
    ("wal_end", "target", "in_tx", "expected"),
    [
        (100, 100, False, True),
        (150, 100, False, True),
        (99, 100, False, False),  # still decoding what was flushed when the quiet began
        (150, 100, True, False),  # a keepalive in the middle of a transaction's output
        (150, None, False, False),  # nothing asked yet
    ],
)
def test_the_caught_up_rule(wal_end: int, target: int | None, in_tx: bool, expected: bool) -> None:
    assert is_caught_up(wal_end, target, in_tx) is expected


def test_transaction_tracking_by_message_type() -> None:
    assert transaction_open(b"B...", False) is True
    assert transaction_open(b"I...", True) is True
    assert transaction_open(b"C...", True) is False
    assert transaction_open(b"M...", False) is False  # a non-transactional message


def test_read_mode_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    env = {"CUTOVER_SOURCE_DSN": "postgresql://u@h/db", "CUTOVER_TARGET_DSN": "postgresql://u@h/c"}
    path.write_text("[source]\n")
    assert load_settings(path, env).source.read_mode == "stream"  # the default: decode once
    path.write_text('[source]\nread_mode = "sql"\n')
    assert load_settings(path, env).source.read_mode == "sql"
    path.write_text('[source]\nread_mode = "walsender"\n')
    with pytest.raises(
        ConfigError, match=r"\[source\] read_mode must be one of \['sql', 'stream'\]"
    ):
        load_settings(path, env)


# -- read() over a scripted connection -----------------------------------------------------------


def w(payload: bytes) -> bytes:
    return b"w" + struct.pack(">QQq", 1, 2, 3) + payload


def k(wal_end: int, reply: bool = False) -> bytes:
    return b"k" + struct.pack(">QqB", wal_end, 0, int(reply))


@dataclass
class ScriptedPg:
    """Frames arrive one per poll; ``on_status`` may queue the server's answer."""

    frames: list[bytes]
    sent: list[bytes] = field(default_factory=list)
    on_status: Callable[[ScriptedPg, bytes], None] | None = None
    socket: int = -1

    def get_copy_data(self, async_: int) -> tuple[int, memoryview]:
        if self.frames and self.frames[0] != b"":
            frame = self.frames.pop(0)
            return len(frame), memoryview(frame)
        return 0, memoryview(b"")

    def consume_input(self) -> None:
        if self.frames and self.frames[0] == b"":
            self.frames.pop(0)  # a quiet period ends

    def put_copy_data(self, data: bytes) -> int:
        self.sent.append(data)
        if self.on_status is not None:
            self.on_status(self, data)
        return 1

    def flush(self) -> int:
        return 0


class QuietPoll:
    def __init__(self, pg: ScriptedPg) -> None:
        self.pg = pg

    def poll(self, timeout_ms: int) -> list[Any]:
        # b"" in the script is a quiet period: the first poll over it times out.
        if self.pg.frames and self.pg.frames[0] == b"":
            self.pg.frames.pop(0)
            return []
        return [(self.pg.socket, 1)] if self.pg.frames else []


class FakeCtl:
    def __init__(self, flush: int) -> None:
        self.flush = flush

    def execute(self, query: str, params: Any = None) -> Any:
        flush = self.flush

        class Row:
            def fetchone(self) -> tuple[int]:
                return (flush,)

        return Row()


def _reader(pg: ScriptedPg, flush: int, confirmed: int = 50) -> Any:
    reader: Any = WalStreamReader.__new__(WalStreamReader)
    reader.__dict__.update(
        ctl=FakeCtl(flush),
        slot="s",
        side="source",
        stop=threading.Event(),
        timings={},
        log=None,
        caught_up=False,
        confirmed=confirmed,
        _in_tx=False,
        _pending=None,
        _broken=False,
        _kept_alive=0.0,
        _pg=pg,
        _poll=QuietPoll(pg),
    )
    return reader


def _answer(wal_end: int) -> Callable[[ScriptedPg, bytes], None]:
    """The walsender answers a reply request with a keepalive at ``wal_end``."""

    def on_status(pg: ScriptedPg, data: bytes) -> None:
        if data[-1] == 1:
            pg.frames.append(k(wal_end))

    return on_status


def test_caught_up_only_once_a_keepalive_reaches_the_flush_position() -> None:
    # Quiet, the walsender is still at 150 (< flush 200): not caught up; the next transaction
    # arrives, then the keepalive at 200.
    pg = ScriptedPg([w(b"B1"), w(b"C1"), b""], on_status=_answer(150))
    reader = _reader(pg, flush=200)
    seen: list[bytes] = []

    def handle(data: bytes) -> bool:
        seen.append(data)
        if data == b"C1":
            # Still decoding: the answer is below the flush position read when quiet.
            pg.frames.extend([w(b"B2"), w(b"C2"), b""])
        if data == b"C2":
            pg.on_status = _answer(200)
        return True

    assert reader.read(1000, handle) == 4
    assert reader.caught_up is True
    assert seen == [b"B1", b"C1", b"B2", b"C2"]
    # Every status sent so far reported the confirmed position only.
    assert {struct.unpack(">QQQ", s[1:25]) for s in pg.sent} == {(50, 50, 50)}


def test_a_keepalive_inside_a_transaction_is_not_caught_up() -> None:
    pg = ScriptedPg([w(b"B1"), b"", k(500), w(b"C1"), b""], on_status=_answer(500))
    reader = _reader(pg, flush=200)
    assert reader.read(1000, lambda data: True) == 2
    assert reader.caught_up is True
    assert reader._in_tx is False


def test_read_returns_at_a_transaction_boundary_after_limit() -> None:
    pg = ScriptedPg([w(b"B1"), w(b"I"), w(b"C1"), w(b"B2"), w(b"C2")])
    reader = _reader(pg, flush=200)
    assert reader.read(2, lambda data: True) == 3  # not inside transaction 1
    assert reader.caught_up is False
    assert reader.read(2, lambda data: True) == 2


def test_under_steady_traffic_a_read_returns_at_a_boundary_after_its_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Never quiet, far below the limit: the read still ends (the loop's chunk scheduling and
    checkpoints come round), at a transaction boundary, never inside one."""
    monkeypatch.setattr(wal_stream, "READ_BUDGET_S", 0.0)
    # (Without the budget it would read on until caught up: 5 messages.)
    pg = ScriptedPg([w(b"B1"), w(b"I"), w(b"C1"), w(b"B2"), w(b"C2")], on_status=_answer(200))
    reader = _reader(pg, flush=200)
    assert reader.read(1_000_000, lambda data: True) == 3
    assert reader.caught_up is False and reader._in_tx is False


def test_keepalive_replies_and_confirm_never_lower_the_position() -> None:
    pg = ScriptedPg([])
    reader = _reader(pg, flush=0, confirmed=50)
    reader.confirm(80)
    reader.confirm(60)  # an older position must not move the slot back
    assert [struct.unpack(">Q", s[9:17])[0] for s in pg.sent] == [80, 80]
    reader._keepalive(memoryview(k(90, reply=True)))
    assert struct.unpack(">Q", pg.sent[-1][9:17])[0] == 80


def test_keep_alive_repeats_the_confirmed_position_at_most_once_a_second() -> None:
    """While the producer waits for Kafka: the walsender hears from us (no wal_sender_timeout),
    and the slot never moves past what was confirmed."""
    pg = ScriptedPg([])
    reader = _reader(pg, flush=0, confirmed=70)
    for _ in range(5):
        reader.keep_alive()
    assert [struct.unpack(">QQQ", s[1:25]) for s in pg.sent] == [(70, 70, 70)]
    reader._kept_alive -= wal_stream._KEEP_ALIVE_EVERY_S
    reader.keep_alive()
    assert len(pg.sent) == 2 and wal_stream._KEEP_ALIVE_EVERY_S * 10 < 60


def test_a_flush_waiting_for_kafka_keeps_the_slot_reader_alive() -> None:
    from producers.kafka_io import KafkaOut

    class Stuck:
        """Kafka holds the acks back for three rounds."""

        def __init__(self) -> None:
            self.left = 3

        def flush(self, timeout: float) -> int:
            self.left = max(0, self.left - 1)
            return self.left

    out: Any = KafkaOut.__new__(KafkaOut)
    out.__dict__.update(
        _producer=Stuck(), delivery_timeout_s=60.0, failed=0, failures=[], last_error=None
    )
    calls: list[int] = []
    out.while_waiting = lambda: calls.append(1)
    out.flush()
    assert len(calls) == 2  # once per round that still waits


def test_module_constants_bound_the_waits() -> None:
    assert wal_stream._QUIET_S <= 0.05 and wal_stream._STOP_SLICE_S <= 0.2


def test_errors_are_mapped_at_the_edge() -> None:
    reader = _reader(ScriptedPg([]), flush=0)

    class ActivePid:
        def execute(self, query: str, params: Any = None) -> Any:
            return type("R", (), {"fetchone": lambda self: (4242,)})()

    reader.ctl = ActivePid()
    in_use = reader._translate(psycopg.errors.ObjectInUse("slot active for PID 4242"), "starting")
    assert isinstance(in_use, CheckFailed)
    assert "slot s is in use by backend pid 4242" in in_use.message
    gone = reader._translate(psycopg.errors.UndefinedObject("no slot"), "starting")
    assert isinstance(gone, SlotSafetyError) and "disappeared" in gone.message
    other = reader._translate(
        psycopg.OperationalError("could not connect to postgresql://u:hunter2@h/db"), "reading"
    )
    assert isinstance(other, DatabaseError) and "reading from slot s" in other.message
    assert reader._broken is True  # close() then sends nothing more
