"""The tools around the appliers with the schema registry on (Confluent wire format), on the
real stack: a topic that changes format mid-stream (single-object first, Confluent-framed after
the producer restarts with the registry URL) is read by the appliers without a rewrite;
`cutover replay` records and plays Confluent-framed topics into a sandbox; a poison message in a
Confluent-framed domain topic reaches the DLQ, and `cutover dlq list` / `dlq retry` handle it.

One pipeline for the module (its set-up is most of the cost): the data and merchant domains'
first rows are produced single-object, everything after (the whole payment domain) with the
registry on. The tests run in file order; the DLQ test adds poison to the merchant topic, so it
comes last.
"""

from __future__ import annotations

import json
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cli import main as cli
from cutover import codec
from devtools import registry_stack
from devtools.apply_support import producer, start_apply, wait_for
from devtools.harness import MAPPING, Scenario, init, open_scenario, stop
from devtools.readback import RawMessage, read_all
from devtools.scratch import scratch_database
from devtools.workload import prefill, run_workload
from tests.integration.conftest import EXAMPLES
from tests.integration.shop_compare import assert_commerce_matches_legacy, compare

pytestmark = pytest.mark.integration
# A registry id no registry here handed out: a Confluent-framed message no reader can decode.
UNKNOWN_ID = 2_000_000_011
# The data and merchant domains' rows before the switch (prefill has no order-free mode).
FIRST_ROWS = b"""
INSERT INTO shop.users (id, handle, display_name, email)
    SELECT i, 'u' || i, 'User ' || i, 'u' || i || '@example.com' FROM generate_series(1, 40) i;
INSERT INTO shop.merchants (id, owner_user_id, shop_name, status, rating)
    SELECT i, i, 'Shop ' || i, 'active', 4.50 FROM generate_series(1, 6) i;
INSERT INTO shop.products (id, merchant_id, title, price_idr, stock, status)
    SELECT i, 1 + i % 6, 'Item ' || i, 1000 + i, 10, 'live' FROM generate_series(1, 30) i;
"""


@dataclass
class Shop:
    scenario: Scenario
    registry_url: str
    #: The exit code of the applier that ran through the format change.
    apply_code: int | None = None

    def registry_env(self, registry: bool = True) -> dict[str, str]:
        return {registry_stack.ENV_VAR: self.registry_url} if registry else {}

    def cli(self, *args: str, registry: bool = True) -> subprocess.CompletedProcess[str]:
        return self.scenario.cli(*args, extra_env=self.registry_env(registry))

    def produce(self, *, registry: bool) -> None:
        done = self.cli("produce", "--exit-when-idle", "--no-initial-snapshot", registry=registry)
        assert done.returncode == 0, done.stderr[-3000:]

    def start_apply(self) -> subprocess.Popen[bytes]:
        """``cutover apply`` in the background, configured with the registry (as deployed)."""
        s = self.scenario
        return start_apply(
            s.write_config(), s.env(self.registry_env()), log=s.workdir / "apply.log"
        )

    def topic(self, domain: str) -> str:
        return f"{self.scenario.prefix}.{domain}"


@pytest.fixture(scope="module")
def shop(
    source_dsn: str,
    target_dsn: str,
    kafka_bootstrap: str,
    registry_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Shop]:
    workdir = tmp_path_factory.mktemp("registry-tools")
    for legacy in scratch_database(source_dsn, EXAMPLES / "legacy.sql", "legacy"):
        for commerce in scratch_database(target_dsn, EXAMPLES / "commerce.sql", "commerce"):
            with open_scenario(legacy, commerce, kafka_bootstrap, workdir, partitions=2) as s:
                init(s)
                shop = Shop(s, registry_url)
                _switch_format_mid_stream(shop)
                yield shop


def _switch_format_mid_stream(shop: Shop) -> None:
    """One applier runs throughout while the producer runs without, then with the registry."""
    s = shop.scenario
    applier = shop.start_apply()
    try:
        # Before the registry: users, merchants and products, single-object encoded.
        with psycopg.connect(s.source_dsn, autocommit=True) as conn:
            conn.execute(FIRST_ROWS)
        shop.produce(registry=False)
        wait_for(lambda: _count(s.target_dsn, "commerce", "customers") == 40, 120,
                 "the single-object part to be applied")  # fmt: skip
        # The producer restarts with the registry URL: Confluent-framed from here on, on the
        # same topics (more of every table, then updates of the older rows).
        prefill(s.source_dsn, orders=120, seed=4)
        run_workload(s.source_dsn, rate=400, max_transactions=150, seed=5)
        shop.produce(registry=True)
        wait_for(lambda: all(d.ok for d in compare(s.source_dsn, s.target_dsn)), 180,
                 "commerce to equal the mapped legacy")  # fmt: skip
    finally:
        shop.apply_code = stop(applier)


def _count(dsn: str, schema: str, table: str) -> int:
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _framings(messages: list[RawMessage]) -> dict[int, list[str]]:
    """Per partition, the framing of each change event in offset order."""
    out: dict[int, list[str]] = {}
    for m in messages:
        if m.kind == "change":
            assert m.value is not None
            out.setdefault(m.partition, []).append(codec.framing(m.value))
    return out


def test_appliers_read_a_topic_that_changed_format_mid_stream(shop: Shop) -> None:
    s = shop.scenario
    assert shop.apply_code == 0
    for domain in ("data", "merchant"):
        by_partition = _framings(read_all(s.bootstrap, [shop.topic(domain)]))
        for partition, framings in by_partition.items():
            # Single-object first, then Confluent-framed: no message was rewritten.
            switch = framings.index("confluent")
            assert switch > 0, (domain, partition)
            assert set(framings[:switch]) == {"single-object"}, (domain, partition)
            assert set(framings[switch:]) == {"confluent"}, (domain, partition)
    payment = _framings(read_all(s.bootstrap, [shop.topic("payment")]))
    assert {f for framings in payment.values() for f in framings} == {"confluent"}
    assert_commerce_matches_legacy(s.source_dsn, s.target_dsn)
    assert _count(s.target_dsn, "cutover", "dead_letters") == 0


def test_replay_records_and_plays_confluent_framed_topics(
    shop: Shop,
    commerce: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = shop.scenario
    sandbox = commerce  # an empty commerce database of its own, with the control tables
    # `cutover replay` in this process (six commands: process start-ups would double the time).
    for key, value in s.env(shop.registry_env()).items():
        if key.startswith("CUTOVER_"):
            monkeypatch.setenv(key, value)
    config = str(s.write_config())

    def replay(*args: str) -> dict[str, Any]:
        code = cli.main(["--config", config, "replay", *args, "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
        report: dict[str, Any] = json.loads(out)
        return report

    for domain in ("payment", "data", "merchant"):
        out = tmp_path / f"{domain}.avro"
        summary = replay("record", "--topic", shop.topic(domain), "--out", str(out))
        if domain == "payment":
            # Every change event Confluent-framed: kept as the bytes read (so are the
            # heartbeats the producer wrote with the registry on).
            framings = _framings(read_all(s.bootstrap, [shop.topic(domain)]))
            assert summary["raw_values"] >= sum(map(len, framings.values())) > 0
        report = replay("play", str(out), "--to-target", sandbox)
        assert report["played"] == summary["events"] and report["dead_letters"] == 0
    assert_commerce_matches_legacy(s.source_dsn, sandbox)


def _narrowed_mapping(tmp_path: Path) -> Path:
    """The shop mapping without the merchant status 'suspended': such a row is unmappable."""
    text = MAPPING.read_text()
    narrowed = text.replace('suspended = "SUSPENDED", ', "")
    assert narrowed != text
    path = tmp_path / "narrowed-mapping.toml"
    path.write_text(narrowed)
    return path


def test_poison_in_a_confluent_framed_topic_is_dead_lettered_and_retried(
    shop: Shop, tmp_path: Path
) -> None:
    s = shop.scenario
    merchant_topic = shop.topic("merchant")
    with psycopg.connect(s.source_dsn, autocommit=True) as conn:
        row = conn.execute(
            "UPDATE shop.merchants SET status = 'suspended', updated_at = now() WHERE id ="
            " (SELECT min(id) FROM shop.merchants WHERE status <> 'suspended') RETURNING id"
        ).fetchone()
    assert row is not None
    merchant_id = row[0]
    shop.produce(registry=True)
    # And a Confluent-framed message naming a schema id the registry does not know.
    unknown = codec.CONFLUENT_MAGIC + struct.pack(">I", UNKNOWN_ID) + b"\x00\x02"
    prod = producer(s.bootstrap)
    prod.produce(merchant_topic, value=unknown, key=b"999", partition=0)
    assert prod.flush(30) == 0

    s.mapping = _narrowed_mapping(tmp_path)
    try:
        applier = shop.start_apply()
    finally:
        s.mapping = MAPPING
    try:
        wait_for(lambda: _count(s.target_dsn, "cutover", "dead_letters") == 2, 120,
                 "both poison messages to be dead-lettered")  # fmt: skip
    finally:
        assert stop(applier) == 0

    # Both reached the DLQ topic as they were read (Confluent-framed), with their error.
    letters = read_all(s.bootstrap, [f"{s.prefix}.dlq"])
    by_class = {dict(m.headers)["cutover.error_class"].decode(): m for m in letters}
    assert set(by_class) == {"UnmappableRow", "UnknownSchema"}, letters
    assert by_class["UnknownSchema"].value == unknown
    poison = by_class["UnmappableRow"]
    assert poison.value is not None and codec.framing(poison.value) == "confluent"
    assert dict(poison.headers)["cutover.source_topic"].decode() == merchant_topic

    listed = shop.cli("dlq", "list", "--json", "--status", "open")
    assert listed.returncode == 0, listed.stderr[-3000:]
    open_letters = {r["error_class"]: r for r in json.loads(listed.stdout)}
    assert set(open_letters) == {"UnmappableRow", "UnknownSchema"}
    assert open_letters["UnmappableRow"]["source_table"] == "merchants"
    assert "not in the enum table" in open_letters["UnmappableRow"]["error"]

    # With the full mapping again, the retry decodes the Confluent-framed letter (its schema
    # from the registry) and applies it; the unknown id still fails and stays open.
    letter_id = open_letters["UnmappableRow"]["id"]
    retried = shop.cli("dlq", "retry", "--id", str(letter_id), "--json")
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert json.loads(retried.stdout)["retried"] == [letter_id]
    with psycopg.connect(s.target_dsn) as conn:
        state = conn.execute(
            "SELECT state FROM commerce.sellers WHERE seller_id = %s", (merchant_id,)
        ).fetchone()
    assert state == ("SUSPENDED",)
    again = shop.cli("dlq", "retry", "--all", "--json")
    assert again.returncode == 1, again.stderr[-3000:]
    failed = json.loads(again.stdout)["failed"]
    assert [f["id"] for f in failed] == [open_letters["UnknownSchema"]["id"]]
    assert_commerce_matches_legacy(s.source_dsn, s.target_dsn)
