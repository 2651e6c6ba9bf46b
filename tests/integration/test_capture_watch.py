"""The captured set is watched (issue 12 item 3): a lost mapped table or column stops the flow.

Each case changes the legacy schema or the publication under a running pipeline so that a mapped
table or column is no longer published, then checks: the producer stops (exit 3) naming the
table, the cause and the fix, logs ``capture.blocked``, does not advance the slot and produces no
event of the new shape; the domain's ``capture`` gate is red (critical) with the reason; and the
documented resume sequence (fix, ``cutover init``, ``cutover produce``, ``cutover snapshot
--table T``) brings every change of the table back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from control.gate_evidence import collect
from control.gates import evaluate
from devtools import harness
from devtools.harness import Scenario, changes, open_scenario

pytestmark = pytest.mark.integration


@pytest.fixture
def scenario(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Scenario]:
    with open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path) as s:
        yield s


def _drain(scenario: Scenario, *args: str) -> None:
    result = scenario.cli("produce", "--exit-when-idle", "--no-initial-snapshot", *args)
    assert result.returncode == 0, result.stderr[-3000:]


def _seed(conn: psycopg.Connection[object]) -> None:
    conn.execute(
        "INSERT INTO shop.users (id, handle, display_name, phone) VALUES (1, 'a', 'A', '1')"
    )
    conn.execute(
        "INSERT INTO shop.merchants (id, owner_user_id, shop_name, status)"
        " VALUES (10, 1, 'shop', 'active')"
    )


def _map(scenario: Scenario, tmp_path: Path, fixes: list[tuple[str, str]]) -> None:
    text = harness.MAPPING.read_text()
    for old, new in fixes:
        assert old in text
        text = text.replace(old, new)
    scenario.mapping = tmp_path / "mapping.toml"
    scenario.mapping.write_text(text)


CASES = {
    # case: (statement, table, domain, cause in the error, mapping fix (old, new) or None)
    "drop_column": (
        "ALTER TABLE shop.users DROP COLUMN phone CASCADE",
        "shop.users",
        "data",
        # PostgreSQL 15: dropping a column of a column list with CASCADE unpublishes the table.
        "the table left the publication",
        [('phone = "phone"\n', ""), ('"email", "phone"]', '"email"]')],
    ),
    "rename_column": (
        "ALTER TABLE shop.merchants RENAME COLUMN shop_name TO name",
        "shop.merchants",
        "merchant",
        "mapped column(s) shop_name no longer published",
        [('name = "shop_name"', 'name = "name"')],
    ),
    "drop_from_publication": (
        "ALTER PUBLICATION {pub} DROP TABLE shop.merchants",
        "shop.merchants",
        "merchant",
        "the table left the publication",
        [],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lost_capture_stops_reddens_the_gate_and_resumes(
    scenario: Scenario, tmp_path: Path, case: str
) -> None:
    statement, table, domain, cause, fixes = CASES[case]
    harness.init(scenario)
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        _seed(conn)
    _drain(scenario)
    before, _ = scenario.slot_state()
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(pub=sql.Identifier(scenario.publication)))
        # A change of the new shape, and one of another domain in the same stretch of WAL.
        conn.execute("UPDATE shop.users SET display_name = 'B' WHERE id = 1")
        conn.execute("UPDATE shop.merchants SET status = 'suspended' WHERE id = 10")
    seen = len(changes(scenario.read()))
    for _ in range(2):  # also after a restart: the block is found again
        result = scenario.cli("--log-json", "produce", "--exit-when-idle", "--no-initial-snapshot")
        assert result.returncode == 3, result.stderr[-3000:]
        assert f"incompatible schema change of {table}" in result.stderr
        assert cause in result.stderr and "cutover init" in result.stderr
        assert "one slot carries them all" in result.stderr
        logged = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
        assert any(e.get("event") == "capture.blocked" and e.get("table") == table for e in logged)
        assert scenario.slot_state()[0] == before
    assert len(changes(scenario.read())) == seen  # no event of the new shape went out
    gate = {
        g.name: g for g in evaluate(collect(scenario.settings(), domain), scenario.settings().gates)
    }
    assert not gate["capture"].passed and gate["capture"].critical
    assert table in gate["capture"].why and cause in gate["capture"].why
    others = {
        g.name: g
        for g in evaluate(collect(scenario.settings(), "payment"), scenario.settings().gates)
    }
    assert others["capture"].passed

    # The documented resume: fix the mapping (or restore the publication), init, produce,
    # re-snapshot the table.
    if fixes:
        _map(scenario, tmp_path, fixes)
    harness.init(scenario)  # publishes what the mapping reads (puts a table back)
    _drain(scenario)
    snap = scenario.cli("snapshot", "--table", table.split(".")[1])
    assert snap.returncode == 0, snap.stderr[-2000:]
    _drain(scenario)
    gate = {
        g.name: g for g in evaluate(collect(scenario.settings(), domain), scenario.settings().gates)
    }
    assert gate["capture"].passed, gate["capture"].why
    rows = [
        e for e in changes(scenario.read()) if e.record["source"]["table"] == table.split(".")[1]
    ]
    last = {e.record["after"]["id"]: e.record["after"] for e in rows if e.record.get("after")}
    if table == "shop.merchants":
        assert last[10]["status"] == "suspended"
    else:
        assert last[1]["display_name"] == "B"
