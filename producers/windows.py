"""Hold-back and snapshot windows: the two buffers of the producer's change stream.

* :class:`HoldBack` keeps back the latest event of the open transaction per (topic, partition);
  the next event for that partition releases it with ``last_in_partition = false``, the Commit
  releases the rest with ``last_in_partition = true``. At most one event per partition is held,
  so a 1,000,000-row transaction streams through.
* :class:`ChunkWindow` is one snapshot chunk between its low and high watermark (DBLog): every
  key changed in the stream inside the window is dropped from the chunk, so a streamed change
  always wins over the chunk's older read of the row. :class:`WindowSet` holds a stream's
  windows and emits what each kept when its high watermark's transaction commits.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cutover.values import UNCHANGED
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


#: Encodes and emits one row of a closing chunk (route, row, its index = ``source.seq``, the
#: clock for ``ts_ms``); True when the row was emitted (not withheld).
RowSink = Callable[[TableRoute, dict[str, object], int, int], bool]


class WindowSet:
    """The snapshot windows of one change stream: registered, filtered, closed and emitted.

    The stream tells it what it sees (:meth:`drop_changed` for every row change,
    :meth:`truncated`, :meth:`watermark` for the chunk watermarks); at the Commit of a high
    watermark's transaction :meth:`emit_closing` hands the rows left in each closing window to
    the stream's ``sink`` (op ``r`` at that commit's position, so a streamed change always wins).
    ``completed`` lists the windows that are done (emitted, failed or fenced), for the producer
    to record once their rows are acknowledged.
    """

    __slots__ = ("_by_id", "_by_table", "_closing", "completed")

    def __init__(self) -> None:
        self._by_id: dict[str, ChunkWindow] = {}
        self._by_table: dict[str, list[ChunkWindow]] = {}
        self._closing: list[ChunkWindow] = []
        self.completed: list[ChunkWindow] = []

    @property
    def by_id(self) -> Mapping[str, ChunkWindow]:
        return self._by_id

    def add(self, window: ChunkWindow) -> None:
        """Register a chunk whose watermarks are (or will be) in the stream."""
        self._by_id[window.chunk_id] = window
        self._by_table.setdefault(window.route.qualified, []).append(window)

    def forget(self) -> None:
        self._by_id.clear()
        self._by_table.clear()

    def drop_changed(
        self, route: TableRoute, old: dict[str, object] | None, new: dict[str, object] | None
    ) -> None:
        """A row of ``route`` changed in the stream: its chunk rows are stale."""
        windows = self._by_table.get(route.qualified)
        if not windows:
            return
        partial = new is not None and any(v is UNCHANGED for v in new.values())
        for window in windows:
            if old is not None:
                window.drop(route.pk_of(old))
            if new is not None:
                window.drop(route.pk_of(new), partial=partial)

    def truncated(self, qualified: str) -> None:
        """The table was truncated: the rows read before the TRUNCATE are gone."""
        for window in self._by_table.get(qualified, ()):
            for pk in list(window.rows):
                window.drop(pk)

    def watermark(self, low: bool, chunk_id: str, in_transaction: bool) -> None:
        """A low (``low``) or high watermark of ``chunk_id`` was read."""
        window = self._by_id.get(chunk_id)
        if window is None:
            return  # a chunk of an earlier run (killed before it finished): ignored
        if low:
            window.open()
        elif window.state == "open" and in_transaction:
            # Emitted at the Commit of this transaction, after any held-back event.
            self._closing.append(window)
        else:
            # No low watermark seen: changes in the window were not filtered. The chunk is
            # dropped unemitted; the producer reads it again under new watermarks.
            window.fail()
            self._finish(window)

    def emit_closing(
        self, commit_lsn: int, fenced: Collection[str], clock_ms: Callable[[], int], sink: RowSink
    ) -> None:
        """At the Commit of the high watermarks' transaction: emit what each window kept."""
        for window in self._closing:
            route = window.route
            window.high_lsn = commit_lsn
            if route.mapping.domain in fenced:
                window.fence()  # the runner fails the request: see SnapshotRunner.chunk_done
            else:
                rows = window.close()
                now_ms = clock_ms()
                window.emitted = sum(
                    sink(route, row, index, now_ms) for index, row in enumerate(rows)
                )
            self._finish(window)
        self._closing.clear()

    @property
    def closing(self) -> bool:
        return bool(self._closing)

    def _finish(self, window: ChunkWindow) -> None:
        self._by_id.pop(window.chunk_id, None)
        table_windows = self._by_table.get(window.route.qualified, [])
        if window in table_windows:
            table_windows.remove(window)
        self.completed.append(window)
