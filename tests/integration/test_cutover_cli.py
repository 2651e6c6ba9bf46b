"""The cutover commands as an operator runs them: subprocesses of the real CLI on scratch databases
and topic prefixes. ``status`` (text and --json), ``rollback D`` (exit codes, audit row, state,
control topic), ``init --dry-run`` (changes nothing) and ``init --target-ddl`` (creates the
commerce schema)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from control.state import switch_reads
from control.verify import VerifyOptions, run_verify
from devtools.harness import Scenario
from devtools.scratch import scratch_database
from tests.integration.conftest import EXAMPLES
from tests.integration.test_verify_support import (
    DOMAINS,
    beat,
    commerce,
    control_messages,
    mapping,
    staged_scenario,
)

pytestmark = pytest.mark.integration

WIDE = {"COLUMNS": "200"}  # rich wraps tables at 80 columns without a terminal


@pytest.fixture(scope="module")
def staged(
    source_dsn: str, target_dsn: str, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    """A healthy-looking pipeline (verified, slot, heartbeat, offsets) and a config file naming
    it, for the CLI."""
    workdir = tmp_path_factory.mktemp("cli")
    with staged_scenario(source_dsn, target_dsn, kafka_bootstrap, workdir, orders=150) as (
        probe,
        settings,
    ):
        report = run_verify(
            settings, mapping(), actor="t", options=VerifyOptions(recheck_timeout_s=5)
        )
        assert report.passed, report.mismatch_summary()
        assert probe.settings().kafka.control_topic == settings.kafka.control_topic
        yield probe


def state_of(scn: Scenario, domain: str) -> str:
    rows = commerce(
        scn.settings(), "SELECT state FROM cutover.domain_state WHERE domain = %s", [domain]
    )
    return str(rows[0][0])


def audit_rows(scn: Scenario, domain: str) -> list[tuple[Any, ...]]:
    return commerce(
        scn.settings(),
        "SELECT command, outcome, actor, from_state, to_state FROM cutover.audit "
        "WHERE domain = %s ORDER BY audit_id",
        [domain],
    )


def test_status_text_and_json(staged: Scenario) -> None:
    beat(staged.settings())
    text = staged.cli("status", extra_env=WIDE)
    assert text.returncode == 0, text.stderr
    assert "cutover progress 0 %" in text.stdout
    for d in DOMAINS:
        assert d in text.stdout
    assert "legacy serves reads; CDC keeps commerce in sync" in text.stdout
    assert "run " in text.stdout and "passed" in text.stdout  # the last verify
    out = staged.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["progress_percent"] == 0
    by_domain = {d["domain"]: d for d in doc["domains"]}
    assert set(by_domain) == set(DOMAINS)
    payment = by_domain["payment"]
    assert payment["state"] == "replicating" and payment["weight"] == 60
    assert [g["gate"] for g in payment["gates"]] == [
        "verify",
        "apply_lag",
        "dead_letters",
        "producer_heartbeat",
        "slot",
        "capture",
    ]
    assert payment["gates_pass"], payment["gates"]
    assert payment["last_verify"]["passed"] is True
    no_gates = json.loads(staged.cli("status", "--json", "--no-gates").stdout)
    assert "gates" not in no_gates["domains"][0]


def test_rollback_exit_codes_audit_and_state(staged: Scenario) -> None:
    settings = staged.settings()
    # nothing to roll back: a no-op, exit 0, audited
    noop = staged.cli("rollback", "merchant", "--yes", "--actor", "ops")
    assert noop.returncode == 0, noop.stderr
    assert audit_rows(staged, "merchant")[-1][:3] == ("rollback", "noop", "ops")
    # an unknown domain is a usage error
    assert staged.cli("rollback", "nosuch", "--yes").returncode == 2
    beat(settings)
    switch_reads(settings, list(DOMAINS), "merchant", actor="ops")
    assert state_of(staged, "merchant") == "reads_switched"
    status = json.loads(staged.cli("status", "--json", "--no-gates").stdout)
    assert status["progress_percent"] == 20
    # a dry run changes nothing
    dry = staged.cli("rollback", "merchant", "--dry-run", "--json", "--actor", "ops")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["outcome"] == "dry_run"
    assert state_of(staged, "merchant") == "reads_switched"
    # legacy unreachable: the sanity check refuses, exit 1, audited, state unchanged
    down = staged.cli(
        "rollback",
        "merchant",
        "--yes",
        "--actor",
        "ops",
        extra_env={"CUTOVER_SOURCE_DSN": "postgresql://nobody@127.0.0.1:9/none"},
    )
    assert down.returncode == 1, (down.stdout, down.stderr)
    assert "legacy_reachable" in down.stderr + down.stdout
    assert audit_rows(staged, "merchant")[-1][:2] == ("rollback", "refused")
    assert state_of(staged, "merchant") == "reads_switched"
    # the rollback itself
    done = staged.cli("rollback", "merchant", "--yes", "--json", "--actor", "ops")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["outcome"] == "done" and doc["to_state"] == "replicating"
    assert state_of(staged, "merchant") == "replicating"
    assert audit_rows(staged, "merchant")[-1] == (
        "rollback",
        "done",
        "ops",
        "reads_switched",
        "replicating",
    )
    last = [m for m in control_messages(settings) if m["domain"] == "merchant"][-1]
    assert last["state"] == "replicating" and last["version"] == doc["version"]
    # again: already replicating, exit 0
    assert staged.cli("rollback", "merchant", "--yes").returncode == 0


# ---------------------------------------------------------------------------------------------
# init --dry-run / --target-ddl
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def empty_commerce(target_dsn: str) -> Iterator[str]:
    """A commerce database with nothing in it (no commerce schema, no control tables)."""
    yield from scratch_database(target_dsn, None, "commerce")


@pytest.fixture
def bare(
    fresh_legacy: str, empty_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Scenario]:
    scn = Scenario(fresh_legacy, empty_commerce, kafka_bootstrap, tmp_path, partitions=2)
    try:
        yield scn
    finally:
        scn.drop_slot()
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        ours = [t for t in admin.list_topics(timeout=10).topics if t.startswith(scn.prefix + ".")]
        if ours:
            for fut in admin.delete_topics(ours, operation_timeout=30).values():
                fut.result(timeout=30)


def _relations(dsn: str) -> set[tuple[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%'"
        ).fetchall()
    return {(str(s), str(r)) for s, r in rows}


def _legacy_objects(scn: Scenario) -> tuple[Any, ...]:
    with psycopg.connect(scn.source_dsn, autocommit=True) as conn:
        pubs = conn.execute(
            "SELECT count(*) FROM pg_publication WHERE pubname = %s", [scn.publication]
        ).fetchone()
        slots = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", [scn.slot]
        ).fetchone()
    return (pubs, slots)


def _topics(scn: Scenario) -> list[str]:
    admin = AdminClient({"bootstrap.servers": scn.bootstrap})
    return sorted(t for t in admin.list_topics(timeout=10).topics if t.startswith(scn.prefix))


def test_init_dry_run_changes_nothing(bare: Scenario) -> None:
    legacy_before, commerce_before = _relations(bare.source_dsn), _relations(bare.target_dsn)
    ddl = str(EXAMPLES / "commerce.sql")
    out = bare.cli("init", "--dry-run", "--json", "--target-ddl", ddl)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["dry_run"] is True
    statuses = {a["object"]: a["status"] for a in report["actions"]}
    assert statuses["target schema commerce"] == "would_create"
    assert statuses["commerce control tables"] == "would_create"
    assert _legacy_objects(bare) == ((0,), (0,))  # no publication, no slot
    assert _topics(bare) == []
    assert _relations(bare.source_dsn) == legacy_before  # no legacy control tables
    assert _relations(bare.target_dsn) == commerce_before == set()


def test_init_target_ddl_creates_the_commerce_schema(bare: Scenario) -> None:
    assert _relations(bare.target_dsn) == set()
    out = bare.cli("init", "--json", "--target-ddl", str(EXAMPLES / "commerce.sql"))
    assert out.returncode == 0, out.stderr
    statuses = {a["object"]: a["status"] for a in json.loads(out.stdout)["actions"]}
    assert statuses["target schema commerce"] == "created"
    assert statuses["commerce control tables"] == "created"
    made = _relations(bare.target_dsn)
    mapped = {("commerce", t.target_table) for t in mapping().tables.values()}
    assert mapped <= made
    assert {("cutover", "consumer_offsets"), ("cutover", "dead_letters")} <= made
    assert _legacy_objects(bare) == ((1,), (1,))
    # idempotent: a second run finds the schema and creates nothing
    again = bare.cli("init", "--json", "--target-ddl", str(EXAMPLES / "commerce.sql"))
    assert again.returncode == 0, again.stderr
    statuses = {a["object"]: a["status"] for a in json.loads(again.stdout)["actions"]}
    assert statuses["target schema commerce"] == "exists"
    # a missing DDL file is a usage error
    assert bare.cli("init", "--target-ddl", "/nonexistent.sql").returncode == 2
