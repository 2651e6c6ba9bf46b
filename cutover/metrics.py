"""Prometheus metrics of ``cutover produce`` and ``cutover apply`` (prometheus-client).

The names below are a contract (dashboards and alert rules in ``ops/`` use them; the table in
docs/OPERATIONS.md lists them): they are never renamed, only added to. Everything is registered
in :data:`REGISTRY`, a registry of our own (plus the process collector: CPU, memory, open files),
so that importing this module twice, or in tests, never collides with anything else.

The loops call the small functions below; each is a few dictionary lookups and an increment, so
calling them per event costs microseconds. :func:`start_metrics_server` serves ``/metrics``
(``[metrics] port`` in the config; port 0 picks a free port and returns it).

=======================================  =========  ==================  =======================
name                                     type       labels              set by
=======================================  =========  ==================  =======================
cutover_events_produced_total            counter    domain              :func:`events_produced`
cutover_delivery_failures_total          counter    -                   :func:`delivery_failed`
cutover_slot_lag_bytes                   gauge      -                   :func:`set_slot_lag`
cutover_slot_advanced_lsn                gauge      -                   :func:`slot_advanced`
cutover_heartbeats_sent_total            counter    -                   :func:`heartbeat_sent`
cutover_echo_dropped_transactions_total  counter    -                   :func:`echo_dropped`
cutover_events_applied_total             counter    domain              :func:`batch_applied`
cutover_apply_batch_size                 histogram  -                   :func:`batch_applied`
cutover_apply_latency_seconds            histogram  -                   :func:`batch_applied`
cutover_apply_commits_total              counter    -                   :func:`batch_applied`
cutover_dead_letters_total               counter    domain, error_class :func:`dead_letter`
cutover_apply_lag_messages               gauge      topic, partition    :func:`set_apply_lag`
cutover_heartbeat_age_seconds            gauge      domain              :func:`heartbeat_seen`
=======================================  =========  ==================  =======================
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

from cutover.errors import UsageError
from cutover.logging import get_logger

__all__ = [
    "REGISTRY",
    "batch_applied",
    "dead_letter",
    "delivery_failed",
    "drop_apply_lag",
    "events_produced",
    "heartbeat_seen",
    "heartbeat_sent",
    "set_apply_lag",
    "set_slot_lag",
    "slot_advanced",
    "start_metrics_server",
]

REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

# ---------------------------------------------------------------------------- producer

EVENTS_PRODUCED: Final = Counter(
    "cutover_events_produced",
    "Change events Kafka acknowledged, per domain topic (snapshot rows included).",
    ["domain"],
    registry=REGISTRY,
)
DELIVERY_FAILURES: Final = Counter(
    "cutover_delivery_failures",
    "Kafka deliveries that failed or timed out (the producer stops before advancing the slot).",
    registry=REGISTRY,
)
SLOT_LAG_BYTES: Final = Gauge(
    "cutover_slot_lag_bytes",
    "WAL bytes the replication slot holds back: "
    "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn).",
    registry=REGISTRY,
)
SLOT_ADVANCED_LSN: Final = Gauge(
    "cutover_slot_advanced_lsn",
    "The LSN (as a number) the producer last advanced the slot to.",
    registry=REGISTRY,
)
ECHO_DROPPED: Final = Counter(
    "cutover_echo_dropped_transactions",
    "Source transactions the producer dropped because an applier of the other direction wrote "
    "them (their replication origin is ours): the no-echo rule; the slot still moves past them.",
    registry=REGISTRY,
)
HEARTBEATS_SENT: Final = Counter(
    "cutover_heartbeats_sent",
    "Heartbeat rounds the producer sent (one message per partition of every domain topic).",
    registry=REGISTRY,
)

# ---------------------------------------------------------------------------- apply consumer

EVENTS_APPLIED: Final = Counter(
    "cutover_events_applied",
    "Change events committed to the commerce database, per domain.",
    ["domain"],
    registry=REGISTRY,
)
APPLY_BATCH_SIZE: Final = Histogram(
    "cutover_apply_batch_size",
    "Events per committed apply batch (one commerce-database transaction).",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000),
    registry=REGISTRY,
)
# Fine below a second: bench/cdc_latency.py reads p50/p99 from these buckets.
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25,
    0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
APPLY_LATENCY: Final = Histogram(
    "cutover_apply_latency_seconds",
    "Commit-to-applied latency: from the source transaction's commit (source.ts_ms) to the "
    "COMMIT in the commerce database, per event.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
APPLY_COMMITS: Final = Counter(
    "cutover_apply_commits",
    "Commerce-database transactions committed by the apply consumer.",
    registry=REGISTRY,
)
DEAD_LETTERS: Final = Counter(
    "cutover_dead_letters",
    "Poison messages sent to the dead-letter topic, per domain and error class.",
    ["domain", "error_class"],
    registry=REGISTRY,
)
APPLY_LAG: Final = Gauge(
    "cutover_apply_lag_messages",
    "Messages between a partition's end offset and this consumer's position.",
    ["topic", "partition"],
    registry=REGISTRY,
)
HEARTBEAT_AGE: Final = Gauge(
    "cutover_heartbeat_age_seconds",
    "Seconds since the newest producer heartbeat this consumer applied, per domain (computed "
    "at scrape time): grows when the pipeline is stuck, stays small when it is only idle.",
    ["domain"],
    registry=REGISTRY,
)

CAPTURE_BLOCKED: Final = Gauge(
    "cutover_capture_blocked",
    "1 while the producer refuses to go on because a mapped table or column is no longer "
    "published (dropped, renamed, left the publication): the table's changes are withheld.",
    ["table"],
    registry=REGISTRY,
)
TRUNCATES_APPLIED: Final = Counter(
    "cutover_truncates_applied",
    "Source TRUNCATEs carried into commerce by the apply consumer (each once, whichever "
    "partition's copy came first), per source table.",
    ["table"],
    registry=REGISTRY,
)

_heartbeat_lock = threading.Lock()
_last_heartbeat_ms: dict[str, int] = {}


# ---------------------------------------------------------------------------- the API


def events_produced(domain: str, count: int = 1) -> None:
    """The producer: ``count`` events of ``domain`` were acknowledged by Kafka."""
    EVENTS_PRODUCED.labels(domain).inc(count)


def delivery_failed(count: int = 1) -> None:
    """The producer: a delivery failed or timed out."""
    DELIVERY_FAILURES.inc(count)


def set_slot_lag(lag_bytes: int) -> None:
    """The producer (after reading ``pg_replication_slots``): WAL held back by the slot."""
    SLOT_LAG_BYTES.set(lag_bytes)


def slot_advanced(lsn: int) -> None:
    """The producer: the slot was advanced to ``lsn``."""
    SLOT_ADVANCED_LSN.set(lsn)


def echo_dropped(count: int) -> None:
    """The producer: ``count`` transactions written by our appliers were dropped (no echo)."""
    ECHO_DROPPED.inc(count)


def capture_blocked(table: str, blocked: bool = True) -> None:
    """The producer (as it stops) or the monitor: whether ``table``'s capture is blocked."""
    CAPTURE_BLOCKED.labels(table).set(1 if blocked else 0)


def heartbeat_sent() -> None:
    """The producer: one round of heartbeats was sent."""
    HEARTBEATS_SENT.inc()


def batch_applied(
    events_by_domain: Mapping[str, int],
    source_ts_ms: Iterable[int] = (),
    committed_at_ms: int | None = None,
) -> None:
    """The apply consumer, after each COMMIT: events per domain, and the source commit times
    of the events applied (for the latency histogram; ``committed_at_ms`` defaults to now)."""
    total = 0
    for domain, count in events_by_domain.items():
        if count:
            EVENTS_APPLIED.labels(domain).inc(count)
            total += count
    APPLY_COMMITS.inc()
    APPLY_BATCH_SIZE.observe(total)
    now_ms = committed_at_ms if committed_at_ms is not None else int(time.time() * 1000)
    observe = APPLY_LATENCY.observe
    for ts in source_ts_ms:
        observe(max(0.0, (now_ms - ts) / 1000))


def dead_letter(domain: str | None, error_class: str) -> None:
    """The apply consumer: a poison message went to the dead-letter topic."""
    DEAD_LETTERS.labels(domain or "unknown", error_class).inc()


def truncate_applied(table: str, count: int = 1) -> None:
    """The apply consumer: a carried TRUNCATE of ``table`` removed its older rows."""
    TRUNCATES_APPLIED.labels(table).inc(count)


def set_apply_lag(topic: str, partition: int, lag: int) -> None:
    """The apply consumer: end offset − position of an assigned partition."""
    APPLY_LAG.labels(topic, str(partition)).set(max(0, lag))


def drop_apply_lag(topic: str, partition: int) -> None:
    """The apply consumer: a partition was revoked or lost; its lag is no longer ours."""
    with contextlib.suppress(KeyError):
        APPLY_LAG.remove(topic, str(partition))


def heartbeat_seen(domain: str, ts_ms: int) -> None:
    """The apply consumer: a producer heartbeat of ``domain`` stamped ``ts_ms`` was applied."""
    with _heartbeat_lock:
        first = domain not in _last_heartbeat_ms
        if first or ts_ms > _last_heartbeat_ms[domain]:
            _last_heartbeat_ms[domain] = ts_ms
    if first:
        # Computed when scraped, so the age keeps growing while no heartbeat arrives.
        HEARTBEAT_AGE.labels(domain).set_function(lambda: _heartbeat_age(domain))


def _heartbeat_age(domain: str) -> float:
    with _heartbeat_lock:
        last = _last_heartbeat_ms.get(domain)
    return 0.0 if last is None else max(0.0, time.time() - last / 1000)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns the port (port 0: a free
    one). Binds all interfaces by default so that Prometheus can scrape from elsewhere; the
    metrics carry no secrets."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound: int = server.server_port
    return bound


def add_port_argument(parser: Any) -> None:
    """The ``--metrics-port`` flag of ``cutover produce`` and ``cutover apply``."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (0: a free one, logged); "
        "default: [metrics] port of the config, none if unset",
    )


def serve_if_asked(flag_port: int | None, config_port: int | None) -> int | None:
    """Start the metrics server when a port is given (the flag wins over the config); log and
    return the bound port."""
    port = flag_port if flag_port is not None else config_port
    if port is None:
        return None
    if not 0 <= port < 65536:
        raise UsageError(f"--metrics-port must be 0-65535, not {port}")
    try:
        bound = start_metrics_server(port)
    except OSError as exc:
        raise UsageError(
            f"cannot serve metrics on port {port}: {exc.strerror}; pick another --metrics-port"
        ) from None
    get_logger("cutover.metrics").info("metrics.serving", port=bound, path="/metrics")
    return bound
