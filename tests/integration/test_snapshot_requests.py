"""``cutover snapshot`` on the real stack: --where filters, --list, --cancel, failed requests.

The filter runs in the producer's session, so the attack strings of the review (a COMMIT that
escapes the check, a side-effecting function, an excluded column, a ``%``, a parenthesis that
drops the primary-key bound) must be refused with exit 2 and leave the database untouched, and
a stored request text must be parsed again by the producer, never run as SQL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cutover import fence
from cutover.mapping import MappingSpec, load_mapping
from devtools import harness
from devtools.harness import Scenario, changes, open_scenario, source_state
from devtools.workload import prefill

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping(harness.MAPPING)


@pytest.fixture
def scenario(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Scenario]:
    with open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, chunk_rows=7) as s:
        prefill(s.source_dsn, orders=60, seed=11)
        harness.init(s)
        yield s


@pytest.fixture
def victims(scenario: Scenario) -> Iterator[tuple[str, str]]:
    """A table and a replication slot the attacks try to drop: (table, slot)."""
    slot = f"victim_{scenario.tag}"
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.victim (id int PRIMARY KEY)")
        conn.execute("INSERT INTO public.victim VALUES (1), (2)")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    try:
        yield "public.victim", slot
    finally:
        with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )


def assert_victims_intact(scenario: Scenario, slot: str) -> None:
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM public.victim").fetchone()
        slots = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    assert rows == (2,) and slots == (1,)


def drain(scenario: Scenario) -> dict[str, Any]:
    result = scenario.cli("produce", "--exit-when-idle", "--json", "--no-initial-snapshot")
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def listed(scenario: Scenario) -> dict[int, dict[str, Any]]:
    result = scenario.cli("snapshot", "--list", "--json")
    assert result.returncode == 0, result.stderr
    return {r["id"]: r for r in json.loads(result.stdout)}


def snapshot_keys(scenario: Scenario, table: str) -> list[Any]:
    """The primary keys of the snapshot (op r) events of ``table``, with repeats."""
    events = changes(scenario.read())
    return [
        e.record["after"]["id"]
        for e in events
        if e.record["op"] == "r" and e.record["source"]["table"] == table
    ]


def test_attacks_are_refused_with_exit_2_and_touch_nothing(
    scenario: Scenario, victims: tuple[str, str]
) -> None:
    _, slot = victims
    attacks = [
        ("products", "1=1); COMMIT; DROP TABLE public.victim; --", "';'"),
        (
            "products",
            f"id = 1 AND pg_drop_replication_slot('{slot}')::text = ''",
            "function 'pg_drop_replication_slot' is not allowed",
        ),
        ("users", "bio like '%x%'", "column 'bio' is not published"),
        ("products", "stock > 10) OR (true", "unbalanced ')'"),
        ("products", "stock > 10 AND title LIKE %s", "'%' outside a string literal"),
        ("products", "stock > 'many'", "not a valid filter on shop.products"),  # EXPLAIN: types
    ]
    for table, where, named in attacks:
        result = scenario.cli("snapshot", "--table", table, "--where", where)
        assert result.returncode == 2, (where, result.stdout, result.stderr)
        assert named in result.stderr, (where, result.stderr)
    assert_victims_intact(scenario, slot)
    assert listed(scenario) == {}


def test_a_stored_request_is_parsed_again_by_the_producer_and_fails_visibly(
    scenario: Scenario, victims: tuple[str, str]
) -> None:
    """Rows written behind the CLI's back (an older version, a hand edit) never run as SQL."""
    _, slot = victims
    tampered = [
        "1=1); COMMIT; DROP TABLE public.victim; --",
        f"id = 1 AND pg_drop_replication_slot('{slot}')::text = ''",
        "title like '%x%' AND description IS NOT NULL AND stock > '1' OR bio IS NULL",
    ]
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        for where in tampered:
            conn.execute(
                "INSERT INTO cutover.snapshot_requests (slot_name, source_table, where_sql, kind)"
                " VALUES (%s, 'products', %s, 'request')",
                (scenario.slot, where),
            )
    # A request with a valid filter whose chunk query fails at run time (a cast error).
    ok = scenario.cli("snapshot", "--table", "products", "--where", "title::int > 0")
    assert ok.returncode == 0, ok.stderr
    drain(scenario)
    assert_victims_intact(scenario, slot)
    requests = listed(scenario)
    assert [r["status"] for r in requests.values()] == ["failed"] * 4
    errors = [r["error"] for r in requests.values()]
    assert "';' (a statement separator) is not allowed" in errors[0]
    assert "function 'pg_drop_replication_slot' is not allowed" in errors[1]
    assert "column 'bio' is not published" in errors[2]
    assert "invalid input syntax for type integer" in errors[3]
    assert snapshot_keys(scenario, "products") == []


def test_a_filter_snapshots_exactly_the_matching_rows(
    scenario: Scenario, mapping: MappingSpec
) -> None:
    # A '%' in a value (it killed the producer), a quote, a function, a cast, several chunks.
    where = "(stock > 10 OR title ILIKE '%a%') AND lower(status) <> 'it''s' AND id >= '3'::int"
    result = scenario.cli("snapshot", "--table", "products", "--where", where, "--json")
    assert result.returncode == 0, result.stderr
    request = json.loads(result.stdout)["request"]
    drain(scenario)
    with psycopg.connect(scenario.source_dsn) as conn:
        want = sorted(
            r[0]
            for r in conn.execute(
                "SELECT id FROM shop.products WHERE (stock > 10 OR title ILIKE '%a%')"
                " AND lower(status) <> 'it''s' AND id >= 3"
            )
        )
        total = conn.execute("SELECT count(*) FROM shop.products").fetchone()
    assert total is not None and 7 * 2 < len(want) < total[0]  # several chunks, not every row
    got = snapshot_keys(scenario, "products")
    assert sorted(got) == want  # each matching row once: the primary-key bound held
    rows = source_state(scenario.source_dsn, "shop", "products", ["id", "stock", "title"], ["id"])
    for e in changes(scenario.read()):
        if e.record["op"] == "r":
            after = e.record["after"]
            assert rows[(after["id"],)] == {k: after[k] for k in ("id", "stock", "title")}
    entry = listed(scenario)[request]
    assert entry["status"] == "done" and entry["rows"] == len(want) and entry["where"] == where


def test_list_and_cancel(scenario: Scenario) -> None:
    first = scenario.cli("snapshot", "--table", "products", "--json")
    second = scenario.cli("snapshot", "--table", "merchants", "--json")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    cancelled = json.loads(first.stdout)["request"]
    kept = json.loads(second.stdout)["request"]
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        initial = conn.execute(
            "INSERT INTO cutover.snapshot_requests (slot_name, source_table, kind)"
            " VALUES (%s, 'users', 'initial') RETURNING id",
            (scenario.slot,),
        ).fetchone()
    assert initial is not None
    before = listed(scenario)
    assert [before[i]["status"] for i in (cancelled, kept)] == ["pending", "pending"]
    assert before[cancelled]["table"] == "products" and before[cancelled]["kind"] == "request"
    text = scenario.cli("snapshot", "--list")
    assert text.returncode == 0 and f"{cancelled}  pending  request  products" in text.stdout

    result = scenario.cli("snapshot", "--cancel", str(cancelled))
    assert result.returncode == 0, result.stderr
    assert f"snapshot request {cancelled} (products) cancelled" in result.stdout
    again = scenario.cli("snapshot", "--cancel", str(cancelled))
    assert again.returncode == 1 and "already failed" in again.stderr
    unknown = scenario.cli("snapshot", "--cancel", "987654321")
    assert unknown.returncode == 2 and "no snapshot request 987654321" in unknown.stderr
    refused = scenario.cli("snapshot", "--cancel", str(initial[0]))
    assert refused.returncode == 1 and "initial snapshot" in refused.stderr
    usage = scenario.cli("snapshot", "--list", "--where", "id = 1")
    assert usage.returncode == 2

    drain(scenario)
    after = listed(scenario)
    assert after[cancelled]["status"] == "failed"
    assert after[cancelled]["error"].startswith("cancelled by ")
    assert after[kept]["status"] == "done" and after[initial[0]]["status"] == "done"
    assert snapshot_keys(scenario, "products") == []
    assert snapshot_keys(scenario, "merchants")


def test_a_domain_whose_writes_moved_is_never_snapshotted(scenario: Scenario) -> None:
    """Legacy's rows of a fenced domain are older than commerce's: a snapshot would overwrite
    them. Refused when queued (exit 1), and a request queued before the fence fails in the
    producer; once the fence is lowered (writes rolled back) the same snapshot runs."""
    merchant = {"merchant": [("shop", "products"), ("shop", "merchants")]}
    queued = scenario.cli("snapshot", "--table", "products", "--json")
    assert queued.returncode == 0, queued.stderr
    early = json.loads(queued.stdout)["request"]
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        fence.install(conn, "cutover", merchant, side="source")
        fence.raise_fence(
            conn, "cutover", "merchant", state="writes_switched", reason="test", side="source"
        )
    refused = scenario.cli("snapshot", "--table", "merchants")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "writes of domain merchant are on commerce" in refused.stderr
    assert "cutover rollback-writes merchant" in refused.stderr
    drain(scenario)
    request = listed(scenario)[early]
    assert request["status"] == "failed" and "legacy is fenced" in request["error"], request
    assert snapshot_keys(scenario, "products") == []
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        fence.lower_fence(conn, "cutover", "merchant", state="reads_switched", side="source")
    again = scenario.cli("snapshot", "--table", "products", "--json")
    assert again.returncode == 0, again.stderr
    drain(scenario)
    assert listed(scenario)[json.loads(again.stdout)["request"]]["status"] == "done"
    assert snapshot_keys(scenario, "products")
    # An older release's fence (no log): whether writes moved cannot be read, so refused.
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE cutover.write_fence_log")
        try:
            unreadable = scenario.cli("snapshot", "--table", "products")
        finally:
            fence.install(conn, "cutover", merchant, side="source")  # adds the log back
    assert unreadable.returncode == 1, unreadable.stdout + unreadable.stderr
    assert "run `cutover init`" in unreadable.stderr


def test_cancel_stops_a_running_request_after_the_chunk_in_flight(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    with open_scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, chunk_rows=1
    ) as scenario:
        prefill(scenario.source_dsn, orders=2000, seed=12)
        harness.init(scenario)
        proc = scenario.start_produce("--no-initial-snapshot")
        try:
            result = scenario.cli("snapshot", "--table", "orders", "--json")
            request = json.loads(result.stdout)["request"]
            with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    row = conn.execute(
                        "SELECT chunks FROM cutover.snapshot_progress WHERE request_id = %s",
                        (request,),
                    ).fetchone()
                    if row and row[0] >= 3:
                        break
                    time.sleep(0.1)
            assert scenario.cli("snapshot", "--cancel", str(request)).returncode == 0
            deadline = time.monotonic() + 60
            while not any(e["event"] == "snapshot.cancelled" for e in scenario.log_events()):
                assert time.monotonic() < deadline, "the producer did not drop the request"
                time.sleep(0.2)
        finally:
            assert harness.stop(proc) == 0
        entry = listed(scenario)[request]
        assert entry["status"] == "failed" and 3 <= entry["chunks"] < 2000
        emitted = snapshot_keys(scenario, "orders")
        assert 3 <= len(emitted) < 2000 and len(emitted) <= entry["chunks"] + 1
