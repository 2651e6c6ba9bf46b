"""cutover.kafka: the merge order of client settings, the error translation, librdkafka's log."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException
from structlog.testing import capture_logs

from cutover import kafka
from cutover.config import KafkaSettings
from cutover.errors import ConfigError, KafkaError

# What the code relies on, per purpose: a value below must be in the final config whatever the
# pass-through or the caller's extra settings say.
PRODUCER_MUST = {"enable.idempotence": True, "acks": "all"}
CONSUMER_MUST: dict[str, dict[str, Any]] = {
    "apply": {
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "partition.assignment.strategy": "cooperative-sticky",
    },
    "schemas": {"enable.auto.commit": False, "isolation.level": "read_committed"},
    "replay": {
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
    },
    "monitor": {"enable.auto.commit": False, "enable.auto.offset.store": False},
    "probe": {"enable.auto.commit": False, "allow.auto.create.topics": False},
    "router": {"enable.auto.commit": False, "allow.auto.create.topics": False},
}
WEAK_CONSUMER: dict[str, Any] = {
    "enable.auto.commit": True,
    "enable.auto.offset.store": True,
    "enable.partition.eof": False,
    "isolation.level": "read_uncommitted",
    "partition.assignment.strategy": "range",
    "allow.auto.create.topics": True,
    "group.id": "someone-elses-group",
    "bootstrap.servers": "elsewhere:9092",
}


def test_every_purpose_is_covered() -> None:
    assert set(CONSUMER_MUST) == set(kafka.CONSUMER_PURPOSES)
    assert len(kafka.PRODUCER_PURPOSES) == 4


@pytest.mark.parametrize("purpose", kafka.PRODUCER_PURPOSES)
@pytest.mark.parametrize(("key", "value"), [("acks", 1), ("acks", "0"), ("enable.idempotence", 0)])
def test_a_user_setting_cannot_weaken_any_producer(purpose: Any, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"kafka.producer\\] {key}"):
        kafka.producer_config(KafkaSettings(producer={key: value}), purpose)


@pytest.mark.parametrize("purpose", kafka.PRODUCER_PURPOSES)
def test_mandatory_producer_settings_come_last(purpose: Any) -> None:
    user = KafkaSettings(bootstrap="b:1", producer={"acks": "-1", "linger.ms": 7})
    conf = kafka.producer_config(
        user, purpose, extra={"acks": 1, "enable.idempotence": False, "bootstrap.servers": "x"}
    )
    for key, value in PRODUCER_MUST.items():
        assert conf[key] == value, (purpose, key)
    assert conf["bootstrap.servers"] == "b:1"
    assert conf["linger.ms"] == 7  # a pass-through that weakens nothing is kept


@pytest.mark.parametrize("purpose", kafka.CONSUMER_PURPOSES)
def test_a_user_setting_cannot_override_a_mandatory_consumer_setting(purpose: Any) -> None:
    user = KafkaSettings(bootstrap="b:1", consumer={**WEAK_CONSUMER, "fetch.min.bytes": 9})
    with capture_logs() as logs:
        conf = kafka.consumer_config(user, purpose, group_id="g", extra=WEAK_CONSUMER)
    for key, value in CONSUMER_MUST[purpose].items():
        assert conf[key] == value, (purpose, key)
    assert conf["group.id"] == "g" and conf["bootstrap.servers"] == "b:1"
    assert conf["fetch.min.bytes"] == 9
    ignored = {e["setting"] for e in logs if e["event"] == "kafka.setting_ignored"}
    assert ignored == {k for k in CONSUMER_MUST[purpose] if k in WEAK_CONSUMER}


@pytest.mark.parametrize("assignment", ["range", "cooperative-sticky"])
def test_the_apply_assignor_is_the_configured_one_whatever_the_pass_through(
    assignment: Any,
) -> None:
    user = KafkaSettings(
        apply_assignment=assignment, consumer={"partition.assignment.strategy": "roundrobin"}
    )
    assert kafka.consumer_config(user, "apply", group_id="g")["partition.assignment.strategy"] == (
        assignment
    )
    assert KafkaSettings().apply_assignment == "cooperative-sticky"


def test_assign_only_consumers_drop_group_membership_settings() -> None:
    user = KafkaSettings(consumer={"group.instance.id": "i", "partition.assignment.strategy": "x"})
    assert "group.instance.id" not in kafka.consumer_config(user, "replay", group_id="g")
    assert kafka.consumer_config(user, "apply", group_id="g")["group.instance.id"] == "i"


def test_clients_log_through_structlog_and_are_built() -> None:
    settings = KafkaSettings(bootstrap="127.0.0.1:1")
    for purpose in kafka.PRODUCER_PURPOSES:
        assert kafka.producer(settings, purpose) is not None
    assert kafka.consumer(settings, "probe", group_id="g") is not None
    assert kafka.admin(settings) is not None


def test_translate_keeps_the_librdkafka_error_name() -> None:
    exc = KafkaException(RdKafkaError(RdKafkaError._TRANSPORT, "broker down"))
    err = kafka.translate(exc, "reading offsets")
    assert isinstance(err, KafkaError)
    assert err.code == "_TRANSPORT"
    assert str(err) == "kafka: reading offsets: broker down (_TRANSPORT)"
    assert kafka.translate(RuntimeError("boom"), "x").code is None


def _librdkafka_record(message: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(
        "cutover.librdkafka",
        level,
        "",
        0,
        "%s [%s] %s",
        ("FAIL", "rdkafka#consumer-1", message),
        None,
    )


def test_librdkafka_log_is_rate_limited_with_a_suppressed_count() -> None:
    handler = kafka._RateLimitedStructlog(interval_s=3600)
    with capture_logs() as logs:
        for port in range(500):
            # Messages that differ only in numbers are repeats.
            handler.emit(_librdkafka_record(f"127.0.0.1:{port}: Connect failed after {port}ms"))
        handler.emit(_librdkafka_record("another problem", logging.WARNING))
    assert [(e["event"], e["log_level"], e["fac"]) for e in logs] == [
        ("kafka.client_log", "error", "FAIL"),
        ("kafka.client_log", "warning", "FAIL"),
    ]
    handler.interval_s = 0
    with capture_logs() as logs:
        handler.emit(_librdkafka_record("127.0.0.1:1: Connect failed after 1ms"))
    assert logs[0]["suppressed"] == 499


def test_the_client_logger_does_not_propagate_to_the_root_logger() -> None:
    logger = kafka.client_logger()
    assert logger is kafka.client_logger()
    assert not logger.propagate
    assert sum(isinstance(h, kafka._RateLimitedStructlog) for h in logger.handlers) == 1


def test_a_dead_broker_is_logged_as_client_log_events(capfd: pytest.CaptureFixture[str]) -> None:
    # Port 1 on loopback: nothing listens, every connection attempt is refused at once.
    client = kafka.consumer(KafkaSettings(bootstrap="127.0.0.1:1"), "probe", group_id="g")
    with capture_logs() as logs:
        for _ in range(6):
            client.poll(0.5)  # librdkafka's log is served by poll()
    client.close()
    fails = [e for e in logs if e["event"] == "kafka.client_log" and e["fac"] == "FAIL"]
    assert fails and "Connection refused" in fails[0]["message"]
    # Rate-limited: reconnects every few hundred ms for 3 s, one event per message shape.
    assert len(fails) <= 2, fails
    assert "%3|" not in capfd.readouterr().err
