"""The gates of ``cutover switch-reads D``: evidence in, pass/fail with reasons out.

Two halves, kept apart so the decision is testable without services:

* :func:`control.gate_evidence.collect` gathers the :class:`Evidence` of a domain (I/O, each
  probe isolated: a probe that fails becomes evidence of its own ``error`` instead of aborting
  the others);
* :func:`evaluate` turns evidence and thresholds into one :class:`GateResult` per gate, and
  :func:`decide` says whether the switch may go ahead, with ``--force`` or without (pure).

The gates and their thresholds (``[gates]`` in the config):

=================== ====================================================== =================
gate                passes when                                            critical failure
=================== ====================================================== =================
verify              the latest verify covering the domain passed and is    no verify ever
                    younger than ``verify_max_age_minutes``                ran, or the latest
                                                                           found mismatches
apply_lag           Σ over the domain topic's partitions of (Kafka high    —
                    watermark − consumer_offsets.next_offset) is at most
                    ``max_apply_lag_events``
dead_letters        no open (unhandled) dead letter of the domain (a       —
                    missing ``dead_letters`` table fails the gate)
producer_heartbeat  legacy cutover.producer_state.heartbeat_at is younger  —
                    than ``max_heartbeat_age_s``
slot                the replication slot exists and its wal_status is not  slot missing or
                    'lost' (nor 'unreserved': about to be lost)            lost
capture             the publication publishes every table and column the   a table or column
                    mapping reads for the domain (cutover.capture)         is not published
=================== ====================================================== =================

``--force --reason TEXT`` overrides failing gates except critical failures: a missing or lost
slot means commerce can no longer follow legacy (re-snapshot required), so does a mapped table
or column that is no longer published (its changes are withheld), a verify that found
persistent differences means commerce is known to be wrong, and no verify at all means no one
ever compared it; no reason makes any of them safe. Every gate fails closed: evidence that
cannot be read fails its gate, it never counts as "nothing wrong".
A probe that could not run (a server down) fails its gate without being critical.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

from cutover import capture
from cutover.config import GateSettings

__all__ = [
    "GATES",
    "CaptureEvidence",
    "Decision",
    "Evidence",
    "GateResult",
    "apply_lag",
    "decide",
    "evaluate",
]


# ---------------------------------------------------------------------------------------------
# Evidence
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyEvidence:
    run_id: int | None = None
    passed: bool | None = None  # for this domain
    age_s: float | None = None
    finished_at: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LagEvidence:
    topic: str = ""
    partitions: Mapping[int, int] = field(default_factory=dict)  # partition -> events behind
    total: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterEvidence:
    open: int | None = None
    sample_ids: tuple[int, ...] = ()
    error: str | None = None
    #: Rows the producer withheld (legacy cutover.producer_dead_letters), open.
    producer_open: int = 0
    producer_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class HeartbeatEvidence:
    age_s: float | None = None
    producer: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SlotEvidence:
    slot: str = ""
    exists: bool | None = None
    wal_status: str | None = None
    active: bool | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CaptureEvidence:
    #: (table, cause) of each mapped table of the domain not (fully) published; None: not checked.
    blocks: tuple[tuple[str, str], ...] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Evidence:
    """Everything the gates of one domain look at."""

    domain: str
    verify: VerifyEvidence
    lag: LagEvidence
    dead_letters: DeadLetterEvidence
    heartbeat: HeartbeatEvidence
    slot: SlotEvidence
    capture: CaptureEvidence = field(default_factory=CaptureEvidence)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["lag"]["partitions"] = {str(k): v for k, v in self.lag.partitions.items()}
        out["dead_letters"]["sample_ids"] = list(self.dead_letters.sample_ids)
        out["dead_letters"]["producer_ids"] = list(self.dead_letters.producer_ids)
        return out


# ---------------------------------------------------------------------------------------------
# Evaluation (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate's verdict; ``critical`` failures cannot be forced."""

    name: str
    passed: bool
    why: str
    critical: bool = False
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.name,
            "passed": self.passed,
            "critical": self.critical,
            "why": self.why,
            "evidence": dict(self.evidence),
        }

    def line(self) -> str:
        mark = "pass" if self.passed else ("FAIL (critical)" if self.critical else "FAIL")
        return f"{self.name}: {mark}: {self.why}"


def apply_lag(
    watermarks: Mapping[int, tuple[int, int]], next_offsets: Mapping[int, int]
) -> dict[int, int]:
    """Events not yet applied per partition: high watermark − next offset to consume.

    A partition the consumers never stored an offset for starts at its low watermark (what is
    still retained is what it has to apply).
    """
    out: dict[int, int] = {}
    for p, (low, high) in sorted(watermarks.items()):
        position = max(next_offsets.get(p, low), low)
        out[p] = max(0, high - position)
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def verify_gate(ev: Evidence, limits: GateSettings) -> GateResult:
    """The latest verify covering the domain passed and is young enough.

    No verify at all is critical, like a failed one: nothing then says commerce is right, and
    ``--force`` must not switch reads to data no one ever compared.
    """
    d, v = ev.domain, ev.verify
    ve = asdict(v)
    if v.error is not None:
        return GateResult("verify", False, f"could not read verify results: {v.error}", evidence=ve)
    if v.run_id is None:
        return GateResult(
            "verify",
            False,
            f"no verify run covers all tables of {d}: run `cutover verify --domain {d}`",
            critical=True,
            evidence=ve,
        )
    if not v.passed:
        return GateResult(
            "verify",
            False,
            f"the latest verify of {d} (run {v.run_id}, {_minutes(v.age_s or 0)} ago) found "
            "persistent differences: fix them and verify again",
            critical=True,
            evidence=ve,
        )
    if v.age_s is None or v.age_s > limits.verify_max_age_minutes * 60:
        return GateResult(
            "verify",
            False,
            f"the latest passing verify of {d} (run {v.run_id}) is "
            f"{_minutes(v.age_s or 0)} old; the limit is {limits.verify_max_age_minutes} min: "
            f"run `cutover verify --domain {d}`",
            evidence=ve,
        )
    return GateResult(
        "verify",
        True,
        f"run {v.run_id} passed {_minutes(v.age_s)} ago (limit "
        f"{limits.verify_max_age_minutes} min)",
        evidence=ve,
    )


def apply_lag_gate(ev: Evidence, limits: GateSettings) -> GateResult:
    """The events of the domain topic not applied yet are at most ``max_apply_lag_events``."""
    lag = ev.lag
    le = {
        "topic": lag.topic,
        "total": lag.total,
        "partitions": {str(k): n for k, n in lag.partitions.items()},
        "error": lag.error,
    }
    if lag.error is not None or lag.total is None:
        return GateResult(
            "apply_lag", False, f"could not measure the apply lag: {lag.error}", evidence=le
        )
    if lag.total > limits.max_apply_lag_events:
        behind = ", ".join(f"p{p}={n}" for p, n in lag.partitions.items() if n)
        return GateResult(
            "apply_lag",
            False,
            f"{lag.total} events of {lag.topic} not applied yet (limit "
            f"{limits.max_apply_lag_events}; {behind})",
            evidence=le,
        )
    return GateResult(
        "apply_lag",
        True,
        f"{lag.total} events behind on {lag.topic} (limit {limits.max_apply_lag_events})",
        evidence=le,
    )


def dead_letters_gate(ev: Evidence, _limits: GateSettings) -> GateResult:
    """No open dead letter of the domain (unreadable letters fail the gate)."""
    d, dl = ev.domain, ev.dead_letters
    de = asdict(dl)
    if dl.error is not None or dl.open is None:
        return GateResult(
            "dead_letters", False, f"could not read dead letters: {dl.error}", evidence=de
        )
    if dl.producer_open:
        ids = ", ".join(f"p{i}" for i in dl.producer_ids)
        return GateResult(
            "dead_letters",
            False,
            f"{dl.producer_open} rows of {d} withheld by the producer (ids {ids}): inspect with "
            "`cutover dlq list`; correct them in legacy (their next change resolves them) or "
            "re-send them with `cutover snapshot --table T --where ...`",
            evidence=de,
        )
    if dl.open:
        ids = ", ".join(str(i) for i in dl.sample_ids)
        return GateResult(
            "dead_letters",
            False,
            f"{dl.open} open dead letters of {d} (ids {ids}): inspect with `cutover dlq list`, "
            "re-drive with `cutover dlq retry`",
            evidence=de,
        )
    return GateResult("dead_letters", True, f"no open dead letters of {d}", evidence=de)


def heartbeat_gate(ev: Evidence, limits: GateSettings) -> GateResult:
    """The producer's last heartbeat is younger than ``max_heartbeat_age_s``."""
    hb = ev.heartbeat
    he = asdict(hb)
    if hb.error is not None or hb.age_s is None:
        return GateResult(
            "producer_heartbeat",
            False,
            f"no producer heartbeat: {hb.error or 'never recorded'}",
            evidence=he,
        )
    if hb.age_s > limits.max_heartbeat_age_s:
        return GateResult(
            "producer_heartbeat",
            False,
            f"the producer's last heartbeat is {hb.age_s:.0f} s old (limit "
            f"{limits.max_heartbeat_age_s:g} s): is `cutover produce` running?",
            evidence=he,
        )
    return GateResult(
        "producer_heartbeat",
        True,
        f"heartbeat {hb.age_s:.1f} s ago from {hb.producer or '?'} (limit "
        f"{limits.max_heartbeat_age_s:g} s)",
        evidence=he,
    )


def slot_gate(ev: Evidence, _limits: GateSettings) -> GateResult:
    """The replication slot exists and has not lost (nor is about to lose) WAL."""
    sl = ev.slot
    se = asdict(sl)
    if sl.error is not None or sl.exists is None:
        return GateResult("slot", False, f"could not check slot {sl.slot}: {sl.error}", evidence=se)
    if not sl.exists:
        return GateResult(
            "slot",
            False,
            f"replication slot {sl.slot} does not exist: changes are no longer captured, "
            "re-snapshot required",
            critical=True,
            evidence=se,
        )
    if sl.wal_status == "lost":
        return GateResult(
            "slot",
            False,
            f"replication slot {sl.slot} lost required WAL (wal_status lost): re-snapshot required",
            critical=True,
            evidence=se,
        )
    if sl.wal_status == "unreserved":
        return GateResult(
            "slot",
            False,
            f"replication slot {sl.slot} is about to lose WAL (wal_status unreserved): the "
            "producer must catch up",
            evidence=se,
        )
    return GateResult(
        "slot",
        True,
        f"slot {sl.slot} wal_status {sl.wal_status}, {'active' if sl.active else 'inactive'}",
        evidence=se,
    )


def capture_gate(ev: Evidence, _limits: GateSettings) -> GateResult:
    """Every table and column the mapping reads for the domain is still published."""
    cap = ev.capture
    ce = asdict(cap)
    if cap.error is not None or cap.blocks is None:
        why = f"could not compare the publication with the mapping: {cap.error or 'not checked'}"
        return GateResult("capture", False, why, evidence=ce)
    if cap.blocks:
        table, cause = cap.blocks[0]
        more = f" (and {len(cap.blocks) - 1} more table(s))" if len(cap.blocks) > 1 else ""
        return GateResult(
            "capture",
            False,
            f"capture of {table} is blocked: {cause}{more}; its changes no longer reach "
            f"commerce. Fix: {capture.resume(table)}",
            critical=True,
            evidence=ce,
        )
    return GateResult("capture", True, "the publication covers the mapping", evidence=ce)


Gate: TypeAlias = Callable[[Evidence, GateSettings], GateResult]

#: The gates in :data:`GATES` order: adding a gate is adding a function and a row here.
GATE_TABLE: tuple[tuple[str, Gate], ...] = (
    ("verify", verify_gate),
    ("apply_lag", apply_lag_gate),
    ("dead_letters", dead_letters_gate),
    ("producer_heartbeat", heartbeat_gate),
    ("slot", slot_gate),
    ("capture", capture_gate),
)
GATES: tuple[str, ...] = tuple(name for name, _gate in GATE_TABLE)


def evaluate(ev: Evidence, limits: GateSettings) -> list[GateResult]:
    """One result per gate, in :data:`GATES` order."""
    return [gate(ev, limits) for _name, gate in GATE_TABLE]


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a switch may proceed; ``overridden`` gates were failing but forced."""

    allowed: bool
    failing: tuple[GateResult, ...]
    blocking: tuple[GateResult, ...]
    overridden: tuple[GateResult, ...]

    def refusal(self, domain: str, command: str = "switch-reads") -> str:
        lines = [f"{command} {domain} refused by {len(self.blocking)} gate(s):"]
        lines += [f"  - {g.line()}" for g in self.blocking]
        critical = any(g.critical for g in self.blocking)
        forceable = any(not g.critical for g in self.blocking)
        if critical:
            lines.append("  (critical gates cannot be forced)")
        if forceable:
            others = "the others" if critical else "these gates"
            lines.append(f"  (--force --reason TEXT overrides {others}; the override is audited)")
        return "\n".join(lines)


def decide(results: Sequence[GateResult], *, force: bool) -> Decision:
    """Allowed when every gate passes, or with ``force`` when no failing gate is critical."""
    failing = tuple(r for r in results if not r.passed)
    if not force:
        return Decision(not failing, failing, failing, ())
    blocking = tuple(r for r in failing if r.critical)
    overridden = tuple(r for r in failing if not r.critical)
    return Decision(not blocking, failing, blocking, overridden)
