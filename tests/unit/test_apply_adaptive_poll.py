"""The apply consumer's adaptive cadence: wait for the first message only, then drain."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from consumers.apply import ApplyConsumer


@dataclass
class FakeConsumer:
    """Records how it was asked: librdkafka's poll/consume, with a local queue."""

    queue: list[str]
    calls: list[tuple[str, int, float]] = field(default_factory=list)

    def poll(self, timeout: float) -> str | None:
        self.calls.append(("poll", 1, timeout))
        return self.queue.pop(0) if self.queue else None

    def consume(self, n: int, timeout: float) -> list[str]:
        self.calls.append(("consume", n, timeout))
        taken, self.queue[:] = self.queue[:n], self.queue[n:]
        return taken


def _applier(queue: list[str], batch_max: int = 5) -> tuple[Any, FakeConsumer]:
    fake = FakeConsumer(list(queue))
    applier: Any = ApplyConsumer.__new__(ApplyConsumer)
    applier._consumer = fake
    applier.batch_max = batch_max
    applier.settings = SimpleNamespace(apply=SimpleNamespace(batch_max_wait_ms=100))
    return applier, fake


def test_a_trickle_is_returned_without_waiting_for_a_full_batch() -> None:
    applier, fake = _applier(["a", "b"])
    assert applier._poll_adaptive() == ["a", "b"]
    # Blocks (up to the batch wait) only for the first message; the rest is taken as it is.
    assert fake.calls == [("poll", 1, 0.1), ("consume", 4, 0)]


def test_a_backlog_fills_the_batch() -> None:
    applier, fake = _applier([str(i) for i in range(12)])
    assert applier._poll_adaptive() == ["0", "1", "2", "3", "4"]
    assert fake.queue == [str(i) for i in range(5, 12)]


def test_nothing_pending_waits_the_batch_wait_and_returns_nothing() -> None:
    applier, fake = _applier([])
    assert applier._poll_adaptive() == []
    assert fake.calls == [("poll", 1, 0.1)]
