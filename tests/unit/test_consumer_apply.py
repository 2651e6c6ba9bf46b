"""consumers.apply and the CLI wiring, without services: the consumer configuration the
exactly-once protocol depends on, and the `cutover apply` / `cutover dlq` parsers."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from cli.main import build_parser, main
from consumers.apply import ApplyConsumer
from consumers.batch import Entry
from consumers.engine import Tx, tuned_gc
from consumers.rebalance import OwnedPartition
from cutover import kafka
from cutover.config import ApplySettings, KafkaSettings, Settings, SourceSettings, TargetSettings

REPO = Path(__file__).resolve().parents[2]


def _settings(assignment: object = "cooperative-sticky", **consumer: object) -> Settings:
    return Settings(
        source=SourceSettings(dsn="dbname=x"),
        target=TargetSettings(dsn="dbname=y"),
        kafka=KafkaSettings(
            bootstrap="h:1",
            topic_prefix="p",
            apply_assignment=assignment,  # type: ignore[arg-type]
            consumer=consumer,  # type: ignore[arg-type]
        ),
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
    def __init__(self, stored: dict[tuple[str, int], int] | None = None) -> None:
        self.rolled_back = 0
        self.stored = stored or {}

    def rollback(self) -> None:
        self.rolled_back += 1

    def read_offsets(
        self, group: str, partitions: list[tuple[str, int]], *, lock: bool
    ) -> dict[tuple[str, int], int]:
        return {tp: self.stored[tp] for tp in partitions if tp in self.stored}


class _FakeKafka:
    """Records what the rebalance callbacks tell the client."""

    def __init__(self) -> None:
        self.resumed: list[tuple[str, int]] = []
        self.seeks: list[tuple[str, int, int]] = []
        self.calls: list[tuple[str, list[tuple[str, int, int]]]] = []

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.resumed += [(p.topic, p.partition) for p in partitions]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def _record(self, call: str, partitions: list[TopicPartition] | None = None) -> None:
        self.calls.append((call, [(p.topic, p.partition, p.offset) for p in partitions or []]))

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._record("assign", partitions)

    def unassign(self) -> None:
        self._record("unassign")

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self._record("incremental_assign", partitions)

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        self._record("incremental_unassign", partitions)


def _consumer_with_long_tx(
    assignment: object = "cooperative-sticky",
) -> tuple[ApplyConsumer, _FakeSink, _FakeKafka]:
    consumer = ApplyConsumer(_settings(assignment))
    sink, kafka = _FakeSink(), _FakeKafka()
    consumer.engine.sink = sink  # type: ignore[assignment]
    consumer._consumer = kafka
    for p in range(3):
        part = OwnedPartition("p.payment", p, committed=10, cursor=50)
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


def test_cooperative_revoke_gives_up_only_the_revoked_partitions() -> None:
    consumer, _, kafka = _consumer_with_long_tx()
    consumer._on_lost(kafka, [TopicPartition("p.payment", 2)])
    consumer._raise_callback_error()
    assert set(consumer._parts) == {("p.payment", 0), ("p.payment", 1)}
    # The client gives them up after the callback (an explicit call's failure would be fatal).
    assert kafka.calls == []


@pytest.mark.parametrize("callback", ["_on_revoke", "_on_lost"])
def test_eager_revoke_drops_everything(callback: str) -> None:
    # Eager (range): whatever the list says, the member gives up its whole assignment, so the
    # open long transaction can never commit: it is rolled back, nothing is kept to re-seek.
    consumer, sink, kafka = _consumer_with_long_tx("range")
    getattr(consumer, callback)(kafka, [TopicPartition("p.payment", 2)])
    consumer._raise_callback_error()
    assert sink.rolled_back == 1
    assert consumer.engine.tx is None
    assert not consumer._parts and not consumer._streaming and not consumer._need_reseek
    assert kafka.calls == []  # the client unassigns after the callback


def test_eager_assign_takes_the_whole_assignment_at_the_stored_offsets() -> None:
    consumer = ApplyConsumer(_settings("range"))
    stored = {("p.payment", 0): 120, ("p.data", 3): 7, ("p.merchant", 1): -1}
    sink, kafka = _FakeSink(stored), _FakeKafka()
    consumer.engine.sink = sink  # type: ignore[assignment]
    # A leftover of a revoke whose callback failed: not in the new assignment, so not ours.
    consumer._parts[("p.payment", 5)] = OwnedPartition("p.payment", 5, committed=3, cursor=9)
    new = [TopicPartition(t, p) for t, p in [*stored, ("p.merchant", 4)]]
    consumer._on_assign(kafka, new)
    consumer._raise_callback_error()
    begin = OFFSET_BEGINNING
    at = [("p.payment", 0, 120), ("p.data", 3, 7), ("p.merchant", 1, begin)]
    at.append(("p.merchant", 4, begin))
    assert kafka.calls == [("assign", at)]
    assert {tp: (p.committed, p.cursor) for tp, p in consumer._parts.items()} == {
        ("p.payment", 0): (120, 120),
        ("p.data", 3): (7, 7),
        ("p.merchant", 1): (None, 0),
        ("p.merchant", 4): (None, 0),
    }


def test_cooperative_assign_adds_to_what_the_member_keeps() -> None:
    consumer, _, kafka = _consumer_with_long_tx()
    consumer.engine.sink.stored = {("p.data", 0): 5}  # type: ignore[union-attr]
    consumer._on_assign(kafka, [TopicPartition("p.data", 0)])
    consumer._raise_callback_error()
    assert kafka.calls == [("incremental_assign", [("p.data", 0, 5)])]
    assert len(consumer._parts) == 4 and consumer.engine.tx is not None


def test_the_apply_loop_collects_cycles_less_often() -> None:
    """The cyclic GC ran every ~20 events at CPython's default threshold (~19 µs per event)."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with tuned_gc():
            assert gc.get_threshold() == (50_000, 10, 10)
            assert gc.get_freeze_count() > 0  # what existed at start is never scanned again
        # Undone for an in-process caller: nothing stays frozen, the threshold is back.
        assert gc.get_threshold() == (700, 10, 10)
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
