"""The one Kafka client module: client factories, the one error translation, librdkafka's log.

Every librdkafka configuration the product builds comes from here, merged in one order::

    our defaults  <  the user's pass-through ([kafka.producer] / [kafka.consumer])
                  <  the purpose's own settings (group id, client id, timeouts)
                  <  the mandatory settings of the purpose

with the connection's security settings (``[kafka] security_protocol``, ``sasl_*``, ``ssl_*``:
:func:`connection_config`) over the pass-through, in every client (producers, consumers, admin),
so nothing a user or a caller passes can weaken what the code relies on: every producer carries
data (change events, dead letters, replayed messages, control-topic states) and is idempotent with
``acks=all``; every consumer commits only what the code commits, reads only committed messages.
A pass-through producer setting that would weaken delivery is refused outright (ConfigError): the
same table feeds every producer, and silently overriding it would hide a misunderstanding.

With SASL or TLS, the first client of a process checks the login (:func:`check_login`): a wrong
password or an untrusted certificate ends the process with a message naming the user and the
setting to fix, where librdkafka alone would retry forever. Kafka refusing an operation (an ACL)
is a :class:`~cutover.errors.KafkaAccessError` (exit code 2), never retried.

Topics (their specs and creation) are :mod:`cutover.topics`.

librdkafka's own log goes through structlog as ``kafka.client_log`` events, rate-limited, instead
of raw ``%3|...|FAIL|`` lines on stderr (a dead broker repeats them several times a second).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

from cutover.config import KafkaSettings, Settings
from cutover.errors import ConfigError, KafkaAccessError, KafkaError
from cutover.logging import get_logger

ProducerPurpose = Literal["cdc", "dlq", "replay", "control"]
ConsumerPurpose = Literal["apply", "schemas", "replay", "monitor", "probe", "router"]
PRODUCER_PURPOSES: Final[tuple[ProducerPurpose, ...]] = ("cdc", "dlq", "replay", "control")
CONSUMER_PURPOSES: Final[tuple[ConsumerPurpose, ...]] = (
    "apply",
    "schemas",
    "replay",
    "monitor",
    "probe",
    "router",
)

# Settings the no-loss guarantee depends on, for every producer (they all carry data).
_PRODUCER_MANDATORY: Final[dict[str, Any]] = {"enable.idempotence": True, "acks": "all"}
_ACKS_ALL: Final = frozenset({"all", "-1"})
_PRODUCER_DEFAULTS: Final[dict[ProducerPurpose, dict[str, Any]]] = {
    # Bounded queue, batching, compression: the CDC producer's throughput at bounded memory
    # (librdkafka's default queue is 1 GB). linger.ms only shapes the batches of a long read
    # (a backlog): every checkpoint flushes, and a flush sends at once whatever the linger, so
    # a streamed change waits no longer. 100 ms against 20 halved the broker's CPU per event
    # on a 200k-change backlog (16 -> 7 us, bench/producer_throughput.py --cpu).
    "cdc": {
        "linger.ms": 100,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
        "queue.buffering.max.kbytes": 131_072,
        "batch.size": 1_000_000,
    },
    "replay": {"linger.ms": 20, "batch.size": 1 << 20},
    "dlq": {},
    "control": {},
}
# The CDC producer checks deliveries by failures only (see producers.kafka_io).
_PRODUCER_PURPOSE: Final[dict[ProducerPurpose, dict[str, Any]]] = {
    "cdc": {"delivery.report.only.error": True},
    "replay": {},
    "dlq": {},
    "control": {},
}

# Consumers that join no group (assign only): group membership settings make no sense there.
_GROUPLESS_DROP: Final = ("group.instance.id", "partition.assignment.strategy")
_NEVER_COMMIT: Final[dict[str, Any]] = {"enable.auto.commit": False}
_CONSUMER_DEFAULTS: Final[dict[ConsumerPurpose, dict[str, Any]]] = {
    # Bounded prefetch: part of the apply consumer's memory budget (librdkafka's default: 64 MB).
    # A fetch answers at 64 KB or after 25 ms, not at every produce request: fewer, fuller
    # fetches cost the broker and the appliers less CPU per event (bench.cdc_latency runs at
    # 2,000 events/s: broker 171-206 against 184-278 µs per event), at most 25 ms of latency.
    "apply": {
        "auto.offset.reset": "earliest",
        "queued.max.messages.kbytes": 32768,
        "fetch.min.bytes": 65536,
        "fetch.wait.max.ms": 25,
    },
    "router": {"enable.partition.eof": False, "fetch.wait.max.ms": 100},
    "schemas": {},
    "replay": {},
    "monitor": {},
    "probe": {},
}
_CONSUMER_MANDATORY: Final[dict[ConsumerPurpose, dict[str, Any]]] = {
    # The apply consumer commits offsets in the commerce transaction, never to Kafka on its own,
    # and must not see aborted transactions' messages. Its assignor is [kafka] apply_assignment
    # (consumer_config): both protocols are handled by consumers.rebalance.
    "apply": {
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
    },
    "schemas": {**_NEVER_COMMIT, "isolation.level": "read_committed"},
    # replay record reads a range and stops at its end: EOF events mark the end of a partition;
    # retention may have deleted the range's start meanwhile: read what is left.
    "replay": {
        **_NEVER_COMMIT,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
    },
    # The monitor reads the apply group's committed offsets (OffsetFetch needs no membership):
    # it must never commit under that group.
    "monitor": {**_NEVER_COMMIT, "enable.auto.offset.store": False},
    "probe": {**_NEVER_COMMIT, "allow.auto.create.topics": False},
    "router": {**_NEVER_COMMIT, "allow.auto.create.topics": False},
}


#: librdkafka error names meaning Kafka refused the principal: no retry can help.
_DENIED: Final = frozenset(
    {
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    }
)
_LOGIN_FAILED: Final = frozenset({"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED"})


def refused(doing: str, detail: str, code: str | None) -> KafkaError | KafkaAccessError:
    """Our error for a Kafka failure named ``code``: KafkaAccessError (with the fix) when Kafka
    refused the principal, else KafkaError."""
    if code in _DENIED:
        return KafkaAccessError(
            f"{doing}: {detail}: an ACL denies this to the Kafka user of this process "
            "([kafka] sasl_username); run it as the component's own user, or grant that user "
            "the right (kafka-acls --add), see docs/OPERATIONS.md",
            code=code,
        )
    if code in _LOGIN_FAILED:
        return KafkaAccessError(
            f"{doing}: {detail}: check [kafka] sasl_username and sasl_password_file",
            code=code,
        )
    return KafkaError(f"{doing}: {detail}", code=code)


def translate(exc: BaseException, doing: str) -> KafkaError | KafkaAccessError:
    """The one translation of a confluent-kafka exception (or KafkaError value) into ours."""
    from confluent_kafka import KafkaError as RdKafkaError
    from confluent_kafka import KafkaException

    err: Any = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    if isinstance(err, RdKafkaError):
        return refused(doing, err.str(), err.name())
    return KafkaError(f"{doing}: {exc}")


def connection_config(kafka: KafkaSettings) -> dict[str, Any]:
    """librdkafka's security settings from ``[kafka]`` (nothing for PLAINTEXT, so a
    pass-through table's own security settings keep working as before)."""
    conf: dict[str, Any] = {}
    if kafka.security_protocol != "PLAINTEXT":
        conf["security.protocol"] = kafka.security_protocol
    if kafka.security_protocol.startswith("SASL_"):
        conf["sasl.mechanism"] = kafka.sasl_mechanism
        conf["sasl.username"] = kafka.sasl_username
        conf["sasl.password"] = kafka.sasl_password
    for key, value in (
        ("ssl.ca.location", kafka.ssl_ca_location),
        ("ssl.certificate.location", kafka.ssl_certificate_location),
        ("ssl.key.location", kafka.ssl_key_location),
    ):
        if value is not None:
            conf[key] = value
    return conf


_LOGINS_CHECKED: set[tuple[str, str | None, str]] = set()


def check_login(kafka: KafkaSettings, timeout_s: float = 15.0) -> None:
    """With SASL or TLS: KafkaAccessError naming the user and the fix if Kafka refuses the
    login or the TLS handshake (librdkafka would retry that forever); once per process.
    A broker that does not answer is not decided here: the clients' own retries handle it."""
    key = (kafka.bootstrap, kafka.sasl_username, kafka.security_protocol)
    if kafka.security_protocol == "PLAINTEXT" or key in _LOGINS_CHECKED:
        return
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[Any] = []
    conf = {**admin_config(kafka), "error_cb": errors.append, "logger": client_logger()}
    client = AdminClient(conf)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(KafkaException):
            client.list_topics(timeout=1.0)
            _LOGINS_CHECKED.add(key)
            return
        client.poll(0.1)
        for err in errors:
            if err.name() in _LOGIN_FAILED:
                raise KafkaAccessError(
                    f"{kafka.bootstrap} refused the login of user {kafka.sasl_username!r} "
                    f"({kafka.sasl_mechanism}): wrong password or unknown user; fix "
                    "[kafka] sasl_password_file (CUTOVER_KAFKA_SASL_PASSWORD_FILE) or "
                    "sasl_password, or sasl_username",
                    code=err.name(),
                )
            if err.name() == "_SSL":
                raise KafkaAccessError(
                    f"TLS with {kafka.bootstrap} failed: {err.str()}; check [kafka] "
                    "ssl_ca_location (CUTOVER_KAFKA_CA): it must be the CA of the brokers' "
                    "certificates",
                    code=err.name(),
                )


def _check_producer_passthrough(user: Mapping[str, Any]) -> None:
    for key, required in _PRODUCER_MANDATORY.items():
        given = user.get(key)
        if given is None:
            continue
        text = str(given).lower()
        ok = text in _ACKS_ALL if key == "acks" else text in ("true", "1")
        if not ok:
            raise ConfigError(
                f"[kafka.producer] {key} = {given!r} would allow losing events; the producer "
                f"requires {key} = {str(required).lower()!r}: remove the setting"
            )


def producer_config(
    kafka: KafkaSettings,
    purpose: ProducerPurpose,
    *,
    client_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """librdkafka producer settings for ``purpose``: defaults < pass-through < purpose <
    mandatory. ConfigError if the pass-through would weaken delivery."""
    _check_producer_passthrough(kafka.producer)
    conf: dict[str, Any] = {
        **_PRODUCER_DEFAULTS[purpose],
        # The one size limit ([kafka] max_message_bytes), as the topics have it (topic_specs).
        "message.max.bytes": message_max_bytes(kafka),
        **dict(kafka.producer),
        **connection_config(kafka),
        **_PRODUCER_PURPOSE[purpose],
        **dict(extra or {}),
        **_PRODUCER_MANDATORY,
        "bootstrap.servers": kafka.bootstrap,
    }
    if client_id is not None:
        conf["client.id"] = client_id
    return conf


def consumer_config(
    kafka: KafkaSettings,
    purpose: ConsumerPurpose,
    *,
    group_id: str,
    client_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """librdkafka consumer settings for ``purpose``: defaults < pass-through < purpose <
    mandatory. A pass-through setting the purpose overrides is logged, not silently dropped."""
    user = dict(kafka.consumer)
    if purpose != "apply":
        for key in _GROUPLESS_DROP:
            user.pop(key, None)
    mandatory = dict(_CONSUMER_MANDATORY[purpose])
    if purpose == "apply":
        mandatory["partition.assignment.strategy"] = kafka.apply_assignment
    for key, value in mandatory.items():
        if key in user and user[key] != value:
            get_logger(__name__).warning(
                "kafka.setting_ignored", purpose=purpose, setting=key, value=user[key], used=value
            )
    conf: dict[str, Any] = {
        **_CONSUMER_DEFAULTS[purpose],
        **user,
        **connection_config(kafka),
        **dict(extra or {}),
        **mandatory,
        "bootstrap.servers": kafka.bootstrap,
        "group.id": group_id,
    }
    if client_id is not None:
        conf["client.id"] = client_id
    return conf


def _with_logger(conf: dict[str, Any]) -> dict[str, Any]:
    return {**conf, "logger": client_logger()}


def producer(
    kafka: KafkaSettings,
    purpose: ProducerPurpose,
    *,
    client_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """A confluent-kafka Producer for ``purpose`` (see :func:`producer_config`)."""
    from confluent_kafka import KafkaException, Producer

    conf = _with_logger(producer_config(kafka, purpose, client_id=client_id, extra=extra))
    check_login(kafka)
    try:
        return Producer(conf)
    except KafkaException as exc:
        raise translate(exc, f"creating the Kafka producer ({purpose})") from None


def consumer(
    kafka: KafkaSettings,
    purpose: ConsumerPurpose,
    *,
    group_id: str,
    client_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """A confluent-kafka Consumer for ``purpose`` (see :func:`consumer_config`)."""
    from confluent_kafka import Consumer, KafkaException

    conf = consumer_config(kafka, purpose, group_id=group_id, client_id=client_id, extra=extra)
    check_login(kafka)
    try:
        return Consumer(_with_logger(conf))
    except KafkaException as exc:
        raise translate(exc, f"creating the Kafka consumer ({purpose})") from None


def admin_config(kafka: KafkaSettings) -> dict[str, Any]:
    """An admin client's settings: the connection's security over the pass-through's."""
    # The producer table may carry connection settings (timeouts, its own SASL/TLS) the admin
    # needs too; the delivery settings in it mean nothing to an admin client.
    conf = {**dict(kafka.producer), **connection_config(kafka)}
    return {**conf, "bootstrap.servers": kafka.bootstrap}


def admin(kafka: KafkaSettings) -> Any:
    """An AdminClient with the connection settings (security, timeouts)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    conf = admin_config(kafka)
    check_login(kafka)
    try:
        return AdminClient(_with_logger(conf))
    except KafkaException as exc:
        raise translate(exc, "creating the Kafka admin client") from None


def kafka_consumer(settings: Settings) -> Any:
    """A consumer for metadata and watermarks only: never subscribes, never commits."""
    return consumer(settings.kafka, "probe", group_id="cutover-control-probe")


def fetch_watermarks(
    consumer: Any, topic: str, *, timeout_s: float = 5.0
) -> dict[int, tuple[int, int]]:
    """(low, high) watermark per partition of ``topic``; KafkaError if it is unknown or down."""
    from confluent_kafka import TopicPartition

    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            reason = (
                info.error.str() if info is not None and info.error is not None else "no partitions"
            )
            raise KafkaError(f"topic {topic} is not available: {reason}")
        out: dict[int, tuple[int, int]] = {}
        for p in sorted(info.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
            out[p] = (int(low), int(high))
        return out
    except KafkaError:
        raise
    except Exception as exc:
        raise translate(exc, f"reading watermarks of {topic}") from None


# ===================================================================== message size


def message_max_bytes(kafka: KafkaSettings) -> int:
    """librdkafka's ``message.max.bytes``: [kafka] max_message_bytes unless passed through.

    A pass-through ``[kafka.producer] message.max.bytes`` wins (librdkafka requires it to be
    at least ``batch.size``); :func:`size_problems` says when it disagrees with the topics.
    """
    return int(kafka.producer.get("message.max.bytes", kafka.max_message_bytes))


# ======================================================================= librdkafka's log

#: A repeat of the same (facility, message shape) is logged at most once per this many seconds.
LOG_REPEAT_INTERVAL_S: Final = 30.0
_DIGITS = re.compile(r"\d+")


class _RateLimitedStructlog(logging.Handler):
    """Forwards librdkafka log records to structlog as ``kafka.client_log`` events.

    confluent-kafka calls ``logger.log(level, "%s [%s] %s", facility, client_name, message)``.
    Messages that differ only in numbers (ports, milliseconds, counts) count as repeats; a repeat
    within :data:`LOG_REPEAT_INTERVAL_S` is counted, and the next event that passes carries the
    count as ``suppressed``.
    """

    def __init__(self, interval_s: float = LOG_REPEAT_INTERVAL_S) -> None:
        super().__init__(level=logging.DEBUG)
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 3:
            fac, client, message = (str(a) for a in args)
        else:
            fac, client, message = "", "", record.getMessage()
        key = (fac, _DIGITS.sub("#", message))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        log = get_logger("librdkafka")
        method = (
            log.error
            if record.levelno >= logging.ERROR
            else log.warning
            if record.levelno >= logging.WARNING
            else log.info
            if record.levelno >= logging.INFO
            else log.debug
        )
        method("kafka.client_log", fac=fac, client=client, message=message, suppressed=suppressed)


_LOGGER_LOCK = threading.Lock()


def client_logger() -> logging.Logger:
    """The logging.Logger every librdkafka client logs to (librdkafka's ``logger`` setting)."""
    logger = logging.getLogger("cutover.librdkafka")
    with _LOGGER_LOCK:
        if not any(isinstance(h, _RateLimitedStructlog) for h in logger.handlers):
            logger.addHandler(_RateLimitedStructlog())
            logger.setLevel(logging.DEBUG)
            # Only our handler: the root logger (stderr by default) must not print them again.
            logger.propagate = False
    return logger
