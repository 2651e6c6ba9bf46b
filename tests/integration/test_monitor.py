"""`cutover monitor` on the real stack: its lag figures agree with Kafka's own
kafka-consumer-groups tool (ConsumerGroupCommand, run from the stack's jars), and the slot,
producer heartbeat and dead-letter figures reflect what happened.

A real apply consumer applies part of a backlog (one poison message included, so a dead
letter exists), more messages are produced afterwards so that the group lags, then both tools
describe the group.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cli import main as cli
from control.monitor import KafkaProbe, Monitor
from cutover.config import Settings, SourceSettings
from cutover.control_store import LEGACY_SCHEMA, ControlStore
from cutover.control_store.producer import record_position
from devtools.apply_support import (
    EventFactory,
    Message,
    ShopModel,
    Topics,
    apply_until,
    delete_topics,
    init_control,
    make_topics,
    produce,
    publish_schemas,
    settings_for,
    total_offsets,
    wait_for,
)
from tests.integration.conftest import skip_or_fail

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KAFKA_LIBS = REPO / ".stack-cache" / "kafka-libs"


def kafka_consumer_groups(bootstrap: str, group: str) -> dict[tuple[str, int], dict[str, str]]:
    """``kafka-consumer-groups --describe --group G`` from the stack's jars, parsed by column."""
    java = shutil.which("java")
    if java is None or not KAFKA_LIBS.is_dir():
        skip_or_fail("java or the Kafka jars (.stack-cache/kafka-libs) are missing: run `make up`")
    result = subprocess.run(
        [
            java,
            "-Xmx256m",
            "-cp",
            f"{KAFKA_LIBS}/*",
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server",
            bootstrap,
            "--describe",
            "--group",
            group,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows: dict[tuple[str, int], dict[str, str]] = {}
    header: list[str] | None = None
    for line in result.stdout.splitlines():
        cells = line.split()
        if cells[:2] == ["GROUP", "TOPIC"]:
            header = cells
        elif header is not None and len(cells) >= 6 and cells[0] == group:
            row = dict(zip(header, cells, strict=False))
            rows[(row["TOPIC"], int(row["PARTITION"]))] = row
    assert rows, result.stdout
    return rows


def _num(cell: str) -> int | None:
    return None if cell == "-" else int(cell)


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=3)
    try:
        yield t
    finally:
        delete_topics(t)


@pytest.fixture
def slot(fresh_legacy: str) -> Iterator[tuple[str, str]]:
    """A pgoutput slot (and the producer's control tables) in a scratch legacy database."""
    name = f"cutover_mon_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(fresh_legacy, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    try:
        yield fresh_legacy, name
    finally:
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))


def _settings(commerce: str, topics: Topics, legacy: str, slot_name: str) -> Settings:
    base = settings_for(commerce, topics, group=f"mon-{uuid.uuid4().hex[:8]}")
    return dataclasses.replace(base, source=SourceSettings(dsn=legacy, slot=slot_name))


def test_monitor_agrees_with_kafka_consumer_groups(
    topics: Topics,
    *,
    fresh_commerce: str,
    slot: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    legacy, slot_name = slot
    init_control(fresh_commerce)
    settings = _settings(fresh_commerce, topics, legacy, slot_name)
    group = settings.apply.group_id
    factory = EventFactory(topics.prefix, 3)
    publish_schemas(topics, factory)
    model = ShopModel(factory, seed=5, description_size=200)
    first: list[Message] = []
    while len(first) < 600:
        first.extend(model.step())
    poison = Message(topics.topic("payment"), 0, b"1", b"definitely not avro")
    produce(topics.bootstrap, [*first, poison])
    apply_until(settings, lambda: total_offsets(fresh_commerce, group) >= len(first) + 1)

    probe = KafkaProbe(settings)
    try:
        # Kafka's committed offsets are a hint committed asynchronously after each COMMIT.
        def hint_caught_up() -> bool:
            reading = probe.read([settings.kafka.topic(d) for d in ("payment", "data", "merchant")])
            return sum(o or 0 for o in reading.committed.values()) >= len(first) + 1

        wait_for(hint_caught_up, 30, "the Kafka commit hints")
    finally:
        probe.close()
    # More traffic the group has not consumed: every domain lags.
    later: list[Message] = []
    while len(later) < 300:
        later.extend(model.step())
    produce(topics.bootstrap, later)
    # The producer's record of its heartbeat, and some WAL behind the slot.
    with psycopg.connect(legacy, autocommit=True) as conn:
        store = ControlStore(conn, LEGACY_SCHEMA, "source")
        store.ensure("producer")
        record_position(store, slot_name, "pub", 0, "test:1")
        conn.execute("CREATE TABLE wal_filler AS SELECT g FROM generate_series(1, 20000) g")

    monitor = Monitor(settings)
    try:
        report = monitor.sample()
    finally:
        monitor.close()
    theirs = kafka_consumer_groups(topics.bootstrap, group)

    assert report.errors == []
    compared = 0
    for t in report.topics:
        for p in t.partitions:
            row = theirs.get((t.topic, p.partition))
            if row is None:  # the tool lists only partitions the group committed
                assert p.committed_offset is None
                continue
            assert p.end_offset == int(row["LOG-END-OFFSET"]), (t.topic, p.partition)
            assert p.committed_offset == _num(row["CURRENT-OFFSET"]), (t.topic, p.partition)
            assert p.lag == _num(row["LAG"]), (t.topic, p.partition)
            compared += 1
    assert compared >= 6
    assert sum(t.lag or 0 for t in report.topics) == len(later)
    assert sum(t.applied_lag or 0 for t in report.topics) == len(later)
    # Slot, producer heartbeat, dead letters.
    assert report.slot is not None and report.slot.exists
    assert report.slot.wal_status == "reserved"
    assert (report.slot.lag_bytes or 0) > 100_000
    assert report.producer_heartbeat_age_s is not None
    assert 0 <= report.producer_heartbeat_age_s < 60
    assert report.dead_letters.open_by_domain == {"payment": 1}
    assert report.dead_letters.dlq_end_offset == 1
    payment = report.topics[0]
    assert payment.domain == "payment" and payment.dead_letters_open == 1

    # The command line: --once --json for scripts (the lead registers the module in the CLI).
    config = tmp_path / "cutover.toml"
    config.write_text(
        f'[source]\nslot = "{slot_name}"\n'
        f'[kafka]\ntopic_prefix = "{topics.prefix}"\npartitions = 3\n'
        f'[apply]\ngroup_id = "{group}"\n'
        f'[mapping]\nfile = "{REPO / "examples" / "shop" / "mapping.toml"}"\n'
    )
    monkeypatch.setenv("CUTOVER_SOURCE_DSN", legacy)
    monkeypatch.setenv("CUTOVER_TARGET_DSN", fresh_commerce)
    monkeypatch.setenv("CUTOVER_KAFKA_BOOTSTRAP", topics.bootstrap)
    capsys.readouterr()  # what the in-process consumer logged before
    code = cli.main(["--config", str(config), "monitor", "--once", "--json", "--interval", "0.2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["group_id"] == group
    assert [t["lag"] for t in doc["topics"]] == [t.lag for t in report.topics]
    assert doc["topics"][0]["apply_rate_msgs_per_s"] == 0.0  # nothing is being applied
    assert doc["slot"]["wal_status"] == "reserved"
    # A source that cannot be read: the rest is still reported, exit 3.
    monkeypatch.setenv("CUTOVER_SOURCE_DSN", "host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    code = cli.main(["--config", str(config), "monitor", "--once", "--json", "--interval", "0.1"])
    out, err = capsys.readouterr()
    assert code == 3
    doc = json.loads(out)
    assert doc["slot"] is None and any("source database" in e for e in doc["errors"])
    assert doc["topics"][0]["lag"] == report.topics[0].lag
