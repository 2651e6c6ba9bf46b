"""Hold-back and snapshot windows: the two buffers of the producer's change stream.

* :class:`HoldBack` keeps back the latest event of the open transaction per (topic, partition);
  the next event for that partition releases it with ``last_in_partition = false``, the Commit
  releases the rest with ``last_in_partition = true``. At most one event per partition is held,
  so a 1,000,000-row transaction streams through.
* :class:`ChunkWindow` is one snapshot chunk between its low and high watermark (DBLog): every
  key changed in the stream inside the window is dropped from the chunk, so a streamed change
  always wins over the chunk's older read of the row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from producers.routes import TableRoute

T = TypeVar("T")


class HoldBack(Generic[T]):
    """Keep back the latest item per partition so the last one of a transaction can be marked.

    ``push`` returns the item it displaces (to be sent with ``last_in_partition = false``);
    ``drain`` returns every held item (to be sent with ``last_in_partition = true``) and
    forgets them. Holds at most one item per (topic, partition).
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], T] = {}

    def push(self, topic: str, partition: int, item: T) -> T | None:
        slot = (topic, partition)
        previous = self._held.get(slot)
        self._held[slot] = item
        return previous

    def drain(self) -> list[T]:
        items = list(self._held.values())
        self._held.clear()
        return items

    def __len__(self) -> int:
        return len(self._held)


@dataclass(slots=True)
class ChunkWindow:
    """One snapshot chunk between its low and high watermark (the DBLog window).

    ``rows`` maps primary-key tuple → decoded row (published columns), in primary-key order.
    While the window is open every key changed in the stream is removed from ``rows``; at the
    high watermark what remains is emitted.
    """

    chunk_id: str
    route: TableRoute
    rows: dict[tuple[object, ...], dict[str, object]]
    request_id: int = 0
    last_pk: tuple[str, ...] = ()  # text of the last selected primary key (resume point)
    selected: int = 0
    final: bool = False  # the select returned fewer rows than a chunk: the request is done
    state: str = "waiting"  # waiting -> open -> closed (or failed, or fenced)
    dropped: int = 0
    emitted: int = 0
    high_lsn: int = 0
    # Keys dropped because of a streamed UPDATE that left TOAST values out (unchanged): the
    # stream does not carry their whole row, so they must be read again (a key chunk).
    reread: list[tuple[object, ...]] = field(default_factory=list)
    # A key chunk re-reads ``reread`` keys of ``parent`` (whose progress waits for it).
    parent: ChunkWindow | None = None
    keys: tuple[tuple[object, ...], ...] = ()
    attempt: int = 0

    def open(self) -> None:
        if self.state == "waiting":
            self.state = "open"

    def drop(self, key: tuple[object, ...], *, partial: bool = False) -> None:
        """A change of ``key`` was streamed inside the window: the chunk's row is stale."""
        if self.state == "open" and self.rows.pop(key, None) is not None:
            self.dropped += 1
            if partial:
                self.reread.append(key)

    def fail(self) -> None:
        """The high watermark came without the low one: the window cannot be trusted."""
        self.state = "failed"
        self.rows = {}

    def fence(self) -> None:
        """The domain's writes moved to commerce before the high watermark: legacy's rows are
        older than commerce's, so the chunk is never emitted."""
        self.state = "fenced"
        self.rows = {}

    def close(self) -> list[dict[str, object]]:
        """Close the window; the rows to emit, in primary-key order."""
        self.state = "closed"
        rows = list(self.rows.values())
        self.rows = {}
        return rows
