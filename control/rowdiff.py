"""Row-level comparison for ``cutover verify``: the diff of rows fetched from both sides, key by
key, and the lag-aware recheck that decides which differing keys are real (pure, no I/O).

The keys :mod:`control.digest` bisects down to are only *candidates*: the databases are read at
slightly different moments while the pipeline runs. :class:`RecheckTracker` decides, round by
round, which candidates are confirmed (the consumers had applied everything up to the legacy
snapshot the row was read in, and the commerce row is not newer than that snapshot, twice in a
row); :func:`applied_position` is how far those consumers are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

__all__ = [
    "DiffKind",
    "FetchedRow",
    "Key",
    "KeyDiff",
    "RecheckTracker",
    "RowsDiff",
    "Verdict",
    "applied_position",
    "classify",
    "compare_values",
    "diff_rows",
    "judge",
    "split_row",
]

Key: TypeAlias = tuple[object, ...]
DiffKind: TypeAlias = Literal["missing", "extra", "deleted_in_source", "different"]


# ---------------------------------------------------------------------------------------------
# Row diffs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchedRow:
    """One row as :func:`rows_sql` returns it, split."""

    key: Key
    deleted: bool
    position: int | None
    values: tuple[object, ...]


def split_row(row: Sequence[object], key_len: int) -> FetchedRow:
    """Split a result row of :func:`rows_sql` / :func:`rows_by_keys_sql`."""
    position = row[key_len + 1]
    return FetchedRow(
        key=tuple(row[:key_len]),
        deleted=bool(row[key_len]),
        position=None if position is None else int(position),  # type: ignore[call-overload]
        values=tuple(row[key_len + 2 :]),
    )


@dataclass(frozen=True, slots=True)
class KeyDiff:
    """One differing key: what kind of difference, and which columns differ (``different``)."""

    key: Key
    kind: DiffKind
    columns: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"key": list(self.key), "kind": self.kind}
        if self.columns:
            out["columns"] = list(self.columns)
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, object]) -> KeyDiff:
        key = value["key"]
        columns = value.get("columns", [])
        assert isinstance(key, list) and isinstance(columns, list)
        return cls(tuple(key), value["kind"], tuple(str(c) for c in columns))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RowsDiff:
    """The diff of a range fetched row by row."""

    matching: int
    legacy_rows: int  # rows the mapping keeps
    commerce_rows: int
    absent: int  # legacy rows the mapping deletes
    diffs: tuple[KeyDiff, ...]


def compare_values(
    columns: Sequence[str], legacy: Sequence[object], commerce: Sequence[object]
) -> tuple[str, ...]:
    """The columns whose values differ (values come typed from the same casts on both sides)."""
    return tuple(c for c, a, b in zip(columns, legacy, commerce, strict=True) if a != b)


def classify(
    columns: Sequence[str], legacy: FetchedRow | None, commerce: FetchedRow | None
) -> KeyDiff | None:
    """The difference between the legacy and commerce rows of one key, None when they agree."""
    if legacy is None or legacy.deleted:
        if commerce is None:
            return None
        key = commerce.key
        return KeyDiff(key, "deleted_in_source" if legacy is not None else "extra")
    if commerce is None:
        return KeyDiff(legacy.key, "missing")
    differing = compare_values(columns, legacy.values, commerce.values)
    return KeyDiff(legacy.key, "different", differing) if differing else None


def diff_rows(
    columns: Sequence[str], legacy: Iterable[FetchedRow], commerce: Iterable[FetchedRow]
) -> RowsDiff:
    """Diff two sets of fetched rows of the same range, key by key."""
    left = {r.key: r for r in legacy}
    right = {r.key: r for r in commerce}
    diffs: list[KeyDiff] = []
    matching = 0
    for key in sorted(set(left) | set(right), key=_sort_key):
        found = classify(columns, left.get(key), right.get(key))
        if found is None:
            if key in right:
                matching += 1
        else:
            diffs.append(found)
    kept = sum(1 for r in left.values() if not r.deleted)
    return RowsDiff(
        matching=matching,
        legacy_rows=kept,
        commerce_rows=len(right),
        absent=len(left) - kept,
        diffs=tuple(diffs),
    )


def _sort_key(key: Key) -> tuple[str, ...]:
    # Keys of one table share their types; sorting by repr keeps mixed NULL-free keys orderable.
    return tuple(f"{type(v).__name__}:{v!r:>40}" for v in key)


# ---------------------------------------------------------------------------------------------
# Lag-aware rechecks
# ---------------------------------------------------------------------------------------------

Verdict: TypeAlias = Literal["match", "pending", "confirmed"]


def judge(
    diff: KeyDiff | None,
    *,
    caught_up: bool,
    commerce_position: int | None,
    snapshot_lsn: int,
) -> Verdict:
    """One recheck round's verdict on a candidate key.

    ``caught_up``: the consumers of the key's domain had applied every source change up to
    ``snapshot_lsn`` (the legacy WAL position the legacy row was read at) when the commerce row
    was read. ``commerce_position``: the position of the commerce row, or of the tombstone of its
    delete, if any. A difference is only evidence of a real mismatch when commerce is neither
    behind (not caught up) nor ahead (its row was written by a change newer than the snapshot).
    """
    if diff is None:
        return "match"
    if not caught_up:
        return "pending"
    if commerce_position is not None and commerce_position > snapshot_lsn:
        return "pending"
    return "confirmed"


@dataclass
class RecheckTracker:
    """Which candidate keys are still open, matched, or confirmed mismatches.

    A key is confirmed after ``rounds_needed`` consecutive ``confirmed`` verdicts: a single
    one can be a race (a source transaction whose commit record precedes the snapshot LSN but that
    was not yet visible to the snapshot); two in a row cannot, because the second snapshot sees it.
    A ``match`` closes the key (it was lag); ``pending`` resets its count.
    """

    rounds_needed: int = 2
    open: dict[Key, int] = field(default_factory=dict)
    matched: set[Key] = field(default_factory=set)
    confirmed: dict[Key, KeyDiff] = field(default_factory=dict)
    last: dict[Key, KeyDiff] = field(default_factory=dict)

    def add(self, keys: Iterable[Key]) -> None:
        for key in keys:
            if key not in self.confirmed and key not in self.matched:
                self.open.setdefault(key, 0)

    def record(self, key: Key, verdict: Verdict, diff: KeyDiff | None) -> None:
        if key not in self.open:
            return
        if verdict == "match" or diff is None:
            del self.open[key]
            self.matched.add(key)
            return
        self.last[key] = diff
        if verdict == "pending":
            self.open[key] = 0
            return
        self.open[key] += 1
        if self.open[key] >= self.rounds_needed:
            del self.open[key]
            self.confirmed[key] = diff

    @property
    def done(self) -> bool:
        return not self.open

    def unresolved(self) -> list[KeyDiff]:
        """Keys still open (at the deadline): their last seen difference."""
        return [self.last[k] for k in self.open if k in self.last]


def applied_position(
    partitions: Iterable[int],
    offsets: Mapping[int, tuple[int, int | None]],
    delivered_lsn: int | None,
    high_watermarks: Mapping[int, int] | None,
) -> int:
    """The source position every partition of a domain has applied (the minimum over them).

    ``offsets``: partition → (next_offset, last_source_lsn) from ``cutover.consumer_offsets``.
    A partition has applied up to its ``last_source_lsn`` (the commit LSN of the last change it
    applied); and, when the consumer has consumed everything in the partition
    (``next_offset >= high watermark``, watermarks read *after* ``delivered_lsn``), up to
    ``delivered_lsn`` (everything the producer delivered up to there was in the partition). The
    second rule is what lets an idle partition count as caught up.
    """
    result: int | None = None
    for p in partitions:
        next_offset, last_lsn = offsets.get(p, (0, None))
        position = last_lsn or 0
        if (
            delivered_lsn is not None
            and high_watermarks is not None
            and p in high_watermarks
            and next_offset >= high_watermarks[p]
        ):
            position = max(position, delivered_lsn)
        result = position if result is None else min(result, position)
    return result or 0
