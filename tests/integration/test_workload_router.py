"""The workload in router mode across write switches, on the real stack (issue 11).

The workload writes through a router (table mode) at a steady rate. Mid-run the test does, for
each domain in turn (payment, merchant, data), what ``switch-writes D`` does to the databases:
raise legacy's fence of the domain; bring commerce up to the fence (a mapped copy stands in for
the forward pipeline's drain); move the domain to ``writes_switched`` (a new version in
``domain_state``, which the router follows); lower commerce's fence. Then: the workload retried
the refused transactions (> 0 retries) and went on on commerce; legacy holds none of a domain's
writes after its fence; and an oracle (a plain run of the same plan prefix on identical starting
rows) matches the union view: legacy as of each domain's fence, commerce (mapped) after it.
Every kind of transaction runs on both sides (a bulk repricing every 100 transactions).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import islice
from typing import Any

import psycopg
import pytest
from psycopg import sql

from control.verify import copy_mapped_rows
from cutover import fence
from cutover.control_store import ControlStore, ensure_domains
from cutover.mapping import MappingSpec, load_mapping
from cutover.routing import ReadRouter, RouterConfig
from devtools import workload
from devtools.scratch import scratch_database
from devtools.workload_router import run_routed_workload
from tests.integration.conftest import EXAMPLES

pytestmark = pytest.mark.integration

SCHEMA = "cutover"
SEED = 9
RATE = 150.0
AFTER_S = 3.0  # the workload runs on this long after the last switch
SWITCHES = ("payment", "merchant", "data")  # at 3 s, 5 s, 7 s into the run
BULK_EVERY = 100
BOUND_S = 2.0


@pytest.fixture
def dbs(source_dsn: str, target_dsn: str) -> Iterator[dict[str, str]]:
    """legacy + commerce under test, two oracle legacies and an oracle commerce."""
    with ExitStack() as stack:

        def make(admin: str, ddl: str, prefix: str) -> str:
            gen = scratch_database(admin, EXAMPLES / ddl, prefix)
            stack.callback(lambda: next(gen, None))
            return next(gen)

        yield {
            "legacy": make(source_dsn, "legacy.sql", "wr_legacy"),
            "commerce": make(target_dsn, "commerce.sql", "wr_commerce"),
            "oracle": make(source_dsn, "legacy.sql", "wr_oracle"),
            "oracle_commerce": make(target_dsn, "commerce.sql", "wr_oracle_commerce"),
            **{d: make(source_dsn, "legacy.sql", f"wr_oracle_{d}") for d in SWITCHES},
        }


def _tables(mapping: MappingSpec, domain: str) -> list[Any]:
    return [t for t in mapping.tables.values() if t.domain == domain]


def _set_up(dbs: dict[str, str], mapping: MappingSpec) -> None:
    for name in ("legacy", "oracle", *SWITCHES):
        workload.prefill(dbs[name], orders=300, seed=5)  # same seed: identical starting rows
    copy_mapped_rows(dbs["legacy"], dbs["commerce"], mapping)  # commerce caught up
    domains = list(mapping.domains)
    with psycopg.connect(dbs["legacy"], autocommit=True) as conn:
        fence.install(conn, SCHEMA, _fenced_tables(mapping, "source"), side="source")
    with psycopg.connect(dbs["commerce"], autocommit=True) as conn:
        fence.install(conn, SCHEMA, _fenced_tables(mapping, "target"), side="target")
        ControlStore(conn, SCHEMA, "target").ensure("commands")
        ensure_domains(conn, SCHEMA, domains)
        # The switch starts from reads_switched (switch-reads is not what this test is about).
        conn.execute(
            "UPDATE cutover.domain_state SET state = 'reads_switched', version = version + 1"
        )


def _fenced_tables(mapping: MappingSpec, side: str) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for t in mapping.tables.values():
        name = (mapping.source_schema, t.source_table)
        if side == "target":
            name = (mapping.target_schema, t.target_table)
        out.setdefault(t.domain, []).append(name)
    return out


def _switch_writes(dbs: dict[str, str], mapping: MappingSpec, domain: str) -> float:
    """What switch-writes does to the databases; returns when legacy's fence went up."""
    with psycopg.connect(dbs["legacy"], autocommit=True) as conn:
        fence.raise_fence(conn, SCHEMA, domain, state="writes_switched", reason="t", side="source")
    fenced_at = time.monotonic()
    # Stand-in for "wait until the forward pipeline applied everything up to the fence LSN":
    # legacy's rows of the domain no longer change, so a mapped copy is that state exactly.
    tables = _tables(mapping, domain)
    with psycopg.connect(dbs["commerce"], autocommit=True) as conn:
        for t in tables:
            conn.execute(
                sql.SQL("TRUNCATE {}").format(sql.Identifier(mapping.target_schema, t.target_table))
            )
    copy_mapped_rows(dbs["legacy"], dbs["commerce"], mapping, tables)
    with psycopg.connect(dbs["commerce"], autocommit=True) as conn:
        conn.execute(
            "UPDATE cutover.domain_state SET state = 'writes_switched', version = version + 1, "
            "changed_at = now() WHERE domain = %s",
            [domain],
        )
        fence.lower_fence(conn, SCHEMA, domain, state="writes_switched", side="target")
    return fenced_at


def _rows(dsn: str, schema: str, table: str) -> list[tuple[Any, ...]]:
    """Every row, bookkeeping columns left out, in a stable order."""
    with psycopg.connect(dsn) as conn:
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = %s AND column_name NOT LIKE '\\_src\\_%%' "
                "ORDER BY ordinal_position",
                [schema, table],
            ).fetchall()
        ]
        query = sql.SQL("SELECT {} FROM {} ORDER BY 1, 2").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in cols), sql.Identifier(schema, table)
        )
        return list(conn.execute(query).fetchall())


def test_router_mode_follows_a_write_switch_and_loses_nothing(dbs: dict[str, str]) -> None:
    mapping = load_mapping(EXAMPLES / "mapping.toml")
    _set_up(dbs, mapping)
    config = RouterConfig(legacy_dsn=dbs["legacy"], commerce_dsn=dbs["commerce"])
    router = ReadRouter(config, list(mapping.domains), mode="table", poll_interval_s=0.2).start()
    result: dict[str, Any] = {}
    stop = threading.Event()

    def run() -> None:
        try:
            result["report"] = run_routed_workload(
                router,
                dbs["legacy"],
                dbs["commerce"],
                mapping,
                rate=RATE,
                seed=SEED,
                duration=40.0,  # a safety net: the test stops it
                bulk_every=BULK_EVERY,
                stop=stop.is_set,
            )
        except BaseException as exc:  # reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    followed_s = 0.0
    try:
        thread.start()
        time.sleep(1.0)
        for domain in SWITCHES:
            time.sleep(2.0)
            assert "error" not in result, result.get("error")
            fenced_at = _switch_writes(dbs, mapping, domain)
            assert router.wait_for(domain, "writes_switched", BOUND_S + 1)
            followed_s = max(followed_s, time.monotonic() - fenced_at)
        time.sleep(AFTER_S)
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the workload did not finish"
    finally:
        router.close()
    assert "error" not in result, result.get("error")
    report: workload.WorkloadReport = result["report"]
    done = report.transactions
    routed = report.to_dict()["router"]
    assert routed["retries"] > 0, routed
    assert routed["refused_transactions"] >= 1
    assert routed["max_retry_wait_s"] <= followed_s + 1.0
    # Each domain's first refused transaction is the first it wrote on commerce; every later one
    # of the domain went there too.
    firsts = routed["first_commerce_seq"]
    assert set(firsts) == set(SWITCHES)
    refused = routed["refused_seqs"]
    assert all(seq in refused for seq in firsts.values()), (firsts, refused)
    assert min(routed["written"][d]["commerce"] for d in SWITCHES) >= 5, routed["written"]
    kinds_after = {op.kind for op in _plan(dbs["oracle"], done)[firsts["merchant"] :]}
    assert "product.bulk_reprice" in kinds_after

    # The oracle: the same plan on identical starting rows, all of it and up to each fence.
    workload.run_workload(
        dbs["oracle"], rate=10_000, seed=SEED, max_transactions=done, bulk_every=BULK_EVERY
    )
    for domain in SWITCHES:
        workload.run_workload(
            dbs[domain], rate=10_000, seed=SEED, max_transactions=firsts[domain],
            bulk_every=BULK_EVERY,
        )  # fmt: skip
    copy_mapped_rows(dbs["oracle"], dbs["oracle_commerce"], mapping)
    for t in mapping.tables.values():
        # Legacy holds the domain as of its fence: no refused write reached it.
        legacy = _rows(dbs["legacy"], "shop", t.source_table)
        assert legacy == _rows(dbs[t.domain], "shop", t.source_table), t.source_table
        # Commerce holds the rest, exactly as the pipeline would have mapped it.
        got = _rows(dbs["commerce"], "commerce", t.target_table)
        assert got == _rows(dbs["oracle_commerce"], "commerce", t.target_table), t.target_table


def _plan(dsn: str, n: int) -> list[workload.Operation]:
    """The plan the run followed (read from the oracle's starting rows, before its run)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = workload.read_start_state(conn)
    return list(islice(workload.plan_operations(SEED, start, bulk_every=BULK_EVERY), n))
