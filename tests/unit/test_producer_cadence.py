"""Round trips a producer cycle no longer waits for (the commit-to-applied latency, issue 14):
the peek's empty last FETCH, the slot-lag query in every cycle, BEGIN/COMMIT around the record."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from psycopg import pq

from cutover.control_store import ControlStore
from cutover.control_store import producer as producer_state
from producers import producer as producer_module
from producers.producer import CdcProducer
from producers.slot_reader import _ITERSIZE, PeekReader


@dataclass
class FakeCursor:
    rows: list[tuple[bytes]]
    fetches: list[int] = field(default_factory=list)
    itersize: int = 0

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, query: str, params: Any = None) -> FakeCursor:
        return self

    def fetchmany(self, size: int) -> list[tuple[bytes]]:
        self.fetches.append(size)
        taken, self.rows[:] = self.rows[:size], self.rows[size:]
        return taken

    def fetchone(self) -> tuple[int]:
        return (0,)


@dataclass
class FakeConn:
    cursor_rows: list[tuple[bytes]] = field(default_factory=list)
    autocommit: bool = True
    status: pq.TransactionStatus = pq.TransactionStatus.IDLE
    executed: list[str] = field(default_factory=list)
    transactions: int = 0
    cursors: list[FakeCursor] = field(default_factory=list)

    @property
    def info(self) -> SimpleNamespace:
        return SimpleNamespace(transaction_status=self.status)

    def cursor(self, **kwargs: Any) -> FakeCursor:
        self.cursors.append(FakeCursor(self.cursor_rows))
        return self.cursors[-1]

    def execute(self, query: Any, params: Any = None) -> FakeCursor:
        self.executed.append(str(query))
        return FakeCursor([])

    def transaction(self) -> Any:
        self.transactions += 1
        return FakeCursor([])  # any context manager

    def commit(self) -> None:
        pass


@dataclass
class FakeStream:
    tx: None = None
    changes_in_batch: int = 0
    transactions: int = 0
    fed: list[bytes] = field(default_factory=list)

    def feed(self, data: bytes) -> None:
        self.fed.append(data)


def _producer(**attrs: Any) -> Any:
    producer: Any = CdcProducer.__new__(CdcProducer)
    producer.settings = SimpleNamespace(
        source=SimpleNamespace(slot="s", publication="p", peek_batch=20_000)
    )
    producer.stop = threading.Event()
    producer._timings = {}
    producer._checkpointed_commits = 0
    producer._lag_read = -producer_module._LAG_EVERY_S
    producer.__dict__.update(attrs)
    return producer


def _peek(producer: Any, conn: FakeConn) -> Any:
    """The SQL reader over ``conn``, as the producer's reader."""
    producer.reader = PeekReader(
        conn,  # type: ignore[arg-type]
        conn,  # type: ignore[arg-type]
        slot="s",
        publication="p",
        side="source",
        stop=producer.stop,
        timings=producer._timings,
    )
    return producer


@pytest.mark.parametrize("rows", [0, 3, _ITERSIZE - 1])
def test_a_short_fetch_ends_the_peek_without_an_empty_fetch(rows: int) -> None:
    reader = FakeConn(cursor_rows=[(b"x",)] * rows)
    stream = FakeStream()
    producer = _peek(_producer(stream=stream), reader)
    assert producer._read_once(20_000) == rows
    assert reader.cursors[0].fetches == [_ITERSIZE]
    assert len(stream.fed) == rows


def test_a_full_fetch_asks_again() -> None:
    reader = FakeConn(cursor_rows=[(b"x",)] * (_ITERSIZE + 2))
    producer = _peek(_producer(stream=FakeStream()), reader)
    assert producer._read_once(20_000) == _ITERSIZE + 2
    assert reader.cursors[0].fetches == [_ITERSIZE, _ITERSIZE]


def test_the_slot_lag_is_read_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = FakeConn()
    producer = _producer(ctl=ctl)
    clock = [100.0]
    monkeypatch.setattr("producers.producer.time.monotonic", lambda: clock[0])
    for _ in range(5):  # five checkpoints in the same second
        producer._report_slot_lag()
        clock[0] += 0.1
    assert len(ctl.executed) == 1
    clock[0] += 1.0
    producer._report_slot_lag()
    assert len(ctl.executed) == 2


def test_the_record_is_one_statement_on_an_autocommit_connection() -> None:
    conn = FakeConn()
    producer_state.record_position(ControlStore(conn, "cutover", "source"), "s", "p", 42, "me")  # type: ignore[arg-type]
    assert len(conn.executed) == 1 and "INSERT INTO" in conn.executed[0]
    assert conn.transactions == 0


@pytest.mark.parametrize(
    ("autocommit", "status"),
    [(False, pq.TransactionStatus.IDLE), (True, pq.TransactionStatus.INTRANS)],
)
def test_the_record_keeps_its_own_transaction_otherwise(
    autocommit: bool, status: pq.TransactionStatus
) -> None:
    # Not autocommit, or inside a caller's transaction: a transaction block (or savepoint).
    conn = FakeConn(autocommit=autocommit, status=status)
    producer_state.record_position(ControlStore(conn, "cutover", "source"), "s", "p", 42, "me")  # type: ignore[arg-type]
    assert conn.transactions == 1
