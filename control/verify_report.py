"""The figures of a ``cutover verify`` run (:mod:`control.verify`): its options, the progress it
reports while running, and the report per table, per invariant and for the whole run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from cutover.envelope import lsn_to_str

__all__ = [
    "SAMPLE_KINDS",
    "InvariantReport",
    "TableReport",
    "VerifyOptions",
    "VerifyProgress",
    "VerifyReport",
    "jsonable",
]

SAMPLE_KINDS = ("missing", "extra", "different", "unresolved")


def jsonable(value: object) -> object:
    """A key or value as JSON can hold it (anything but int, str, bool and None as text)."""
    if isinstance(value, int | str | bool) or value is None:
        return value
    return str(value)


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    """Tuning of a verify run. The defaults suit tables of millions of rows on a small machine."""

    chunk_rows: int = 100_000
    #: A differing range with at most this many rows (either side) is fetched and diffed.
    fetch_rows: int = 2_000
    #: Buckets per bisection level of a differing range.
    buckets: int = 32
    recheck_timeout_s: float = 30.0
    recheck_poll_s: float = 0.25
    #: More candidate keys than this in one table: no recheck, the first-pass figures stand.
    #: Large, so that consumers catching up on a big backlog (a snapshot just loaded) are
    #: waited for rather than reported; keys are rechecked in batches, memory stays small.
    max_recheck_keys: int = 500_000
    sample_keys: int = 20

    def to_json(self) -> dict[str, object]:
        return {
            "chunk_rows": self.chunk_rows,
            "fetch_rows": self.fetch_rows,
            "buckets": self.buckets,
            "recheck_timeout_s": self.recheck_timeout_s,
            "max_recheck_keys": self.max_recheck_keys,
        }


class VerifyProgress(Protocol):
    """Receives progress of the first pass (the command draws a progress bar with it)."""

    def start(self, total_rows: int) -> None: ...

    def advance(self, table: str, rows: int) -> None: ...

    def phase(self, text: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


@dataclass
class TableReport:
    """The verdict on one table. ``extra`` includes rows the mapping deletes but commerce holds."""

    table: str
    target: str
    domain: str
    legacy_rows: int = 0
    commerce_rows: int = 0
    absent_by_mapping: int = 0
    rows_compared: int = 0
    matching: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    unresolved: int = 0
    transient: int = 0
    chunks: int = 0
    chunks_differing: int = 0
    seconds: float = 0.0
    recheck: str = "not needed"
    samples: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    #: Schema drift found before digesting (the table was then not compared at all).
    drift: list[dict[str, object]] = field(default_factory=list)
    #: Legacy rows whose values the mapping cannot map (key and columns; values never kept).
    unmappable: int = 0
    unmappable_samples: list[dict[str, object]] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        """Commerce differs from mapped legacy (a replication difference)."""
        return self.missing + self.extra + self.different + self.unresolved > 0

    @property
    def passed(self) -> bool:
        return not self.differs and not self.drift and self.unmappable == 0

    def to_json(self) -> dict[str, object]:
        return {
            "table": self.table,
            "target": self.target,
            "domain": self.domain,
            "passed": self.passed,
            "legacy_rows": self.legacy_rows,
            "commerce_rows": self.commerce_rows,
            "absent_by_mapping": self.absent_by_mapping,
            "rows_compared": self.rows_compared,
            "matching": self.matching,
            "missing": self.missing,
            "extra": self.extra,
            "different": self.different,
            "unresolved": self.unresolved,
            "transient": self.transient,
            "chunks": self.chunks,
            "chunks_differing": self.chunks_differing,
            "seconds": round(self.seconds, 3),
            "recheck": self.recheck,
            "samples": self.samples,
            "drift": self.drift,
            "unmappable": self.unmappable,
            "unmappable_samples": self.unmappable_samples,
        }


@dataclass
class InvariantReport:
    """One scenario invariant (the mapping's [invariants.NAME]) and what verify found."""

    name: str
    domain: str
    description: str
    #: Violations of commerce's own (legacy, mapped, does not break the rule for these keys).
    violations: int = 0
    samples: list[dict[str, object]] = field(default_factory=list)
    #: Violations legacy already holds (the invariant run over legacy mapped): not replication
    #: differences, but still a failure (fail-closed: the gate blocks, see docs/CUTOVER.md).
    legacy_violations: int = 0
    legacy_samples: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.violations == 0 and self.legacy_violations == 0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "domain": self.domain,
            "description": self.description,
            "passed": self.passed,
            "violations": self.violations,
            "samples": self.samples,
            "legacy_violations": self.legacy_violations,
            "legacy_samples": self.legacy_samples,
        }


@dataclass
class VerifyReport:
    """The whole run: what ``--json`` prints and ``verify_runs.figures`` stores."""

    run_id: int
    domains: list[str]
    tables: list[TableReport]
    invariants: list[InvariantReport]
    source_lsn_start: int
    source_lsn_end: int
    applied_lsn: dict[str, int | None]
    first_pass_s: float
    elapsed_s: float
    resumed: bool = False

    @property
    def failed_domains(self) -> list[str]:
        failed = {t.domain for t in self.tables if not t.passed}
        failed |= {i.domain for i in self.invariants if not i.passed}
        return sorted(failed)

    @property
    def passed(self) -> bool:
        return not self.failed_domains

    @property
    def legacy_rows(self) -> int:
        return sum(t.legacy_rows + t.absent_by_mapping for t in self.tables)

    @property
    def commerce_rows(self) -> int:
        return sum(t.commerce_rows for t in self.tables)

    def rows_per_s(self) -> float:
        """Legacy rows compared per second of the first pass (per side: both run in parallel)."""
        return self.legacy_rows / self.first_pass_s if self.first_pass_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "passed": self.passed,
            "domains": self.domains,
            "failed_domains": self.failed_domains,
            "resumed": self.resumed,
            "source_lsn_start": lsn_to_str(self.source_lsn_start),
            "source_lsn_end": lsn_to_str(self.source_lsn_end),
            "applied_lsn": {
                d: (None if v is None else lsn_to_str(v)) for d, v in self.applied_lsn.items()
            },
            "legacy_rows": self.legacy_rows,
            "commerce_rows": self.commerce_rows,
            "first_pass_s": round(self.first_pass_s, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "rows_per_s_per_side": round(self.rows_per_s()),
            "tables": [t.to_json() for t in self.tables],
            "invariants": [i.to_json() for i in self.invariants],
        }

    @property
    def differing_domains(self) -> list[str]:
        """Domains where commerce differs from mapped legacy (replication differences only)."""
        failed = {t.domain for t in self.tables if t.differs}
        failed |= {i.domain for i in self.invariants if i.violations}
        return sorted(failed)

    def headline(self) -> str:
        """Why the run failed, in one line: replication differences first, then what verify
        explains (drift, unmappable source values, legacy's own invariant breakage)."""
        explained = [p for p in self.explanations() if p]
        differing = self.differing_domains
        if differing:
            head = f"persistent differences in {', '.join(differing)} (run {self.run_id})"
            return f"{head}: {'; '.join([self.mismatch_summary(), *explained])}"
        return f"verify run {self.run_id} failed: {'; '.join(explained)}"

    def explanations(self) -> list[str]:
        """Drift, unmappable values and legacy invariant breakage, one entry each."""
        out: list[str] = []
        for t in self.tables:
            for d in t.drift:
                out.append(f"schema drift: {d['text']}")
            if t.unmappable:
                keys = ", ".join(
                    f"{json.dumps(s['key'])} ({', '.join(map(str, s['columns']))})"  # type: ignore[call-overload]
                    for s in t.unmappable_samples[:5]
                )
                out.append(
                    f"source value cannot map: {t.unmappable} rows of {t.table} "
                    f"(key (columns): {keys}); fix the legacy values or the mapping"
                )
        for i in self.invariants:
            if i.legacy_violations:
                keys = ", ".join(json.dumps(s["key"]) for s in i.legacy_samples[:5])
                out.append(
                    f"legacy breaks invariant {i.name} for keys {keys} "
                    f"({i.legacy_violations} in all): not a replication difference"
                )
        return out

    def mismatch_summary(self) -> str:
        """One line naming each differing table (with sample keys) and invariant."""
        parts: list[str] = []
        for t in self.tables:
            if not t.differs:
                continue
            figures = ", ".join(
                f"{n} {k}"
                for k, n in (
                    ("missing", t.missing),
                    ("extra", t.extra),
                    ("different", t.different),
                    ("unresolved", t.unresolved),
                )
                if n
            )
            keys = [
                json.dumps(s["key"]) for kind in SAMPLE_KINDS for s in t.samples.get(kind, [])[:3]
            ][:5]
            parts.append(f"{t.target} ({figures}; keys {', '.join(keys)})")
        for i in self.invariants:
            if i.violations:
                parts.append(f"invariant {i.name} ({i.violations} violations)")
        return "; ".join(parts)
