"""The router: which database serves a domain's reads, and which takes its writes, right now.

An application creates one :class:`ReadRouter`, starts it, and asks it before each read::

    router = ReadRouter(settings, ["payment"])        # or RouterConfig(...) without a config file
    router.start()
    with psycopg.connect(router.dsn_for("payment")) as conn:        # reads
        ...
    with psycopg.connect(router.write_dsn_for("payment")) as conn:  # writes
        ...
    router.close()

Reads move to commerce at ``reads_switched``; writes at ``writes_switched`` (and stay there once
``completed``). A write that reaches the side that no longer holds them is refused by the write
fence (:mod:`cutover.fence`): retry it against :meth:`ReadRouter.write_dsn_for`.

How it learns the state (``mode``):

* ``"topic"`` (default): a Kafka consumer with no consumer group is assigned partition 0 of the
  compacted control topic from the beginning, so it reads the latest state of every domain and
  then every change as it is published (within ~0.1 s). At start, the control table in commerce is
  read once too, so a router that cannot reach Kafka still starts from the current state;
* ``"table"``: polls ``domain_state`` in the commerce database every ``poll_interval_s``
  (for applications that cannot reach Kafka). A transition counts once it is *published*, exactly
  as for the topic (:meth:`cutover.control_store.DomainState.effective`).

Guarantees: a state is taken only when its ``version`` is higher than the one held, so a replayed
or duplicated message, a late table read or a re-publication never moves a router backwards
(it never flaps); on any failure (Kafka or the database down, a bad message) the router keeps its
last known state and retries, it never raises into the application. Before it learned anything, a
domain is ``replicating`` (legacy serves reads), the state every cutover starts from.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeAlias

import psycopg

from cutover import kafka, pg
from cutover.config import KafkaSettings, Settings
from cutover.control_store import COMMERCE_READS, COMMERCE_WRITES, REPLICATING, load_states
from cutover.logging import get_logger

__all__ = ["Database", "ReadRouter", "RouterConfig"]

log = get_logger("cutover.routing")

Database: TypeAlias = Literal["legacy", "commerce"]
Mode: TypeAlias = Literal["topic", "table"]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """What a router needs, for applications without a cutover config file."""

    legacy_dsn: str
    commerce_dsn: str
    kafka_bootstrap: str | None = None
    control_topic: str = "shop.control"
    control_schema: str = "cutover"
    kafka: Mapping[str, Any] | None = None  # librdkafka pass-through (security settings)

    @classmethod
    def from_settings(cls, settings: Settings) -> RouterConfig:
        return cls(
            legacy_dsn=settings.source.dsn,
            commerce_dsn=settings.target.dsn,
            kafka_bootstrap=settings.kafka.bootstrap,
            control_topic=settings.kafka.control_topic,
            control_schema=settings.target.control_schema,
            kafka=dict(settings.kafka.consumer),
        )


@dataclass(frozen=True, slots=True)
class _Known:
    state: str
    version: int
    at: float  # monotonic time it was taken


class ReadRouter:
    """Follows the cutover state of ``domains`` and names the database serving their reads."""

    def __init__(
        self,
        config: Settings | RouterConfig,
        domains: Iterable[str] | str | None = None,
        *,
        mode: Mode = "topic",
        poll_interval_s: float = 0.5,
        on_change: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.config = RouterConfig.from_settings(config) if isinstance(config, Settings) else config
        if mode == "topic" and not self.config.kafka_bootstrap:
            raise ValueError("mode 'topic' needs kafka_bootstrap (or use mode 'table')")
        self.domains: frozenset[str] | None = (
            frozenset([domains])
            if isinstance(domains, str)
            else (frozenset(domains) if domains is not None else None)
        )
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = 0
        self._last_ok: float | None = None

    # -- the application's side ---------------------------------------------------------------

    def state_of(self, domain: str) -> str:
        """The state the router follows for ``domain`` (``replicating`` until it knows better)."""
        with self._lock:
            known = self._known.get(domain)
        return known.state if known is not None else REPLICATING

    def version_of(self, domain: str) -> int:
        with self._lock:
            known = self._known.get(domain)
        return known.version if known is not None else 0

    def database_for(self, domain: str) -> Database:
        """``"commerce"`` when the domain's reads are switched, else ``"legacy"``."""
        return "commerce" if self.state_of(domain) in COMMERCE_READS else "legacy"

    def dsn_for(self, domain: str) -> str:
        """The DSN of the database serving ``domain``'s reads now."""
        if self.database_for(domain) == "commerce":
            return self.config.commerce_dsn
        return self.config.legacy_dsn

    def write_database_for(self, domain: str) -> Database:
        """``"commerce"`` when the domain's writes are switched (or complete), else ``"legacy"``."""
        return "commerce" if self.state_of(domain) in COMMERCE_WRITES else "legacy"

    def write_dsn_for(self, domain: str) -> str:
        """The DSN of the database taking ``domain``'s writes now."""
        if self.write_database_for(domain) == "commerce":
            return self.config.commerce_dsn
        return self.config.legacy_dsn

    @property
    def healthy(self) -> bool:
        """True when the last read of the control topic/table succeeded."""
        return self._last_ok is not None and self._errors == 0

    def wait_for(self, domain: str, state: str, timeout_s: float) -> bool:
        """Block until ``domain`` is in ``state`` (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state_of(domain) == state:
                return True
            time.sleep(0.02)
        return self.state_of(domain) == state

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ReadRouter:
        if self._thread is not None:
            return self
        self._read_table()  # a starting point even when Kafka is unreachable
        target = self._follow_topic if self.mode == "topic" else self._poll_table
        self._thread = threading.Thread(target=target, name="cutover-read-router", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ReadRouter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- learning the state -------------------------------------------------------------------

    def offer(self, domain: str, state: str, version: int) -> bool:
        """Take ``state`` if its version is newer than the one held (True when it was taken)."""
        if self.domains is not None and domain not in self.domains:
            return False
        with self._lock:
            known = self._known.get(domain)
            if known is not None and version <= known.version:
                return False
            self._known[domain] = _Known(state, version, time.monotonic())
        log.info("router.state_changed", domain=domain, state=state, version=version)
        if self.on_change is not None:
            with contextlib.suppress(Exception):  # the application's callback must not kill us
                self.on_change(domain, state, version)
        return True

    def _ok(self) -> None:
        self._errors = 0
        self._last_ok = time.monotonic()

    def _failed(self, what: str, exc: BaseException) -> None:
        self._errors += 1
        if self._errors in (1, 10) or self._errors % 100 == 0:
            log.warning("router.read_failed", source=what, error=str(exc), failures=self._errors)

    def _read_table(
        self, conn: psycopg.Connection[Any] | None = None
    ) -> psycopg.Connection[Any] | None:
        """Read the effective states from the control table; returns the connection to reuse."""
        try:
            if conn is None or conn.closed:
                conn = pg.connect(
                    self.config.commerce_dsn,
                    side="target",
                    connect_timeout=3,
                    application_name="cutover-read-router",
                )
            states = load_states(conn, self.config.control_schema)
        except Exception as exc:  # keep the last known state; retry next time
            self._failed("table", exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            return None
        for domain, st in states.items():
            state, version = st.effective()
            self.offer(domain, state, version)
        self._ok()
        return conn

    def _poll_table(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.wait(self.poll_interval_s):
                conn = self._read_table(conn)
        finally:
            if conn is not None:
                conn.close()

    def _consumer(self) -> Any:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        # Mode "topic" requires kafka_bootstrap (checked in __init__).
        kafka_settings = KafkaSettings(
            bootstrap=self.config.kafka_bootstrap or "", consumer=self.config.kafka or {}
        )
        consumer = kafka.consumer(
            kafka_settings,
            "router",
            # librdkafka wants a group id even for a plain assign(); it is never joined nor
            # committed to.
            group_id=f"cutover-read-router-{uuid.uuid4().hex[:12]}",
        )
        consumer.assign([TopicPartition(self.config.control_topic, 0, OFFSET_BEGINNING)])
        return consumer

    def _follow_topic(self) -> None:
        consumer: Any = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer()
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error() is not None:
                    self._failed("topic", RuntimeError(str(msg.error())))
                    continue
                self._ok()
                self._apply_message(msg.key(), msg.value())
            except Exception as exc:  # librdkafka trouble: keep the state, rebuild the consumer
                self._failed("topic", exc)
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        consumer.close()
                    consumer = None
                self._stop.wait(1.0)
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close()

    def _apply_message(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:  # a tombstone (compaction): nothing to follow
            return
        try:
            doc = json.loads(value)
            domain = str(doc["domain"])
            state = str(doc["state"])
            version = int(doc["version"])
        except (ValueError, KeyError, TypeError) as exc:
            self._failed("topic", ValueError(f"undecodable control message {key!r}: {exc}"))
            return
        self.offer(domain, state, version)
