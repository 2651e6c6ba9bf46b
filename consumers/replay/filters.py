"""Replay, pure logic: what to keep (filters, ranges, times) and how fast to play (rates)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cutover.errors import UsageError

_AVRO_NAME = re.compile(r"[^A-Za-z0-9_]")


#: Progress callback: (done, total) messages.
ProgressFn = Callable[[int, int], None]


def _avro_name(name: str) -> str:
    # As cutover.codec names a table's namespace: [A-Za-z0-9_] only.
    cleaned = _AVRO_NAME.sub("_", name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"_{cleaned}"


def table_of_schema(schema_name: str) -> tuple[str, str] | None:
    """(schema, table) of a change envelope named ``cutover.<schema>.<table>.Envelope``."""
    parts = schema_name.split(".")
    if len(parts) == 4 and parts[0] == "cutover" and parts[3] == "Envelope":
        return parts[1], parts[2]
    return None


@dataclass(frozen=True, slots=True)
class Filters:
    """What to keep of a topic range or a file. ``None`` means no restriction."""

    partitions: frozenset[int] | None = None
    from_offset: int | None = None
    to_offset: int | None = None  # exclusive
    from_time_ms: int | None = None
    to_time_ms: int | None = None  # exclusive
    keys: frozenset[bytes] | None = None
    tables: frozenset[str] | None = None  # "table" or "schema.table"

    def __post_init__(self) -> None:
        if self.from_offset is not None and self.from_offset < 0:
            raise UsageError("--from-offset must be 0 or more")
        if self.to_offset is not None and self.to_offset < 0:
            raise UsageError("--to-offset must be 0 or more")
        if (
            self.from_offset is not None
            and self.to_offset is not None
            and self.to_offset <= self.from_offset
        ):
            raise UsageError(
                f"--to-offset {self.to_offset} must be greater than --from-offset "
                f"{self.from_offset} (the range is [from, to): from inclusive, to exclusive)"
            )
        if (
            self.from_time_ms is not None
            and self.to_time_ms is not None
            and self.to_time_ms <= self.from_time_ms
        ):
            raise UsageError("--to-time must be later than --from-time")

    def position(self, partition: int, offset: int, timestamp_ms: int) -> bool:
        """Whether a message at this position is in the range."""
        if self.partitions is not None and partition not in self.partitions:
            return False
        if self.from_offset is not None and offset < self.from_offset:
            return False
        if self.to_offset is not None and offset >= self.to_offset:
            return False
        if self.from_time_ms is not None and timestamp_ms < self.from_time_ms:
            return False
        return self.to_time_ms is None or timestamp_ms < self.to_time_ms

    def content(self, key: bytes | None, table: tuple[str, str] | None) -> bool:
        """Whether a message with this key and source table (None: not a change) is kept."""
        if self.keys is not None and key not in self.keys:
            return False
        if self.tables is not None:
            if table is None:
                return False
            schema, name = table
            return name in self.tables or f"{schema}.{name}" in self.tables
        return True

    @property
    def by_content(self) -> bool:
        return self.keys is not None or self.tables is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "partitions": sorted(self.partitions) if self.partitions is not None else None,
            "from_offset": self.from_offset,
            "to_offset": self.to_offset,
            "from_time_ms": self.from_time_ms,
            "to_time_ms": self.to_time_ms,
            "keys": sorted(k.decode("utf-8", "replace") for k in self.keys)
            if self.keys is not None
            else None,
            "tables": sorted(self.tables) if self.tables is not None else None,
        }


def make_filters(
    *,
    partitions: Sequence[int] | None = None,
    from_offset: int | None = None,
    to_offset: int | None = None,
    from_time: str | None = None,
    to_time: str | None = None,
    keys: Sequence[str] | None = None,
    tables: Sequence[str] | None = None,
) -> Filters:
    """Filters from command-line values (times as ISO 8601; without an offset: UTC)."""
    if from_offset is not None and from_time is not None:
        raise UsageError("give --from-offset or --from-time, not both")
    if to_offset is not None and to_time is not None:
        raise UsageError("give --to-offset or --to-time, not both")
    if partitions is not None and any(p < 0 for p in partitions):
        raise UsageError("--partition must be 0 or more")
    return Filters(
        partitions=frozenset(partitions) if partitions else None,
        from_offset=from_offset,
        to_offset=to_offset,
        from_time_ms=parse_time(from_time, "--from-time") if from_time else None,
        to_time_ms=parse_time(to_time, "--to-time") if to_time else None,
        keys=frozenset(k.encode() for k in keys) if keys else None,
        tables=frozenset(_normalise_table(t) for t in tables) if tables else None,
    )


def _normalise_table(text: str) -> str:
    schema, dot, table = text.rpartition(".")
    if not table:
        raise UsageError(f"--table {text!r}: name a table, e.g. orders or shop.orders")
    return f"{_avro_name(schema)}.{_avro_name(table)}" if dot else _avro_name(table)


def parse_time(text: str, flag: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 time; a time without an offset is UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Rate:
    """Pacing of ``play``: as fast as possible, N events/s, or a multiple of recorded time."""

    kind: Literal["max", "events", "realtime"] = "max"
    value: float = 0.0

    def describe(self) -> str:
        if self.kind == "max":
            return "as fast as possible"
        if self.kind == "events":
            return f"{self.value:g} events/s"
        return f"{self.value:g}x recorded time"


def parse_rate(text: str | None) -> Rate:
    """``None``/``max`` → as fast as possible; ``N`` → N events/s; ``Nx`` → N × recorded time."""
    if text is None or text.strip().lower() in ("", "max"):
        return Rate()
    raw = text.strip().lower()
    kind: Literal["events", "realtime"] = "realtime" if raw.endswith("x") else "events"
    try:
        value = float(raw[:-1] if kind == "realtime" else raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):  # also refuses NaN
        raise UsageError(
            f"--rate {text!r}: use max (default), N events per second (e.g. 5000), or Nx "
            "a multiple of the recorded real time (e.g. 1x, 10x, 0.5x)"
        )
    return Rate(kind, value)


class Pacer:
    """When each played event is due; sleeps the caller until then (pure schedule + sleep)."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.start: float | None = None
        self.first_ts: int | None = None

    def due(self, index: int, timestamp_ms: int) -> float:
        """Seconds after the start at which event ``index`` (0-based) may be played."""
        if self.rate.kind == "events":
            return index / self.rate.value
        if self.rate.kind == "realtime":
            if self.first_ts is None:
                self.first_ts = timestamp_ms
            # Another partition's earlier message plays at once, never before the start.
            return max(0.0, (timestamp_ms - self.first_ts) / 1000.0 / self.rate.value)
        return 0.0

    def delay(self, index: int, timestamp_ms: int) -> float:
        """How long to wait before playing event ``index`` (0 when it is due)."""
        if self.rate.kind == "max":
            return 0.0
        now = self.clock()
        if self.start is None:
            self.start = now
        return max(0.0, self.start + self.due(index, timestamp_ms) - now)


def plan_ranges(
    partitions: Sequence[int],
    watermarks: Mapping[int, tuple[int, int]],
    filters: Filters,
    time_starts: Mapping[int, int] | None = None,
    time_ends: Mapping[int, int] | None = None,
) -> dict[int, tuple[int, int]]:
    """Per partition the offsets [start, end) to read (pure).

    ``watermarks`` are (low, high) at start; ``time_starts``/``time_ends`` are the offsets Kafka
    gave for the from/to times (-1: no message at or after that time).
    """
    out: dict[int, tuple[int, int]] = {}
    for p in partitions:
        if filters.partitions is not None and p not in filters.partitions:
            continue
        low, high = watermarks[p]
        start, end = low, high
        if filters.from_offset is not None:
            start = max(low, filters.from_offset)
        if time_starts is not None and p in time_starts:
            start = high if time_starts[p] < 0 else max(low, time_starts[p])
        start = min(start, high)
        if filters.to_offset is not None:
            end = min(high, filters.to_offset)
        if time_ends is not None and p in time_ends and time_ends[p] >= 0:
            end = min(high, time_ends[p])
        out[p] = (start, max(start, end))
    return out
