"""What a ``cutover produce`` run is asked to do and what it reports: the producer's options
(built once at the entry point; the environment is read there, never below) and its report."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Final

from cutover.errors import ConfigError
from producers.pgoutput import lsn_to_str
from producers.truncates import Carry

CRASH_POINTS: Final = ("after_produce_before_ack", "after_ack_before_advance")


@dataclass(frozen=True, slots=True)
class ProducerOptions:
    """Run-time choices, built once at the entry point (no environment reads below it)."""

    crash_at: str | None = None  # CUTOVER_CRASH_AT: one of CRASH_POINTS
    initial_snapshot: bool = True
    exit_when_idle: bool = False  # stop once caught up and no snapshot is left (tests, bench)
    max_runtime_s: float | None = None
    catchup_factor: int = 8
    idle_sleep_s: float = 0.2
    producer_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    #: TRUNCATEs to carry although their table's policy is "stop" (the stop message's command).
    carry_truncates: tuple[Carry, ...] = ()

    def __post_init__(self) -> None:
        if self.crash_at is not None and self.crash_at not in CRASH_POINTS:
            raise ConfigError(
                f"CUTOVER_CRASH_AT={self.crash_at!r} is not a crash point; known: "
                + ", ".join(CRASH_POINTS)
            )


def options_from_environ(environ: dict[str, str], **kwargs: Any) -> ProducerOptions:
    """Options from the environment snapshot taken at the entry point."""
    return ProducerOptions(crash_at=environ.get("CUTOVER_CRASH_AT") or None, **kwargs)


@dataclass
class ProducerReport:
    events: int = 0
    snapshot_rows: int = 0
    transactions: int = 0
    #: Transactions dropped because one of our appliers wrote them (no echo).
    echo_dropped: int = 0
    #: Row changes dropped because their domain's write fence was up on the captured side.
    fence_dropped: int = 0
    checkpoints: int = 0
    position: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""
    peak_rss_kb: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["position"] = lsn_to_str(self.position)
        return out


def peak_rss_kb() -> int:
    """Peak resident memory of this process, in kB: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries it across fork+exec, so a producer started by a
    big parent (a test runner) would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
