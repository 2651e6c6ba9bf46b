"""The gates of ``cutover switch-writes D`` and ``cutover complete D`` (DESIGN §6, §11).

Same shape as :mod:`control.gates` (whose verify and dead-letter gates they reuse): evidence is
collected (:func:`collect_write`, each probe failing on its own) and judged by one pure function
per gate, listed in :data:`WRITE_GATE_TABLE` per action. Every gate fails closed.

=============== ========================================================= ==================
gate            passes when                                               critical failure
=============== ========================================================= ==================
reads_soak      D has been ``reads_switched`` for ``min_reads_soak_minutes`` —
writes_soak     D has been ``writes_switched`` for ``min_writes_soak_minutes`` —
verify          as for switch-reads (:func:`control.gates.verify_gate`)   as for switch-reads
forward_lag     at most ``max_apply_lag_events`` of D's topic left to apply —
                (step 2 of switch-writes drains them to 0 behind the fence;
                a live shop is never at 0 before it; re-measured for up
                to 3 s: heartbeats in flight are not a lag)
dead_letters    no open dead letter of D                                  —
fences          the write fence of D is installed on legacy and commerce  not installed
reverse_path    the reverse slot exists on commerce and the reverse       the slot is missing
                producer's heartbeat is fresh
reverse_lag     no event of D's reverse topic is left to apply into       —
                legacy (lag 0; offsets in legacy, ``[reverse]`` group)
=============== ========================================================= ==================
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeAlias

import psycopg

from control.gate_evidence import (
    dead_letter_evidence,
    lag_evidence,
    probe_error,
    stored_lag,
    verify_evidence,
)
from control.gates import (
    DeadLetterEvidence,
    Evidence,
    GateResult,
    HeartbeatEvidence,
    LagEvidence,
    SlotEvidence,
    VerifyEvidence,
    apply_lag_gate,
    dead_letters_gate,
    verify_gate,
)
from control.write_switch import LEGACY_FENCE_SCHEMA, ReversePath, reverse_path
from cutover import fence
from cutover.config import GateSettings, Settings
from cutover.control_store import READS_SWITCHED, WRITES_SWITCHED, ControlStore, load_states
from cutover.errors import CutoverError
from cutover.kafka import kafka_consumer

__all__ = [
    "WRITE_GATE_TABLE",
    "FenceEvidence",
    "WriteEvidence",
    "collect_write",
    "evaluate_write",
    "reverse_lag",
    "write_gates",
]

Conn = psycopg.Connection[Any]


@dataclass(frozen=True, slots=True)
class FenceEvidence:
    legacy: bool | None = None  # installed for the domain
    commerce: bool | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class WriteEvidence:
    """Everything the write gates of one domain look at."""

    domain: str
    state: str | None = None
    soak_s: float | None = None  # how long the domain has been in ``state``
    verify: VerifyEvidence = field(default_factory=VerifyEvidence)
    forward_lag: LagEvidence = field(default_factory=LagEvidence)
    dead_letters: DeadLetterEvidence = field(default_factory=DeadLetterEvidence)
    fences: FenceEvidence = field(default_factory=FenceEvidence)
    reverse: ReversePath = field(default_factory=ReversePath)
    reverse_lag: LagEvidence = field(default_factory=LagEvidence)
    error: str | None = None  # the domain's state could not be read

    def as_reads(self) -> Evidence:
        """The switch-reads evidence the shared gates read."""
        return Evidence(
            self.domain,
            self.verify,
            self.forward_lag,
            self.dead_letters,
            HeartbeatEvidence(),
            SlotEvidence(),
        )


# ---------------------------------------------------------------------------------------------
# The gates (pure)
# ---------------------------------------------------------------------------------------------


def _soak(name: str, ev: WriteEvidence, state: str, minutes: float) -> GateResult:
    e = {"state": ev.state, "soak_s": ev.soak_s, "limit_minutes": minutes, "error": ev.error}
    if ev.error is not None or ev.soak_s is None:
        return GateResult(
            name, False, f"could not read the state of {ev.domain}: {ev.error}", evidence=e
        )
    if ev.state != state:
        return GateResult(name, False, f"{ev.domain} is {ev.state}, not {state}", evidence=e)
    if ev.soak_s < minutes * 60:
        return GateResult(
            name,
            False,
            f"{ev.domain} has been {state} for {ev.soak_s / 60:.1f} min; the soak time is "
            f"{minutes:g} min",
            evidence=e,
        )
    return GateResult(
        name, True, f"{state} for {ev.soak_s / 60:.1f} min (soak {minutes:g} min)", evidence=e
    )


def reads_soak_gate(ev: WriteEvidence, limits: GateSettings) -> GateResult:
    """Commerce has served D's reads for at least ``min_reads_soak_minutes``."""
    return _soak("reads_soak", ev, READS_SWITCHED, limits.min_reads_soak_minutes)


def writes_soak_gate(ev: WriteEvidence, limits: GateSettings) -> GateResult:
    """Commerce has taken D's writes for at least ``min_writes_soak_minutes``."""
    return _soak("writes_soak", ev, WRITES_SWITCHED, limits.min_writes_soak_minutes)


def write_verify_gate(ev: WriteEvidence, limits: GateSettings) -> GateResult:
    """A passing verify of D no older than the limit (the switch-reads gate)."""
    return verify_gate(ev.as_reads(), limits)


def _zero_lag(name: str, lag: LagEvidence, limits: GateSettings, ev: WriteEvidence) -> GateResult:
    # The switch-reads gate with a limit of zero: every event must be applied.
    return _lag(name, lag, replace(limits, max_apply_lag_events=0), ev)


def _lag(name: str, lag: LagEvidence, limits: GateSettings, ev: WriteEvidence) -> GateResult:
    return replace(apply_lag_gate(replace(ev.as_reads(), lag=lag), limits), name=name)


def forward_lag_gate(ev: WriteEvidence, limits: GateSettings) -> GateResult:
    """D's forward lag is small enough that the drain behind the fence (step 2, which waits for
    every event up to the fence LSN) keeps the write window short: the switch-reads limit."""
    return _lag("forward_lag", ev.forward_lag, limits, ev)


def reverse_lag_gate(ev: WriteEvidence, limits: GateSettings) -> GateResult:
    """Every event of D's reverse topic is applied to legacy."""
    return _zero_lag("reverse_lag", ev.reverse_lag, limits, ev)


def write_dead_letters_gate(ev: WriteEvidence, limits: GateSettings) -> GateResult:
    """No open dead letter of D (the switch-reads gate)."""
    return dead_letters_gate(ev.as_reads(), limits)


def fences_gate(ev: WriteEvidence, _limits: GateSettings) -> GateResult:
    """The fence of D is installed on both sides: without it no switch can close a side."""
    f = ev.fences
    fe = asdict(f)
    if f.error is not None or f.legacy is None or f.commerce is None:
        return GateResult(
            "fences", False, f"could not read the write fences: {f.error}", evidence=fe
        )
    missing = [side for side, ok in (("legacy", f.legacy), ("commerce", f.commerce)) if not ok]
    if missing:
        return GateResult(
            "fences",
            False,
            f"the write fence of {ev.domain} is not installed on {' and '.join(missing)}: "
            "run `cutover init`",
            critical=True,
            evidence=fe,
        )
    return GateResult(
        "fences", True, f"the fence of {ev.domain} is installed on both sides", evidence=fe
    )


def reverse_path_gate(ev: WriteEvidence, _limits: GateSettings) -> GateResult:
    """The reverse slot exists on commerce and the reverse producer is alive."""
    r = ev.reverse
    re = asdict(r)
    if r.ready:
        return GateResult("reverse_path", True, r.why, evidence=re)
    critical = r.slot_exists is False  # no way back to legacy at all
    return GateResult("reverse_path", False, r.why or "not checked", critical=critical, evidence=re)


WriteGate: TypeAlias = Callable[[WriteEvidence, GateSettings], GateResult]

#: The gates of each write action, in order: adding a gate is a function and a row here.
WRITE_GATE_TABLE: dict[str, tuple[tuple[str, WriteGate], ...]] = {
    "switch_writes": (
        ("reads_soak", reads_soak_gate),
        ("verify", write_verify_gate),
        ("forward_lag", forward_lag_gate),
        ("dead_letters", write_dead_letters_gate),
        ("fences", fences_gate),
        ("reverse_path", reverse_path_gate),
    ),
    "complete": (
        ("writes_soak", writes_soak_gate),
        ("verify", write_verify_gate),
        ("reverse_lag", reverse_lag_gate),
    ),
}


def evaluate_write(action: str, ev: WriteEvidence, limits: GateSettings) -> list[GateResult]:
    """One result per gate of ``action``, in table order (pure)."""
    return [gate(ev, limits) for _name, gate in WRITE_GATE_TABLE[action]]


# ---------------------------------------------------------------------------------------------
# Collecting evidence (I/O)
# ---------------------------------------------------------------------------------------------


def _state(settings: Settings, commerce: Conn, domain: str) -> tuple[str | None, float | None]:
    st = load_states(commerce, settings.target.control_schema).get(domain)
    if st is None:
        raise CutoverError(f"unknown domain {domain}")
    changed = st.changed_at or datetime.now(UTC)
    return st.state, max(0.0, (datetime.now(UTC) - changed).total_seconds())


def _fences(settings: Settings, legacy: Conn, commerce: Conn, domain: str) -> FenceEvidence:
    # fence_states returns {} when the fence was never installed: "not installed", fail closed.
    on_legacy = fence.fence_states(legacy, LEGACY_FENCE_SCHEMA, side="source")
    on_commerce = fence.fence_states(commerce, settings.target.control_schema, side="target")
    return FenceEvidence(legacy=domain in on_legacy, commerce=domain in on_commerce)


def reverse_lag(settings: Settings, legacy: Conn, domain: str, consumer: Any) -> LagEvidence:
    """Events of ``domain``'s reverse topic not yet applied into legacy (one measurement)."""
    store = ControlStore(legacy, settings.reverse.control_schema, "source")
    topic = settings.kafka.reverse_topic(domain)
    return stored_lag(store, settings.reverse.group_id, topic, consumer)


#: How long a lag probe re-measures before it reports a lag above zero (see _settled).
LAG_SETTLE_S = 3.0


def _settled(probe: Callable[[], LagEvidence]) -> LagEvidence:
    """A lag that reaches 0 within :data:`LAG_SETTLE_S`, or the last measurement.

    With the pipeline running, the producer's heartbeats land on every partition each interval
    and are applied within a batch wait: one snapshot of the watermarks often catches one in
    flight. "Lag 0" means the appliers catch up with everything, so re-measure a few times
    before calling a lag real."""
    deadline = time.monotonic() + LAG_SETTLE_S
    lag = probe()
    while lag.error is None and (lag.total or 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.25)
        lag = probe()
    return lag


def collect_write(settings: Settings, domain: str) -> WriteEvidence:
    """Gather the evidence of every write gate of ``domain`` (each probe fails on its own)."""
    try:
        legacy = psycopg.connect(settings.source.dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        return WriteEvidence(domain, error=f"legacy database unreachable: {probe_error(exc)}")
    try:
        commerce = psycopg.connect(settings.target.dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        legacy.close()
        return WriteEvidence(domain, error=f"commerce database unreachable: {probe_error(exc)}")
    consumer = kafka_consumer(settings)
    try:
        ev = WriteEvidence(domain)
        try:
            state, soak = _state(settings, commerce, domain)
            ev = replace(ev, state=state, soak_s=soak)
        except (psycopg.Error, CutoverError) as exc:
            ev = replace(ev, error=probe_error(exc))
        try:
            fences = _fences(settings, legacy, commerce, domain)
        except (psycopg.Error, CutoverError) as exc:
            fences = FenceEvidence(error=probe_error(exc))
        return replace(
            ev,
            verify=verify_evidence(commerce, settings.target.control_schema, domain),
            forward_lag=_settled(lambda: lag_evidence(settings, commerce, domain, consumer)),
            dead_letters=dead_letter_evidence(settings, commerce, domain),
            fences=fences,
            reverse=reverse_path(settings, commerce),
            reverse_lag=_settled(lambda: reverse_lag(settings, legacy, domain, consumer)),
        )
    finally:
        consumer.close()
        legacy.close()
        commerce.close()


def write_gates(action: str) -> Callable[[Settings, str], list[GateResult]]:
    """The ACTION_GATES entry of a write action: collect, then evaluate."""

    def gates(settings: Settings, domain: str) -> list[GateResult]:
        return evaluate_write(action, collect_write(settings, domain), settings.gates)

    return gates
