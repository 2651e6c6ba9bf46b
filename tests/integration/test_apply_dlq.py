"""Poison messages on the real stack: every kind lands in the DLQ topic (with headers) and in
cutover.dead_letters while the good rows of the same batch are applied; an unknown fingerprint
published to the schemas topic later is not poison; the halt policy exits 3 without moving the
offsets past the poison; `cutover dlq list` / `cutover dlq retry` re-drive letters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from cutover.codec import ColumnSpec, encode, envelope_schema, writer_schema
from devtools.apply_support import (
    EXAMPLES,
    LEGACY,
    REPO,
    EventFactory,
    Topics,
    apply_until,
    cli_env,
    consume_all,
    delete_topics,
    fetch_commerce,
    make_topics,
    offsets,
    produce,
    producer,
    publish_schemas,
    settings_for,
    start_apply,
    total_offsets,
    write_config,
)

pytestmark = pytest.mark.integration

T = datetime(2025, 3, 1, tzinfo=UTC)


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=1)
    try:
        yield t
    finally:
        delete_topics(t)


def _merchant(mid: int, status: str = "active") -> dict[str, object]:
    return {
        "id": mid,
        "owner_user_id": 1,
        "shop_name": f"S{mid}",
        "status": status,
        "rating": Decimal("4.50"),
        "created_at": T,
        "updated_at": T,
    }


def _item(oid: int, line: int, qty: int) -> dict[str, object]:
    return {
        "order_id": oid,
        "line_no": line,
        "product_id": 5,
        "qty": qty,
        "unit_price_idr": Decimal("10.00"),
    }


def _poison_batch(f: EventFactory, topics: Topics) -> tuple[list[tuple[str, bytes, str]], int]:
    """Good and poison messages interleaved; returns (topic, value, expected error class) of
    each poison message and the number of messages."""
    merchant = f"{topics.prefix}.merchant"
    payment = f"{topics.prefix}.payment"
    unknown = b"\xc3\x01" + bytes(range(8)) + b"\x00\x02"
    good1 = f.change("merchants", "c", _merchant(1), lsn=100, seq=0)
    bad_enum = f.change("merchants", "c", _merchant(2, "weird"), lsn=110, seq=0)
    good2 = f.change("merchants", "c", _merchant(3), lsn=120, seq=0)
    good_line = f.change("order_items", "c", _item(9, 1, 2), lsn=130, seq=0)
    bad_check = f.change("order_items", "c", _item(9, 2, 0), lsn=130, seq=1)  # quantity > 0
    good_line2 = f.change("order_items", "c", _item(9, 3, 1), lsn=130, seq=2)
    msgs = [good1, bad_enum, good2, good_line, bad_check, good_line2]
    prod = producer(topics.bootstrap)
    produce(topics.bootstrap, msgs, prod)
    prod.produce(merchant, value=b"not avro at all", key=b"4", partition=0)
    prod.produce(payment, value=unknown, key=b"9", partition=0)
    assert prod.flush(30) == 0
    poison = [
        (merchant, bad_enum.value, "UnmappableRow"),
        (payment, bad_check.value, "DatabaseError"),
        (merchant, b"not avro at all", "DecodeError"),
        (payment, unknown, "UnknownSchema"),
    ]
    return poison, len(msgs) + 2


def test_each_kind_of_poison_is_dead_lettered_and_good_rows_applied(
    commerce: str, topics: Topics, tmp_path: Path
) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    poison, n = _poison_batch(f, topics)
    settings = settings_for(commerce, topics)
    apply_until(settings, lambda: total_offsets(commerce, settings.apply.group_id) == n)

    rows = fetch_commerce(commerce)
    assert sorted(rows["sellers"]) == [(1,), (3,)]
    assert sorted(rows["order_lines"]) == [(9, 1), (9, 3)]

    with psycopg.connect(commerce) as conn:
        letters = conn.execute(
            "SELECT topic, kafka_partition, kafka_offset, payload, error_class, error_message, "
            "status, domain FROM cutover.dead_letters ORDER BY id"
        ).fetchall()
    by_value = {bytes(row[3]): row for row in letters}
    assert len(letters) == 4
    for topic, value, error_class in poison:
        row = by_value[value]
        assert row[0] == topic and row[1] == 0 and row[4] == error_class and row[6] == "open"
        assert row[7] == topic.rsplit(".", 1)[1]
    assert "not in the enum table" in by_value[poison[0][1]][5]
    assert "order_lines_quantity_check" in by_value[poison[1][1]][5]

    dlq = consume_all(topics.bootstrap, topics.dlq, expect=4)
    assert len(dlq) == 4
    for msg in dlq:
        headers = dict(msg.headers())
        row = by_value[msg.value()]
        assert headers["cutover.source_topic"].decode() == row[0]
        assert headers["cutover.source_partition"] == b"0"
        assert int(headers["cutover.source_offset"]) == row[2]
        assert headers["cutover.error_class"].decode() == row[4]
        assert headers["cutover.error"].decode()
    assert {m.key() for m in dlq} == {b"2", b"9", b"4"}

    # `cutover dlq list --json`
    config = write_config(tmp_path, topics, group=settings.apply.group_id)
    env = cli_env(commerce, topics.bootstrap)
    listed = _cli(config, env, "dlq", "list", "--json", "--status", "open")
    assert listed.returncode == 0, listed.stderr
    assert {r["error_class"] for r in json.loads(listed.stdout)} == {
        "UnmappableRow",
        "DatabaseError",
        "DecodeError",
        "UnknownSchema",
    }

    # Fix the mapping (a new merchant status) and retry that letter: it applies.
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        (EXAMPLES / "mapping.toml")
        .read_text()
        .replace('closed = "CLOSED" }', 'closed = "CLOSED", weird = "SUSPENDED" }')
    )
    fixed = config.read_text().replace(str(EXAMPLES / "mapping.toml"), str(mapping))
    config.write_text(fixed)
    enum_id = _letter_id(commerce, "UnmappableRow")
    retried = _cli(config, env, "dlq", "retry", "--id", str(enum_id), "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["retried"] == [enum_id]
    assert fetch_commerce(commerce)["sellers"][(2,)]["state"] == "SUSPENDED"

    # Retry all: the others still fail and stay open with their error (exit 1).
    again = _cli(config, env, "dlq", "retry", "--all", "--json")
    assert again.returncode == 1, again.stderr
    report = json.loads(again.stdout)
    assert report["retried"] == [] and len(report["failed"]) == 3
    with psycopg.connect(commerce) as conn:
        status: dict[str, str] = dict(
            conn.execute("SELECT error_class, status FROM cutover.dead_letters").fetchall()
        )
    assert status == {
        "UnmappableRow": "retried",
        "DatabaseError": "open",
        "DecodeError": "open",
        "UnknownSchema": "open",
    }
    human = _cli(config, env, "dlq", "list")
    assert human.returncode == 0 and "retried" in human.stdout


def test_unknown_fingerprint_is_read_from_the_schemas_topic_first(
    commerce: str, topics: Topics
) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    settings = settings_for(commerce, topics)
    group = settings.apply.group_id
    produce(topics.bootstrap, [f.change("merchants", "c", _merchant(1), lsn=100, seq=0)])
    apply_until(settings, lambda: total_offsets(commerce, group) == 1)

    # ALTER TABLE ... ADD COLUMN at the source: a new writer schema, published before its first
    # event (as the producer does), unknown to a consumer that read the schemas topic earlier.
    cols = [*LEGACY["merchants"], ColumnSpec("tagline", 25, -1)]
    schema = envelope_schema("shop", "merchants", cols)
    ws = writer_schema(schema)
    prod = producer(topics.bootstrap)
    prod.produce(topics.schemas, key=ws.fingerprint_hex.encode(), value=json.dumps(schema))
    record = f.record("merchants", "u", _merchant(1, "closed"), lsn=200, seq=0)
    record["after"]["tagline"] = "new column"
    record["before"] = None
    prod.produce(f"{topics.prefix}.merchant", value=encode(ws, record), key=b"1", partition=0)
    assert prod.flush(30) == 0
    apply_until(settings, lambda: total_offsets(commerce, group) == 2)
    assert fetch_commerce(commerce)["sellers"][(1,)]["state"] == "CLOSED"
    with psycopg.connect(commerce) as conn:
        assert conn.execute("SELECT count(*) FROM cutover.dead_letters").fetchone() == (0,)


def test_halt_policy_exits_3_naming_the_message_and_keeps_offsets_before_it(
    commerce: str, topics: Topics, tmp_path: Path
) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    group = "halt-group"
    good = [f.change("merchants", "c", _merchant(i), lsn=100 + i, seq=0) for i in range(1, 4)]
    produce(topics.bootstrap, good)
    config = write_config(tmp_path, topics, group=group, dlq_policy="halt")
    env = cli_env(commerce, topics.bootstrap)
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.entry",
            "--config",
            str(config),
            "apply",
            "--exit-when-idle",
            "3",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    merchant = f"{topics.prefix}.merchant"
    assert offsets(commerce, group) == {(merchant, 0): 3}

    bad = f.change("merchants", "c", _merchant(9, "weird"), lsn=200, seq=0)
    after = f.change("merchants", "c", _merchant(10), lsn=210, seq=0)
    produce(topics.bootstrap, [bad, after])
    proc = start_apply(config, env, "--exit-when-idle", "30", log=tmp_path / "halt.log")
    code = proc.wait(120)
    output = (tmp_path / "halt.log").read_text()
    assert code == 3, output
    assert f"poison message at {merchant} [0] offset 3" in output
    assert "not in the enum table" in output
    assert offsets(commerce, group) == {(merchant, 0): 3}  # not advanced past the poison
    assert sorted(fetch_commerce(commerce)["sellers"]) == [(1,), (2,), (3,)]
    with psycopg.connect(commerce) as conn:
        assert conn.execute("SELECT count(*) FROM cutover.dead_letters").fetchone() == (0,)


def _cli(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.entry", "--config", str(config), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _letter_id(dsn: str, error_class: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT id FROM cutover.dead_letters WHERE error_class = %s", (error_class,)
        ).fetchone()
    assert row is not None
    return int(row[0])
