"""The CDC producer on the real stack: init, snapshot + stream, order, TOAST, separation, schemas.

Each test has its own legacy database, topic prefix, slot and publication (devtools.harness),
and runs the real command (``python -m cli.main produce``) in a subprocess.
"""

from __future__ import annotations

import json
import random
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cutover.envelope import str_to_lsn
from cutover.mapping import MappingSpec, load_mapping
from devtools import harness
from devtools.harness import Scenario, changes, last_state, open_scenario, source_state
from devtools.workload import ROLLBACK_ID_BASE, ROLLBACK_MARKER, prefill, run_workload

pytestmark = pytest.mark.integration


@pytest.fixture
def scenario(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Scenario]:
    with open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path) as s:
        yield s


@pytest.fixture(scope="module")
def mapping() -> MappingSpec:
    return load_mapping(harness.MAPPING)


def drain(scenario: Scenario, *args: str, timeout: float = 300) -> dict[str, Any]:
    """``cutover produce --exit-when-idle --json``; its report."""
    result = scenario.cli("produce", "--exit-when-idle", "--json", *args, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def published(mapping: MappingSpec, table: str) -> list[str]:
    """The published columns of a reference table, in legacy.sql order."""
    order = {
        "users": ["id", "handle", "display_name", "email", "phone", "follower_count", "bio",
                  "created_at", "updated_at"],
        "merchants": ["id", "owner_user_id", "shop_name", "status", "rating", "created_at",
                      "updated_at"],
        "products": ["id", "merchant_id", "title", "description", "price_idr", "stock", "status",
                     "updated_at"],
        "orders": ["id", "buyer_id", "merchant_id", "status", "total_idr", "created_at",
                   "updated_at"],
        "order_items": ["order_id", "line_no", "product_id", "qty", "unit_price_idr"],
        "payments": ["id", "order_id", "method", "amount_idr", "status", "provider_ref",
                     "paid_at"],
        "invoices": ["id", "order_id", "invoice_no", "url", "issued_at"],
    }[table]  # fmt: skip
    return [c for c in order if c not in mapping.tables[table].exclude]


def assert_same_state(scenario: Scenario, mapping: MappingSpec, events: list[Any]) -> None:
    """Applying the events by position gives exactly the source tables (published columns)."""
    for table, tm in mapping.tables.items():
        cols = published(mapping, table)
        want = source_state(scenario.source_dsn, "shop", table, cols, tm.primary_key)
        got = last_state(events, table, tm.primary_key)
        assert set(got) == set(want), f"{table}: keys differ"
        for key, row in want.items():
            assert got[key] == row, f"{table} {key}: {got[key]} != {row}"


def assert_commit_order_per_key(events: list[Any]) -> None:
    """In every partition, the streamed events of one key have increasing (lsn, seq)."""
    last: dict[tuple[str, bytes], tuple[int, int]] = {}
    for e in changes(events):
        if e.record["op"] == "r":
            continue
        pos = (e.record["source"]["lsn"], e.record["source"]["seq"])
        ident = (e.raw.topic, e.raw.key or b"")
        assert ident not in last or last[ident] <= pos, f"{ident} went back: {last[ident]} {pos}"
        last[ident] = pos


def assert_last_in_partition(events: list[Any]) -> None:
    """Per transaction and partition, exactly the last event is marked last_in_partition."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for e in changes(events):
        tx = e.record["transaction"]
        if tx is None:
            continue
        groups.setdefault((tx["id"], e.raw.topic, e.raw.partition), []).append(e.record)
    for recs in groups.values():
        recs.sort(key=lambda r: r["source"]["seq"])
        # A duplicate delivery (after a restart) repeats the group: compare distinct positions.
        distinct = {r["source"]["seq"]: r for r in recs}
        ordered = [distinct[s] for s in sorted(distinct)]
        flags = [r["transaction"]["last_in_partition"] for r in ordered]
        assert flags == [False] * (len(flags) - 1) + [True], flags


def test_init_is_idempotent_and_publishes_column_lists(scenario: Scenario) -> None:
    first = harness.init(scenario)
    assert f"publication {scenario.publication}" in first["created"]
    assert f"slot {scenario.slot}" in first["created"]
    assert {f"topic {t}" for t in scenario.topics()} <= set(first["created"])
    second = harness.init(scenario)
    assert second["created"] == [] and second["altered"] == []
    with psycopg.connect(scenario.source_dsn) as conn:
        cols = conn.execute(
            "SELECT tablename, attnames FROM pg_publication_tables WHERE pubname = %s",
            (scenario.publication,),
        ).fetchall()
    lists: dict[str, list[str]] = dict(cols)
    assert set(lists["users"]) == {"id", "display_name", "email", "phone", "created_at",
                                   "updated_at"}  # fmt: skip
    assert "url" not in lists["invoices"]
    assert "updated_at" not in lists["products"]


def test_preflight_refuses_a_table_without_primary_key(scenario: Scenario) -> None:
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE shop.invoices DROP CONSTRAINT invoices_pkey")
    result = scenario.cli("init")
    assert result.returncode == 1
    assert "shop.invoices has no primary key" in result.stderr
    assert "ADD PRIMARY KEY" in result.stderr
    with psycopg.connect(scenario.source_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_publication WHERE pubname = %s", (scenario.publication,)
        ).fetchone() == (0,)


def test_workload_reaches_kafka_in_commit_order_without_rollbacks_or_social_data(
    scenario: Scenario, mapping: MappingSpec
) -> None:
    # Rows that exist before init: only the initial snapshot can carry them.
    prefill(scenario.source_dsn, orders=400, seed=3)
    canary = f"CANARY-{secrets.token_hex(8)}"
    harness.init(scenario)
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        # Values written to excluded columns must appear in no topic.
        conn.execute(
            "UPDATE shop.users SET bio = %s, handle = handle || %s, follower_count = 987654321"
            " WHERE id IN (SELECT id FROM shop.users ORDER BY id LIMIT 20)",
            (canary, canary),
        )
        conn.execute(
            "UPDATE shop.invoices SET url = url || %s WHERE id IN"
            " (SELECT id FROM shop.invoices ORDER BY id LIMIT 5)",
            (canary,),
        )
    report = run_workload(scenario.source_dsn, rate=5000, max_transactions=1500, seed=11)
    assert report.rolled_back > 0
    stats = drain(scenario)
    assert stats["stopped_by"] == "idle"
    events = scenario.read()
    assert_same_state(scenario, mapping, events)
    assert_commit_order_per_key(events)
    assert_last_in_partition(events)
    raw = b"".join(scenario.raw_values())
    assert canary.encode() not in raw
    assert ROLLBACK_MARKER.encode() not in raw
    for e in changes(events):
        image = e.record["after"] or e.record["before"]
        assert all(v is None or not isinstance(v, int) or v < ROLLBACK_ID_BASE
                   for v in image.values())  # fmt: skip
        assert "bio" not in image and "handle" not in image and "follower_count" not in image
    assert any(e.record["op"] == "r" for e in changes(events))
    # Heartbeats went to every partition of every domain topic.
    beats = {(e.raw.topic, e.raw.partition) for e in events if e.raw.kind == "heartbeat"}
    assert beats == {(t, p) for t in scenario.topics() for p in range(scenario.partitions)}
    confirmed, _ = scenario.slot_state()
    assert confirmed == str_to_lsn(stats["position"])


def test_unchanged_toast_updates_stay_marked(scenario: Scenario) -> None:
    harness.init(scenario)
    description = secrets.token_hex(6000)  # 12 kB of incompressible text: stored out of line
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shop.merchants (id, owner_user_id, shop_name, status)"
            " VALUES (1, 1, 'S', 'active')"
        )
        conn.execute(
            "INSERT INTO shop.products (id, merchant_id, title, description, price_idr, stock,"
            " status) VALUES (1, 1, 'T', %s, 10.50, 3, 'live')",
            (description,),
        )
        conn.execute("UPDATE shop.products SET stock = 4 WHERE id = 1")
    drain(scenario, "--no-initial-snapshot")
    prods = [
        e.record for e in changes(scenario.read()) if e.record["source"]["table"] == "products"
    ]
    assert [r["op"] for r in prods] == ["c", "u"]
    assert prods[0]["after"]["description"] == description
    assert prods[0]["unchanged_toast"] == []
    assert prods[1]["unchanged_toast"] == ["description"]
    assert prods[1]["after"]["description"] is None
    assert prods[1]["after"]["stock"] == 4


def test_added_column_is_published_after_the_mapping_and_init_say_so(
    scenario: Scenario, tmp_path: Path
) -> None:
    harness.init(scenario)
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (1, 'a', 'A')")
        conn.execute("ALTER TABLE shop.users ADD COLUMN nickname text")
        conn.execute(
            "INSERT INTO shop.users (id, handle, display_name, nickname) VALUES (2, 'b', 'B', 'n')"
        )
    drain(scenario, "--no-initial-snapshot")
    # The new column is not decided in the mapping: init refuses to publish it.
    refused = scenario.cli("init")
    assert refused.returncode == 1 and "nickname are neither read by the mapping" in refused.stderr
    # The mapping now maps it: init alters the publication and says so.
    text = harness.MAPPING.read_text().replace(
        'customer_id = "id"', 'customer_id = "id"\nnickname = "nickname"'
    )
    scenario.mapping = tmp_path / "mapping.toml"
    scenario.mapping.write_text(text)
    report = harness.init(scenario)
    assert f"publication {scenario.publication}" in report["altered"]
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shop.users (id, handle, display_name, nickname) VALUES (3, 'c', 'C', 'x')"
        )
        conn.execute("UPDATE shop.users SET nickname = 'y' WHERE id = 1")
    drain(scenario, "--no-initial-snapshot")
    users = [e for e in changes(scenario.read()) if e.record["source"]["table"] == "users"]
    users.sort(key=lambda e: (e.record["source"]["lsn"], e.record["source"]["seq"]))
    assert [e.record["after"]["id"] for e in users] == [1, 2, 3, 1]
    assert "nickname" not in users[1].record["after"]  # not published yet
    assert users[2].record["after"]["nickname"] == "x"
    assert users[3].record["after"]["nickname"] == "y"
    assert users[0].schema == users[1].schema
    fps = {e.raw.value[2:10] for e in users if e.raw.value}
    assert len(fps) == 2  # two writer schema versions, both in the schemas topic


def test_incompatible_type_change_stops_without_advancing(scenario: Scenario) -> None:
    harness.init(scenario)
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (1, 'a', 'A')")
    drain(scenario, "--no-initial-snapshot")
    before, _ = scenario.slot_state()
    with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
        # PostgreSQL 15 refuses ALTER COLUMN TYPE on a column in a publication column list;
        # the only way to change it is to take the table out of the publication meanwhile.
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("ALTER TABLE shop.users ALTER COLUMN phone TYPE integer USING NULL")
        pub = psycopg.sql.Identifier(scenario.publication)
        with conn.transaction():
            conn.execute(psycopg.sql.SQL("ALTER PUBLICATION {} DROP TABLE shop.users").format(pub))
            # The write fence's UPDATE OF trigger names the mapped columns of shop.users (the
            # narrowed fence): it goes too while the type changes; `cutover init` puts it back.
            conn.execute("DROP TRIGGER IF EXISTS cutover_write_fence_update ON shop.users")
            conn.execute("ALTER TABLE shop.users ALTER COLUMN phone TYPE integer USING NULL")
            conn.execute(
                psycopg.sql.SQL(
                    "ALTER PUBLICATION {} ADD TABLE shop.users"
                    " (id, display_name, email, phone, created_at, updated_at)"
                ).format(pub)
            )
        conn.execute("INSERT INTO shop.users (id, handle, display_name) VALUES (2, 'b', 'B')")
    for _ in range(2):  # also after a restart: the refusal is remembered
        result = scenario.cli("produce", "--exit-when-idle", "--no-initial-snapshot")
        assert result.returncode == 3, result.stderr[-2000:]
        assert "incompatible schema change of shop.users" in result.stderr
        assert "column phone changed type" in result.stderr
        assert scenario.slot_state()[0] == before


def test_snapshot_with_concurrent_updates_ends_equal_to_the_source(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path,
    mapping: MappingSpec,
) -> None:  # fmt: skip
    with open_scenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, chunk_rows=150
    ) as scenario:
        prefill(scenario.source_dsn, orders=2000, seed=5)
        harness.init(scenario)
        stop_hot = threading.Event()
        hot = threading.Thread(target=_hot_updates, args=(scenario.source_dsn, stop_hot))
        proc = scenario.start_produce()
        hot.start()
        try:
            run_workload(scenario.source_dsn, rate=400, duration=6, seed=8, bulk_every=300)
            # Keep the hot updates going until the products snapshot is done, however slow the
            # machine: its chunk windows must see concurrent changes for the checks below.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                ev["event"] == "snapshot.done" and ev.get("table") == "products"
                for ev in scenario.log_events()
            ):
                time.sleep(0.2)
            stop_hot.set()
            hot.join()
            request = scenario.cli("snapshot", "--table", "products", "--where", "stock > 10")
            assert request.returncode == 0, request.stderr
            time.sleep(1)
        finally:
            stop_hot.set()
            assert harness.stop(proc, signal.SIGTERM) == 0
        drain(scenario)
        events = scenario.read()
        assert_same_state(scenario, mapping, events)
        assert_commit_order_per_key(events)
        with psycopg.connect(scenario.source_dsn) as conn:
            statuses = conn.execute(
                "SELECT kind, status FROM cutover.snapshot_requests WHERE slot_name = %s",
                (scenario.slot,),
            ).fetchall()
        assert len(statuses) == 8 and all(s == "done" for _, s in statuses)
        snap = [e for e in changes(events) if e.record["op"] == "r"]
        assert {e.record["source"]["table"] for e in snap} == set(mapping.tables)
        for e in snap:
            assert e.record["source"]["snapshot"] == "true" and e.record["transaction"] is None
        # The windows really saw concurrent changes, including unchanged-TOAST ones (re-read).
        logged = scenario.log_events()
        assert sum(ev["dropped"] for ev in logged if ev["event"] == "snapshot.chunk_done") > 0
        assert any(ev["event"] == "snapshot.reread" for ev in logged)


def _hot_updates(dsn: str, stop: threading.Event) -> None:
    """Update stock (not the TOASTed description) of random products as fast as possible."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM shop.products WHERE length(description) > 2000 ORDER BY id"
        )]  # fmt: skip
        rng = random.Random(3)
        while not stop.is_set():
            conn.execute(
                "UPDATE shop.products SET stock = stock + 1 WHERE id = %s", (rng.choice(ids),)
            )


def test_idle_heartbeats_advance_the_slot_past_uncaptured_wal(scenario: Scenario) -> None:
    harness.init(scenario)
    proc = scenario.start_produce("--no-initial-snapshot")
    try:
        with psycopg.connect(scenario.source_dsn, autocommit=True) as conn:
            # WAL the publication does not carry: PostgreSQL 15 sends nothing for it, so
            # without the producer's own heartbeat messages the slot would never move past it.
            conn.execute("CREATE TABLE public.noise (x int)")
            conn.execute("INSERT INTO public.noise SELECT generate_series(1, 10000)")
            row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
            assert row is not None
        deadline = time.monotonic() + 30
        while (scenario.slot_state()[0] or 0) < row[0]:
            assert time.monotonic() < deadline, "the slot did not advance while idle"
            assert proc.poll() is None
            time.sleep(0.2)
    finally:
        assert harness.stop(proc) == 0
    beats = [e for e in scenario.read() if e.raw.kind == "heartbeat"]
    assert {(e.raw.topic, e.raw.partition) for e in beats} == {
        (t, p) for t in scenario.topics() for p in range(scenario.partitions)
    }
    assert max(e.record["lsn"] for e in beats) >= row[0]
    assert all(e.raw.key == b"__heartbeat__" and e.schema == "cutover.Heartbeat" for e in beats)
