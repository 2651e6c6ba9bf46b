"""Verify's lag awareness on the real stack: the applied position of a domain counts every
partition of its topic as Kafka reports it, not the configured count (a topic created with more
partitions than configured must not let verify judge commerce before the extra ones are applied)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from control.positions import PositionReader
from control.verify import connect, current_lsn
from cutover.config import Settings
from tests.integration.test_verify_support import (
    PARTITIONS,
    commerce,
    legacy,
    mapping,
    scratch_pair,
    seed,
    stage_pipeline,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def wider_topic(source_dsn: str, target_dsn: str, kafka_bootstrap: str) -> Iterator[Settings]:
    """A scratch pipeline whose ``data`` topic has one partition more than configured, with one
    message in that extra partition."""
    with scratch_pair(source_dsn, target_dsn, kafka_bootstrap) as settings:
        seed(settings, orders=20)
        stage_pipeline(settings)  # offsets rows for the configured partitions only
        topic = settings.kafka.topic("data")
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        new = NewTopic(topic, num_partitions=PARTITIONS + 1, replication_factor=1)
        for fut in admin.create_topics([new], operation_timeout=30).values():
            fut.result(timeout=30)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(topic, key=b"k", value=b"v", partition=PARTITIONS)
        assert producer.flush(10) == 0
        yield settings


def test_applied_position_counts_the_topics_real_partitions(wider_topic: Settings) -> None:
    s = wider_topic
    topic = s.kafka.topic("data")
    with connect(s.source.dsn, "source") as lg, connect(s.target.dsn, "target") as cm:
        lsn = current_lsn(lg)
        # every configured partition applied everything up to lsn; the producer delivered it
        commerce(
            s,
            "UPDATE cutover.consumer_offsets SET last_source_lsn = %s WHERE topic = %s",
            [lsn, topic],
        )
        legacy(s, "UPDATE cutover.producer_state SET delivered_lsn = %s", [lsn])
        reader = PositionReader(s, mapping(), lg, cm)
        try:
            # the extra partition holds a message no consumer applied: nothing counts as applied
            assert reader.applied("data") == 0
            # once its consumer is past that message, the domain is caught up
            commerce(
                s,
                "INSERT INTO cutover.consumer_offsets (group_id, topic, kafka_partition, "
                "next_offset, last_source_lsn) VALUES (%s, %s, %s, 1, NULL)",
                [s.apply.group_id, topic, PARTITIONS],
            )
            assert reader.applied("data") == lsn
        finally:
            reader.close()
