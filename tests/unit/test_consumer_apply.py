"""consumers.apply and the CLI wiring, without services: the consumer configuration the
exactly-once protocol depends on, and the `cutover apply` / `cutover dlq` parsers."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from cli.main import build_parser, main
from consumers.apply import ApplyConsumer, _Partition
from consumers.batch import Entry
from consumers.engine import Tx
from cutover import kafka
from cutover.config import ApplySettings, KafkaSettings, Settings, SourceSettings, TargetSettings

REPO = Path(__file__).resolve().parents[2]


def _settings(**consumer: object) -> Settings:
    return Settings(
        source=SourceSettings(dsn="dbname=x"),
        target=TargetSettings(dsn="dbname=y"),
        kafka=KafkaSettings(bootstrap="h:1", topic_prefix="p", consumer=consumer),  # type: ignore[arg-type]
        mapping_path=REPO / "examples" / "shop" / "mapping.toml",
        apply=ApplySettings(group_id="g1", batch_max_events=100),
    )


def test_consumer_conf_forces_what_exactly_once_needs_and_passes_the_rest() -> None:
    consumer = ApplyConsumer(
        _settings(
            **{
                "enable.auto.commit": True,
                "isolation.level": "read_uncommitted",
                "fetch.min.bytes": 10,
                "auto.offset.reset": "latest",
            }
        )
    )
    # ApplyConsumer._start builds its consumer from exactly this (cutover.kafka, purpose "apply").
    conf = kafka.consumer_config(consumer.settings.kafka, "apply", group_id=consumer.group)
    assert conf["group.id"] == "g1"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["isolation.level"] == "read_committed"
    assert conf["enable.auto.commit"] is False
    assert conf["fetch.min.bytes"] == 10  # pass-through
    assert conf["auto.offset.reset"] == "latest"  # a default the operator may change
    assert consumer.topics == ["p.payment", "p.data", "p.merchant"]
    assert consumer.long_tx_events == 200


def test_apply_and_dlq_commands_are_registered(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(every=True)
    args = parser.parse_args(["apply", "--exit-when-idle", "5", "--group-id", "x"])
    assert args.exit_when_idle == 5.0 and args.group_id == "x"
    args = parser.parse_args(["dlq", "retry", "--all"])
    assert args.all is True
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["dlq", "retry", "--id", "1", "--all"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["apply", "--help"])
    assert exc.value.code == 0
    assert "SIGTERM" in capsys.readouterr().out


class _FakeSink:
    def __init__(self) -> None:
        self.rolled_back = 0

    def rollback(self) -> None:
        self.rolled_back += 1


class _FakeKafka:
    def __init__(self) -> None:
        self.resumed: list[tuple[str, int]] = []
        self.seeks: list[tuple[str, int, int]] = []

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.resumed += [(p.topic, p.partition) for p in partitions]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


def _consumer_with_long_tx() -> tuple[ApplyConsumer, _FakeSink, _FakeKafka]:
    consumer = ApplyConsumer(_settings())
    sink, kafka = _FakeSink(), _FakeKafka()
    consumer.engine.sink = sink  # type: ignore[assignment]
    consumer._consumer = kafka
    for p in range(3):
        part = _Partition("p.payment", p, committed=10, cursor=50)
        part.buffer.append(Entry(50, None, b"x"))
        consumer._parts[("p.payment", p)] = part
    tx = Tx()
    tx.locked = {("p.payment", 0), ("p.payment", 1)}
    consumer.engine.tx = tx
    consumer._streaming = {("p.payment", 0)}
    consumer._paused = {("p.payment", 1), ("p.payment", 2)}
    return consumer, sink, kafka


def test_revoking_a_partition_of_the_open_long_transaction_rolls_it_back() -> None:
    consumer, sink, kafka = _consumer_with_long_tx()
    consumer._on_revoke(kafka, [TopicPartition("p.payment", 0)])
    consumer._raise_callback_error()
    assert sink.rolled_back == 1
    assert consumer.engine.tx is None and not consumer._streaming
    assert ("p.payment", 0) not in consumer._parts
    # The kept partition that had uncommitted work in it restarts from the stored offsets.
    assert consumer._need_reseek == {("p.payment", 1)}
    assert not consumer._paused  # everything fetches again


def test_revoking_a_partition_outside_the_transaction_keeps_it_open() -> None:
    consumer, sink, kafka = _consumer_with_long_tx()
    consumer._on_revoke(kafka, [TopicPartition("p.payment", 2)])
    consumer._raise_callback_error()
    assert sink.rolled_back == 0
    assert consumer.engine.tx is not None
    assert set(consumer._parts) == {("p.payment", 0), ("p.payment", 1)}
    assert consumer._need_reseek == set()
