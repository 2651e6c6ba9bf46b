"""What the overview shows, kept fresh by two background threads (the same readers as the CLI).

* the **fast loop** (every ``interval_s``, 1 s): the domains' states and progress
  (:func:`control.state.status_report` without gates, one query) and the monitor's figures
  (:class:`control.monitor.Monitor`: forward lag, apply rate, slot/WAL, producer heartbeat,
  dead letters); it also appends one chart sample;
* the **gates loop** (every ``gates_interval_s``): ``status_report`` with gates (the gates of
  ``cutover status``, each with its evidence, and the last verify), and the reverse lag of the
  domains whose writes are on commerce (:func:`control.write_gates.reverse_lag`). Gates probe
  both databases and Kafka, a second or more under load: they must not hold up the live figures.

A reader that fails (a database or Kafka down) leaves its part empty and says why in
``errors``; the loops carry on and recover when the service is back. Chart samples cover the
last ``history_s`` seconds (in memory: a restarted console starts a new history).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg

from control.monitor import Monitor
from control.state import status_report
from control.write_gates import reverse_lag
from cutover.config import Settings
from cutover.control_store import COMMERCE_WRITES
from cutover.errors import CutoverError, redact_dsn
from cutover.kafka import kafka_consumer
from cutover.logging import get_logger

__all__ = ["Collector", "merge", "sample_of"]

log = get_logger("console.live")


def _error(what: str, exc: BaseException) -> str:
    text = redact_dsn(str(getattr(exc, "message", None) or exc).strip())
    return f"{what}: {text.splitlines()[0] if text else type(exc).__name__}"


def merge(
    status: Mapping[str, Any] | None,
    monitor: Mapping[str, Any] | None,
    gated: Mapping[str, Any] | None,
    reverse: Mapping[str, Mapping[str, Any]],
    errors: list[str],
) -> dict[str, Any]:
    """One overview from the readings (pure): per domain its state, weight, gates, forward and
    reverse lag, apply rate, open dead letters; and the pipeline-wide slot and heartbeat."""
    topics = {t["domain"]: t for t in (monitor or {}).get("topics", [])}
    gates = {d["domain"]: d for d in (gated or {}).get("domains", [])}
    domains = []
    for d in (status or {}).get("domains", []):
        name = d["domain"]
        topic, gate = topics.get(name, {}), gates.get(name, {})
        domains.append(
            {
                **d,
                "gates": gate.get("gates"),
                "gates_pass": gate.get("gates_pass"),
                "last_verify": gate.get("last_verify"),
                "lag": topic.get("applied_lag"),
                "apply_rate": topic.get("apply_rate_msgs_per_s"),
                "dead_letters_open": topic.get("dead_letters_open"),
                "reverse_lag": reverse.get(name),
            }
        )
    return {
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "progress_percent": (status or {}).get("progress_percent"),
        "writes_on_commerce": (status or {}).get("writes_on_commerce"),
        "completed": (status or {}).get("completed"),
        "domains": domains,
        "slot": (monitor or {}).get("slot"),
        "producer": (monitor or {}).get("producer"),
        "dead_letters": (monitor or {}).get("dead_letters"),
        "errors": errors + list((monitor or {}).get("errors", [])),
    }


def sample_of(overview: Mapping[str, Any], at_ms: int) -> dict[str, Any]:
    """One chart point: per domain forward lag, apply rate and reverse lag (pure)."""
    return {
        "t": at_ms,
        "lag": {d["domain"]: d["lag"] for d in overview["domains"]},
        "rate": {d["domain"]: d["apply_rate"] for d in overview["domains"]},
        "reverse_lag": {
            d["domain"]: (d["reverse_lag"] or {}).get("total") for d in overview["domains"]
        },
    }


class Collector:
    """The latest overview and the last hour of samples, refreshed by two daemon threads."""

    def __init__(
        self,
        settings: Settings,
        weights: Mapping[str, int],
        *,
        interval_s: float = 1.0,
        gates_interval_s: float = 5.0,
        history_s: float = 3600.0,
    ) -> None:
        self.settings = settings
        self.weights = dict(weights)
        self.interval_s = interval_s
        self.gates_interval_s = gates_interval_s
        self._samples: deque[dict[str, Any]] = deque(maxlen=int(history_s / interval_s) + 1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._gated: dict[str, Any] | None = None
        self._reverse: dict[str, dict[str, Any]] = {}
        self._gate_errors: list[str] = []
        self._overview: dict[str, Any] = merge(None, None, None, {}, ["starting: no reading yet"])
        self.version = 0
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ readers (threads)

    def _fast_once(self, monitor: Monitor) -> None:
        errors: list[str] = []
        status = None
        try:
            status = status_report(self.settings, self.weights, with_gates=False)
        except CutoverError as exc:
            errors.append(_error("cutover state", exc))
        report = monitor.sample().as_json()
        with self._lock:
            overview = merge(status, report, self._gated, self._reverse, errors + self._gate_errors)
            self._overview = overview
            self._samples.append(sample_of(overview, int(time.time() * 1000)))
            self.version += 1

    def _gates_once(self) -> None:
        errors: list[str] = []
        gated = None
        try:
            gated = status_report(self.settings, self.weights, with_gates=True)
        except CutoverError as exc:
            errors.append(_error("gates", exc))
        reverse = self._reverse_lags(gated, errors)
        with self._lock:
            self._gated, self._reverse, self._gate_errors = gated, reverse, errors

    def _reverse_lags(self, gated: Mapping[str, Any] | None, errors: list[str]) -> dict[str, Any]:
        """Reverse lag of each domain whose writes are on commerce (the others have none)."""
        names = [
            d["domain"]
            for d in (gated or {}).get("domains", [])
            if d["effective_state"] in COMMERCE_WRITES
        ]
        if not names:
            return {}
        out: dict[str, Any] = {}
        try:
            with psycopg.connect(self.settings.source.dsn, autocommit=True, connect_timeout=5) as c:
                consumer = kafka_consumer(self.settings)
                try:
                    for name in names:
                        lag = reverse_lag(self.settings, c, name, consumer)
                        out[name] = {"topic": lag.topic, "total": lag.total, "error": lag.error}
                finally:
                    consumer.close()
        except (psycopg.Error, CutoverError) as exc:
            errors.append(_error("reverse lag", exc))
        return out

    def _loop(self, step: Any, every: float) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                step()
            except Exception as exc:  # a reader must never kill its loop: shown, retried
                log.warning("console.reader_failed", error=_error(type(exc).__name__, exc))
            self._stop.wait(max(0.05, every - (time.monotonic() - started)))

    def start(self) -> None:
        monitor = Monitor(self.settings, list(self.weights))

        def fast() -> None:
            self._fast_once(monitor)

        def run_fast() -> None:
            try:
                self._loop(fast, self.interval_s)
            finally:
                monitor.close()

        for target in (run_fast, lambda: self._loop(self._gates_once, self.gates_interval_s)):
            thread = threading.Thread(target=target, name="console-reader", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    # ------------------------------------------------------------------ views

    def overview(self) -> dict[str, Any]:
        with self._lock:
            return self._overview

    def samples(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._samples)

    def refresh_gates(self) -> None:
        """Re-read the gates now (after an action the page must not show stale gates)."""
        self._gates_once()
