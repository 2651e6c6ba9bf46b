"""The Confluent wire format against a real schema registry (the stack's Apicurio, `make up
REGISTRY=1`) and a real broker: the pipeline ends equal, a reader no one here wrote
(confluent-kafka's AvroDeserializer, given only the registry URL) decodes every message, the
registry lists the subjects and versions we expect, an ADD COLUMN registers version 2, a change
the registry refuses stops the producer with the registry's reason, and a registry outage holds
the slot until it returns, losing nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from cutover import codec
from cutover.config import KafkaSettings
from cutover.mapping import load_mapping
from cutover.registry import HEARTBEAT_SUBJECT, with_registry
from devtools import registry_stack
from devtools.harness import MAPPING, Scenario, changes, init, open_scenario, stop
from devtools.readback import decode_all, read_all, schema_store
from devtools.workload import prefill, run_workload
from tests.integration.conftest import REPO
from tests.integration.shop_compare import assert_commerce_matches_legacy, compare

pytestmark = pytest.mark.integration
TRUNCATE_SUBJECT = "cutover.Truncate"


@pytest.fixture
def scenario(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Scenario]:
    with open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path) as s:
        yield s


def _env(url: str) -> dict[str, str]:
    return {registry_stack.ENV_VAR: url}


def _get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=10) as reply:
        return json.loads(reply.read())


def _subjects(url: str, prefix: str) -> dict[str, list[int]]:
    """Every subject of the scenario's topics (and the heartbeat's) with its versions."""
    out = {}
    for subject in _get(url, "/subjects"):
        if subject.startswith(f"{prefix}.") or subject in (HEARTBEAT_SUBJECT, TRUNCATE_SUBJECT):
            out[subject] = _get(url, f"/subjects/{urllib.parse.quote(subject)}/versions")
    return out


def _envelope_subject(prefix: str, domain: str, table: str) -> str:
    return f"{prefix}.{domain}-cutover.shop.{table}.Envelope"


def _ours(scenario: Scenario, url: str) -> list[Any]:
    store = with_registry(
        schema_store(scenario.bootstrap, f"{scenario.prefix}.schemas"),
        KafkaSettings(schema_registry_url=url),
    )
    return decode_all(store, read_all(scenario.bootstrap, scenario.topics()))


def _foreign_decode(scenario: Scenario, url: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message of every domain topic decoded by confluent-kafka's AvroDeserializer."""
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": url}))
    out = []
    for msg in read_all(scenario.bootstrap, scenario.topics()):
        assert msg.value is not None and msg.value[:1] == codec.CONFLUENT_MAGIC, msg
        ctx = SerializationContext(msg.topic, MessageField.VALUE)
        out.append((msg.topic, deserializer(msg.value, ctx)))
    return out


def _start_apply(scenario: Scenario, url: str) -> subprocess.Popen[bytes]:
    log = (scenario.workdir / "apply.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cli.entry", "--config", str(scenario.config), "--log-json",
         "apply"],
        env=scenario.env(_env(url)), stdout=log, stderr=log,
    )  # fmt: skip


def _wait_equal(legacy: str, commerce: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.ok for d in compare(legacy, commerce)):
            return
        time.sleep(1.0)
    assert_commerce_matches_legacy(legacy, commerce)  # fails with the differences


def test_pipeline_with_registry_ends_equal_and_a_foreign_reader_decodes_everything(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, registry_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    prefill(fresh_legacy, orders=300, seed=3)
    with open_scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=3
    ) as scenario:
        init(scenario)
        producer = scenario.start_produce(extra_env=_env(registry_url))
        applier = _start_apply(scenario, registry_url)
        try:
            run_workload(fresh_legacy, rate=200, duration=4, seed=5)
            _wait_equal(fresh_legacy, fresh_commerce, timeout=240)
        finally:
            apply_code = stop(applier)
            produce_code = stop(producer)
        assert (apply_code, produce_code) == (0, 0)

        # Every message (change events and heartbeats) is Confluent-framed, and the reader no
        # one here wrote finds the same records we do.
        foreign = _foreign_decode(scenario, registry_url)
        ours = _ours(scenario, registry_url)
        assert [record for _topic, record in foreign] == [d.record for d in ours]
        kinds = {d.schema for d in ours}
        assert "cutover.Heartbeat" in kinds
        assert len(changes(ours)) > 300

        # One subject per table (on its domain topic) plus the heartbeat's and the truncate
        # record's (registered at start, though no TRUNCATE happened), each at version 1,
        # every table subject at BACKWARD.
        mapping = load_mapping(MAPPING)
        expected = {
            _envelope_subject(scenario.prefix, tm.domain, table): [1]
            for table, tm in mapping.tables.items()
        }
        assert _subjects(registry_url, scenario.prefix) == {
            **expected,
            HEARTBEAT_SUBJECT: [1],
            TRUNCATE_SUBJECT: [1],
        }
        for subject in expected:
            config = _get(registry_url, f"/config/{urllib.parse.quote(subject)}")
            assert config["compatibilityLevel"] == "BACKWARD"


def _map_nickname(scenario: Scenario, tmp_path: Path) -> None:
    text = MAPPING.read_text().replace(
        'customer_id = "id"', 'customer_id = "id"\nnickname = "nickname"'
    )
    scenario.mapping = tmp_path / "mapping.toml"
    scenario.mapping.write_text(text)


def _produce(scenario: Scenario, url: str) -> subprocess.CompletedProcess[str]:
    return scenario.cli("produce", "--exit-when-idle", "--no-initial-snapshot", extra_env=_env(url))


def test_added_column_is_version_2_and_a_refused_change_stops_with_the_registry_reason(
    scenario: Scenario, registry_url: str, tmp_path: Path
) -> None:
    init(scenario)
    users = _envelope_subject(scenario.prefix, "data", "users")
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (1, 'a', 'A')")
    assert _produce(scenario, registry_url).returncode == 0
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE shop.users ADD COLUMN nickname text")
    _map_nickname(scenario, tmp_path)
    init(scenario)
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shop.users (id, handle, display_name, nickname) VALUES (2, 'b', 'B', 'n')"
        )
    done = _produce(scenario, registry_url)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _subjects(registry_url, scenario.prefix)[users] == [1, 2]
    decoded = _foreign_decode(scenario, registry_url)
    afters = sorted((r["after"] for _t, r in decoded if r.get("op") == "c"), key=lambda a: a["id"])
    assert [a["id"] for a in afters] == [1, 2]
    assert "nickname" not in afters[0] and afters[1]["nickname"] == "n"

    # A type change the producer no longer remembers (its table_schemas record is gone, as
    # after a re-init): the registry still does, and refuses it.
    before, _ = scenario.slot_state()
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        pub = psycopg.sql.Identifier(scenario.publication)
        with conn.transaction():
            conn.execute(psycopg.sql.SQL("ALTER PUBLICATION {} DROP TABLE shop.users").format(pub))
            # init's write fence trigger names the column (UPDATE OF): not under test here.
            conn.execute("DROP TRIGGER IF EXISTS cutover_write_fence_update ON shop.users")
            conn.execute("ALTER TABLE shop.users ALTER COLUMN phone TYPE integer USING NULL")
            conn.execute(
                psycopg.sql.SQL(
                    "ALTER PUBLICATION {} ADD TABLE shop.users"
                    " (id, display_name, email, phone, created_at, updated_at, nickname)"
                ).format(pub)
            )
        conn.execute("DELETE FROM cutover.table_schemas WHERE slot_name = %s", (scenario.slot,))
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (3, 'c', 'C')")
    refused = _produce(scenario, registry_url)
    assert refused.returncode == 3, refused.stderr[-2000:]
    assert "incompatible schema change of shop.users" in refused.stderr
    reason = re.search(
        rf"refused the new writer schema under subject {re.escape(users)}: (.+?) \(HTTP 409\)",
        refused.stderr,
    )
    assert reason is not None, refused.stderr[-2000:]
    assert "fields" in reason.group(1)  # the registry's own words name the field that changed
    assert scenario.slot_state()[0] == before
    assert _subjects(registry_url, scenario.prefix)[users] == [1, 2]


@pytest.mark.serial  # stops the shared stack's registry, which parallel tests may be using
def test_registry_down_holds_the_slot_then_resumes_losing_nothing(
    scenario: Scenario, registry_url: str, stack_env: dict[str, str]
) -> None:
    root = REPO / ".stack"
    if registry_stack.env(root).get(registry_stack.ENV_VAR) != registry_url:
        pytest.skip("the registry is not this checkout's stack registry: cannot stop it")
    init(scenario)
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (1, 'a', 'A')")
    producer = scenario.start_produce("--no-initial-snapshot", extra_env=_env(registry_url))
    try:
        _wait_for(lambda: len(changes(_ours(scenario, registry_url))) == 1, 120)
        registry_stack.stop(root)
        # A table not seen yet: its schema must be registered before its first event.
        with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO shop.merchants (id, owner_user_id, shop_name, status)"
                " VALUES (1, 1, 'M', 'active')"
            )
        _wait_for(lambda: _logged(scenario, "registry.unavailable"), 60)
        held, _ = scenario.slot_state()
        time.sleep(3)  # several heartbeat intervals: an idle producer would have advanced
        assert scenario.slot_state()[0] == held
        assert producer.poll() is None
    finally:
        registry_stack.start(root, REPO / ".stack-cache")
    try:
        _wait_for(lambda: _logged(scenario, "registry.available"), 120)
        _wait_for(lambda: (scenario.slot_state()[0] or 0) > (held or 0), 60)
    finally:
        code = stop(producer)
    assert code == 0
    tables = [d.record["source"]["table"] for d in changes(_ours(scenario, registry_url))]
    assert sorted(tables) == ["merchants", "users"]


def _logged(scenario: Scenario, event: str) -> bool:
    return any(e.get("event") == event for e in scenario.log_events())


def _wait_for(done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        time.sleep(0.5)
