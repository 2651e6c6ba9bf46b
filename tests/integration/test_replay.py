"""`cutover replay` on the real stack: record a topic range, play it into a topic (same bytes,
partitions and order) and into sandbox commerce databases (deterministic), filters, and bad
input through the command line (clear message, exit 2 or 3).

Events are encoded by hand with cutover.codec (devtools/apply_support.py) and
produced with known timestamps to fresh topics under a unique prefix.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from cli import main as cli
from consumers.replay import (
    Filters,
    Rate,
    ReplayFile,
    make_filters,
    play_to_target,
    play_to_topic,
    record,
)
from cutover.config import KafkaSettings
from devtools.apply_support import (
    TARGET_KEY,
    EventFactory,
    Message,
    ShopModel,
    Topics,
    delete_topics,
    expected_commerce,
    fetch_commerce,
    init_control,
    make_topics,
    producer,
    publish_schemas,
    settings_for,
    table_checksums,
)
from devtools.readback import RawMessage, read_all

pytestmark = pytest.mark.integration

# Recent: older timestamps would fall to the topics' time-based retention at once.
T0_MS = (int(time.time()) - 3600) * 1000
STEP_MS = 10
PAYMENT_TABLES = ("orders", "order_lines", "payments", "invoices")


@dataclass
class Recorded:
    topics: Topics
    factory: EventFactory
    model: ShopModel
    messages: list[Message]  # in produce order, with timestamps T0 + i * STEP_MS

    def on(self, topic: str) -> list[tuple[int, Message]]:
        return [(i, m) for i, m in enumerate(self.messages) if m.topic == topic]


def _produce_timed(bootstrap: str, messages: Sequence[Message]) -> None:
    prod = producer(bootstrap)
    errors: list[str] = []
    for i, m in enumerate(messages):
        prod.produce(
            m.topic,
            value=m.value,
            key=m.key,
            partition=m.partition,
            headers=list(m.headers),
            timestamp=T0_MS + i * STEP_MS,
            on_delivery=lambda err, _m: errors.append(str(err)) if err else None,
        )
        if i % 5000 == 0:
            prod.poll(0)
    assert prod.flush(60) == 0
    assert not errors, errors[:3]


@pytest.fixture(scope="module")
def shop(kafka_bootstrap: str) -> Iterator[Recorded]:
    topics = make_topics(kafka_bootstrap, partitions=3)
    factory = EventFactory(topics.prefix, 3)
    publish_schemas(topics, factory)
    model = ShopModel(factory, seed=11, description_size=400)
    messages: list[Message] = []
    while len(messages) < 3000:
        messages.extend(model.step(ts_ms=T0_MS + len(messages)))
    _produce_timed(kafka_bootstrap, messages)
    try:
        yield Recorded(topics, factory, model, messages)
    finally:
        delete_topics(topics)


def _kafka(shop: Recorded) -> KafkaSettings:
    return KafkaSettings(bootstrap=shop.topics.bootstrap, topic_prefix=shop.topics.prefix)


def _by_partition(msgs: Sequence[RawMessage]) -> dict[int, list[tuple[Any, ...]]]:
    out: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
    for m in msgs:
        out[m.partition].append((m.key, m.value, m.headers))
    return dict(out)


def test_record_then_play_to_a_topic_keeps_everything(shop: Recorded, tmp_path: Path) -> None:
    topic = shop.topics.topic("payment")
    out = tmp_path / "payment.avro"
    seen: list[tuple[int, int]] = []
    summary = record(_kafka(shop), topic, out, Filters(), progress=lambda d, t: seen.append((d, t)))
    expected = shop.on(topic)
    assert summary.events == summary.scanned == len(expected)
    assert summary.raw_values == 0
    assert seen[-1] == (len(expected), len(expected))
    # Any Avro reader: typed values (decimals, timestamps), positions, keys, headers.
    with out.open("rb") as fh:
        rows: list[dict[str, Any]] = list(fastavro.reader(fh))  # type: ignore[arg-type]
    assert {r["topic"] for r in rows} == {topic}
    first = next(r for r in rows if r["value"]["source"]["table"] == "orders")
    assert first["value"]["after"]["total_idr"].as_tuple().exponent == -2  # a Decimal
    assert all(r["headers"] == [{"key": "cutover.kind", "value": b"change"}] for r in rows)
    by_part: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        by_part[r["partition"]].append(r["offset"])
    assert all(offs == sorted(offs) for offs in by_part.values())
    assert {r["timestamp_ms"] for r in rows} == {T0_MS + i * STEP_MS for i, _m in expected}

    # Play into a fresh topic set: same partitions, keys, headers, value bytes, order.
    target = make_topics(shop.topics.bootstrap, partitions=3)
    try:
        played = play_to_topic(_kafka(shop), out, target.topic("payment"), Filters(), Rate())
        assert played.played == len(expected)
        original = read_all(shop.topics.bootstrap, [topic])
        copy = read_all(shop.topics.bootstrap, [target.topic("payment")])
        assert _by_partition(copy) == _by_partition(original)
        # The writer schemas went to the target's schemas topic: its consumers can decode.
        schemas = read_all(shop.topics.bootstrap, [target.schemas])
        fps = {m.key.decode() for m in schemas if m.key}
        payment = ("orders", "order_items", "payments", "invoices")
        assert fps == {shop.factory.schemas[t].fingerprint_hex for t in payment}
    finally:
        delete_topics(target)


def _sandbox(admin_dsn: str) -> Iterator[str]:
    from devtools.scratch import scratch_database
    from tests.integration.conftest import EXAMPLES

    for dsn in scratch_database(admin_dsn, EXAMPLES / "commerce.sql", "replay"):
        init_control(dsn)
        yield dsn


@pytest.fixture
def sandbox_a(target_dsn: str) -> Iterator[str]:
    yield from _sandbox(target_dsn)


@pytest.fixture
def sandbox_b(target_dsn: str) -> Iterator[str]:
    yield from _sandbox(target_dsn)


def test_play_to_sandboxes_is_deterministic(
    shop: Recorded, tmp_path: Path, sandbox_a: str, sandbox_b: str
) -> None:
    topic = shop.topics.topic("payment")
    out = tmp_path / "payment.avro"
    record(_kafka(shop), topic, out, Filters())
    settings = settings_for(sandbox_a, shop.topics)
    first = play_to_target(settings, out, sandbox_a, Filters(), Rate(), batch_events=500)
    assert first.played == len(shop.on(topic))
    assert first.dead_letters == 0
    sums_a = table_checksums(sandbox_a)
    # Through the apply path: what the hand-written reference mapping says.
    want = expected_commerce(shop.model.legacy)
    got = fetch_commerce(sandbox_a)
    for table in PAYMENT_TABLES:
        assert got[table] == want[table], table
    # Another empty sandbox, other batch sizes: identical tables, bookkeeping included.
    play_to_target(settings, out, sandbox_b, Filters(), Rate(), batch_events=97)
    assert table_checksums(sandbox_b) == sums_a
    # Played again into the same sandbox: the position guards make it a no-op.
    again = play_to_target(settings, out, sandbox_a, Filters(), Rate())
    assert again.upserted == again.deleted == 0
    assert table_checksums(sandbox_a) == sums_a


def test_filters_by_offset_time_key_and_table(shop: Recorded, tmp_path: Path) -> None:
    topic = shop.topics.topic("payment")
    expected = shop.on(topic)
    # Offsets: [5, 25) of partition 1.
    out = tmp_path / "offsets.avro"
    s = record(_kafka(shop), topic, out, make_filters(partitions=[1], from_offset=5, to_offset=25))
    with ReplayFile(out) as f:
        got = [(r.partition, r.offset) for r in f]
    assert got == [(1, o) for o in range(5, 25)] and s.events == 20
    # Times: the messages produced in [t(100), t(400)).
    lo, hi = T0_MS + 100 * STEP_MS, T0_MS + 400 * STEP_MS
    out = tmp_path / "times.avro"
    record(_kafka(shop), topic, out, Filters(from_time_ms=lo, to_time_ms=hi))
    with ReplayFile(out) as f:
        values = sorted(r.value or b"" for r in f)
    assert values == sorted(m.value for i, m in expected if 100 <= i < 400)
    # Key and table.
    key = expected[0][1].key
    out = tmp_path / "key.avro"
    record(_kafka(shop), topic, out, make_filters(keys=[key.decode()], tables=["shop.orders"]))
    with ReplayFile(out) as f:
        values = [r.value or b"" for r in f]
    want = [
        m.value
        for _i, m in expected
        if m.key == key and shop.factory.schemas["orders"].header == m.value[:10]
    ]
    assert values == want and want
    # The same filters on play.
    full = tmp_path / "full.avro"
    record(_kafka(shop), topic, full, Filters())
    target = make_topics(shop.topics.bootstrap, partitions=3)
    try:
        s2 = play_to_topic(
            _kafka(shop), full, target.topic("payment"), make_filters(tables=["payments"]), Rate()
        )
        copy = read_all(shop.topics.bootstrap, [target.topic("payment")])
        assert len(copy) == s2.played
        assert s2.played + s2.skipped == len(expected)
        assert all(
            m.value and m.value[:10] == shop.factory.schemas["payments"].header for m in copy
        )
    finally:
        delete_topics(target)


def test_rate_limits_playing(shop: Recorded, tmp_path: Path) -> None:
    topic = shop.topics.topic("data")
    out = tmp_path / "data.avro"
    record(_kafka(shop), topic, out, make_filters(to_offset=20))
    target = make_topics(shop.topics.bootstrap, partitions=3)
    try:
        s = play_to_topic(_kafka(shop), out, target.topic("data"), Filters(), Rate("events", 40))
        # 20 per partition at most, 40 events/s: at least (n - 1) / 40 seconds.
        assert s.seconds >= (s.played - 1) / 40 - 0.05
    finally:
        delete_topics(target)


# ----------------------------------------------------------------------------- the command line


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``cli.main.main``: exit code, stdout, stderr."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli_env(
    shop: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target_dsn: str
) -> Path:
    config = tmp_path / "cutover.toml"
    mapping = Path(__file__).resolve().parents[2] / "examples" / "shop" / "mapping.toml"
    config.write_text(
        f'[kafka]\ntopic_prefix = "{shop.topics.prefix}"\npartitions = 3\n'
        f'[mapping]\nfile = "{mapping}"\n'
    )
    monkeypatch.setenv("CUTOVER_KAFKA_BOOTSTRAP", shop.topics.bootstrap)
    monkeypatch.setenv("CUTOVER_SOURCE_DSN", "dbname=unused")
    monkeypatch.setenv("CUTOVER_TARGET_DSN", target_dsn)
    return config


def test_cli_record_and_play(
    shop: Recorded,
    cli_env: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sandbox_a: str,
) -> None:
    topic = shop.topics.topic("merchant")
    out = tmp_path / "m.avro"
    base = ["--config", str(cli_env), "--log-json"]
    code, stdout, err = _main([*base, "replay", "record", "--topic", topic, "--out", str(out),
                               "--json"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["events"] == len(shop.on(topic))
    code, stdout, err = _main(
        [*base, "replay", "play", str(out), "--to-target", sandbox_a, "--json"], capsys
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["played"] == len(shop.on(topic)) and report["dead_letters"] == 0
    secret = psycopg.conninfo.conninfo_to_dict(sandbox_a).get("password")
    assert not secret or str(secret) not in stdout + err
    with psycopg.connect(sandbox_a) as conn:
        row = conn.execute("SELECT count(*) FROM commerce.sellers").fetchone()
    assert row is not None
    assert row[0] == len(shop.model.legacy["merchants"])
    assert TARGET_KEY  # the helper module's contract is what the tables are compared with


def _respell(dsn: str) -> str:
    """The same database, spelled otherwise: URL form instead of keywords, localhost for
    127.0.0.1 (or the other way round), an extra parameter."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(params.get("host", "127.0.0.1"))
    other = "localhost" if host == "127.0.0.1" else "127.0.0.1"
    user = f"{params['user']}:{params['password']}@" if params.get("password") else ""
    return f"postgresql://{user}{other}:{params['port']}/{params['dbname']}?connect_timeout=7"


def test_cli_refuses_to_play_into_a_live_database(
    *,
    shop: Recorded,
    cli_env: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sandbox_a: str,
    sandbox_b: str,
) -> None:
    from cutover.control_store import ensure_control_plane

    # The configured target is sandbox_a, which already holds the payment domain.
    monkeypatch.setenv("CUTOVER_TARGET_DSN", sandbox_a)
    payment = tmp_path / "p.avro"
    record(_kafka(shop), shop.topics.topic("payment"), payment, Filters())
    play_to_target(settings_for(sandbox_a, shop.topics), payment, sandbox_a, Filters(), Rate())
    live = table_checksums(sandbox_a)
    merchant = tmp_path / "m.avro"
    record(_kafka(shop), shop.topics.topic("merchant"), merchant, Filters())
    base = ["--config", str(cli_env), "replay", "play", str(merchant), "--json"]

    # The configured target, as configured and spelled otherwise: refused, nothing written.
    for dsn in (sandbox_a, _respell(sandbox_a)):
        code, _out, err = _main([*base, "--to-target", dsn], capsys)
        assert code == 2, err
        assert "it is the configured target database" in err
        assert "--i-know-this-is-live" in err
        secret = psycopg.conninfo.conninfo_to_dict(sandbox_a).get("password")
        assert not secret or str(secret) not in err
        assert table_checksums(sandbox_a) == live

    # A database that holds consumer positions, then one that holds a cutover state.
    with psycopg.connect(sandbox_b, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO cutover.consumer_offsets (group_id, topic, kafka_partition, next_offset) "
            "VALUES ('shop-apply', 'x.payment', 0, 42)"
        )
    empty = table_checksums(sandbox_b)
    code, _out, err = _main([*base, "--to-target", sandbox_b], capsys)
    assert code == 2 and "consumer positions" in err and "shop-apply" in err, err
    with psycopg.connect(sandbox_b, autocommit=True) as conn:
        conn.execute("DELETE FROM cutover.consumer_offsets")
        ensure_control_plane(conn, "cutover")
        conn.execute("INSERT INTO cutover.domain_state (domain) VALUES ('merchant')")
    code, _out, err = _main([*base, "--to-target", sandbox_b], capsys)
    assert code == 2 and "cutover state" in err, err
    assert table_checksums(sandbox_b) == empty

    # A fresh sandbox: played.
    with psycopg.connect(sandbox_b, autocommit=True) as conn:
        conn.execute("DROP TABLE cutover.domain_state CASCADE")
    code, out, err = _main([*base, "--to-target", sandbox_b], capsys)
    assert code == 0, err
    assert json.loads(out)["played"] == len(shop.on(shop.topics.topic("merchant")))

    # The override with a reason: played into the live database, and audited there.
    override = ["--actor", "tester", "--i-know-this-is-live", "INC-7: reload merchants"]
    code, out, err = _main([*base, "--to-target", _respell(sandbox_a), *override], capsys)
    assert code == 0, err
    assert table_checksums(sandbox_a) != live
    with psycopg.connect(sandbox_a) as conn:
        rows = conn.execute(
            "SELECT actor, command, outcome, forced, reason, detail FROM cutover.audit"
        ).fetchall()
    assert len(rows) == 1
    actor, command, outcome, forced, reason, detail = rows[0]
    assert (actor, command, outcome, forced) == ("tester", "replay play", "forced", True)
    assert reason == "INC-7: reload merchants"
    assert str(merchant) == detail["file"]
    assert any("configured target" in why for why in detail["live_because"])
    # An override without a reason is no override.
    code, _out, err = _main([*base, "--to-target", sandbox_a, "--i-know-this-is-live", " "],
                            capsys)  # fmt: skip
    assert code == 2, err


def test_cli_bad_input(
    shop: Recorded, cli_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--config", str(cli_env)]
    topic = shop.topics.topic("payment")
    # Missing file: usage (2).
    code, _o, err = _main([*base, "replay", "play", str(tmp_path / "nope.avro"),
                           "--to-topic", topic], capsys)  # fmt: skip
    assert code == 2 and "no such replay file" in err
    # Damaged file: runtime (3).
    bad = tmp_path / "bad.avro"
    bad.write_bytes(b"Obj\x01 definitely not a replay file, just junk bytes")
    code, _o, err = _main([*base, "replay", "play", str(bad), "--to-topic", topic], capsys)
    assert code == 3 and "not a valid cutover replay file" in err
    # Unknown topic: usage (2), and no file written.
    out = tmp_path / "x.avro"
    ghost = f"{shop.topics.prefix}.ghost-{uuid.uuid4().hex[:6]}"
    code, _o, err = _main([*base, "replay", "record", "--topic", ghost, "--out", str(out)], capsys)
    assert code == 2 and f"topic {ghost} does not exist" in err
    assert not out.exists()
    # A range with nothing in it: usage (2), no file.
    code, _o, err = _main([*base, "replay", "record", "--topic", topic, "--from-offset",
                           "1000000", "--out", str(out)], capsys)  # fmt: skip
    assert code == 2 and "holds no messages" in err
    code, _o, err = _main([*base, "replay", "record", "--topic", topic, "--key", "no-such-key",
                           "--out", str(out)], capsys)  # fmt: skip
    assert code == 2 and "matched the filters" in err
    assert not out.exists() and not list(tmp_path.glob(".x.avro*"))
    # Bad flags: usage (2).
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "replay", "play", str(bad), "--to-topic", topic, "--to-target", "x"])
    assert exc.value.code == 2
    code, _o, err = _main([*base, "replay", "play", str(bad), "--to-topic", topic,
                           "--rate", "fast"], capsys)  # fmt: skip
    assert code == 2 and "--rate" in err
    # Playing into a topic with too few partitions: usage (2).
    full = tmp_path / "full.avro"
    record(_kafka(shop), topic, full, Filters())
    small = f"{shop.topics.prefix}.small"
    admin = AdminClient({"bootstrap.servers": shop.topics.bootstrap})
    admin.create_topics([NewTopic(small, num_partitions=1, replication_factor=1)])[small].result(30)
    try:
        code, _o, err = _main([*base, "replay", "play", str(full), "--to-topic", small], capsys)
        assert code == 2 and "needs at least 3" in err
    finally:
        admin.delete_topics([small])[small].result(30)
