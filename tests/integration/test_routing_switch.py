"""The read router under a live switch: an application reading continuously while reads are
switched and rolled back never errors and never reads from a database the state does not name
for longer than the bound (2 s), following the control topic or polling the control table."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql

from control.state import rollback, switch_reads
from control.verify import VerifyOptions, run_verify
from cutover.config import Settings
from cutover.routing import ReadRouter, RouterConfig
from tests.integration.test_verify_support import (
    DOMAINS,
    beat,
    create_topics,
    mapping,
    scratch_pair,
    seed,
    stage_pipeline,
)

pytestmark = pytest.mark.integration

BOUND_S = 2.0


@pytest.fixture(scope="module")
def staged(source_dsn: str, target_dsn: str, kafka_bootstrap: str) -> Iterator[Settings]:
    with scratch_pair(source_dsn, target_dsn, kafka_bootstrap) as settings:
        seed(settings, orders=200)
        create_topics(settings)
        stage_pipeline(settings)
        yield settings


@dataclass
class ReaderApp:
    """Reads the order count of the payment domain from wherever the router says, in a loop."""

    router: ReadRouter
    reads: list[tuple[float, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        conns: dict[str, psycopg.Connection[tuple[int]]] = {}
        try:
            while not self.stop.is_set():
                db = self.router.database_for("payment")
                try:
                    if db not in conns:
                        conns[db] = psycopg.connect(self.router.dsn_for("payment"), autocommit=True)
                    schema = "commerce" if db == "commerce" else "shop"
                    row = (
                        conns[db]
                        .execute(
                            sql.SQL("SELECT count(*) FROM {}").format(
                                sql.Identifier(schema, "orders")
                            )
                        )
                        .fetchone()
                    )
                    assert row is not None and row[0] > 0
                    self.reads.append((time.monotonic(), db))
                except Exception as exc:
                    self.errors.append(f"{db}: {exc}")
                time.sleep(0.01)
        finally:
            for conn in conns.values():
                conn.close()


def test_reads_follow_switch_and_rollback(staged: Settings) -> None:
    domains = list(DOMAINS)
    assert run_verify(
        staged, mapping(), domain="payment", actor="t", options=VerifyOptions(recheck_timeout_s=5)
    ).passed
    topic_router = ReadRouter(staged, ["payment"], mode="topic").start()
    table_router = ReadRouter(staged, ["payment"], mode="table", poll_interval_s=0.5).start()
    apps = [ReaderApp(topic_router), ReaderApp(table_router)]
    threads = [threading.Thread(target=a.run, daemon=True) for a in apps]
    for t in threads:
        t.start()
    # (when the named state changed: the moment the command returned, the publish is before it)
    timeline: list[tuple[float, float, str]] = [(0.0, 0.0, "legacy")]
    took: dict[str, list[float]] = {"topic": [], "table": []}
    try:
        time.sleep(1.0)
        for step in ("switch", "rollback", "switch", "rollback"):
            beat(staged)
            began = time.monotonic()
            if step == "switch":
                switch_reads(staged, domains, "payment", actor="t")
                want, state = "commerce", "reads_switched"
            else:
                rollback(staged, domains, "payment", actor="t")
                want, state = "legacy", "replicating"
            ended = time.monotonic()
            timeline.append((began, ended, want))
            for name, router in (("topic", topic_router), ("table", table_router)):
                assert router.wait_for("payment", state, BOUND_S + 1)
                took[name].append(time.monotonic() - ended)
            time.sleep(BOUND_S + 0.5)
    finally:
        for a in apps:
            a.stop.set()
        for t in threads:
            t.join(timeout=10)
        topic_router.close()
        table_router.close()

    for name, app in zip(("topic", "table"), apps, strict=True):
        assert app.errors == [], f"{name} router app saw errors: {app.errors[:3]}"
        assert len(app.reads) > 200, f"{name} app read only {len(app.reads)} times"
        assert {db for _t, db in app.reads} == {"legacy", "commerce"}
        wrong = [
            (t, db)
            for t, db in app.reads
            if db != _named(timeline, t) and not _within_bound(timeline, t)
        ]
        assert wrong == [], f"{name} app read the wrong database outside the bound: {wrong[:3]}"
        assert max(took[name]) <= BOUND_S, f"{name} router took {max(took[name]):.2f} s"


def _named(timeline: list[tuple[float, float, str]], t: float) -> str:
    """The database the state named at time ``t`` (the last change that ended before it)."""
    named = "legacy"
    for _began, ended, db in timeline:
        if ended <= t:
            named = db
    return named


def _within_bound(timeline: list[tuple[float, float, str]], t: float) -> bool:
    """``t`` falls in a transition (from its start to the bound after it ended)."""
    return any(began <= t <= ended + BOUND_S for began, ended, _db in timeline[1:])


def test_router_keeps_its_state_when_kafka_is_unreachable(staged: Settings) -> None:
    # "no verify" is a critical gate that --force cannot pass: verify first
    assert run_verify(
        staged, mapping(), domain="data", actor="t", options=VerifyOptions(recheck_timeout_s=5)
    ).passed
    beat(staged)
    switch_reads(staged, list(DOMAINS), "data", actor="t", force=True, reason="router test")
    config = RouterConfig(
        legacy_dsn=staged.source.dsn,
        commerce_dsn=staged.target.dsn,
        kafka_bootstrap="127.0.0.1:9",  # nothing listens there
        control_topic=staged.kafka.control_topic,
    )
    router = ReadRouter(config, ["data"], mode="topic").start()
    try:
        # the table read at start gave it the state; Kafka failures do not change it
        assert router.database_for("data") == "commerce"
        time.sleep(1.5)
        assert router.database_for("data") == "commerce"
        assert router.dsn_for("data") == staged.target.dsn
    finally:
        router.close()
    broken = RouterConfig(
        legacy_dsn=staged.source.dsn,
        commerce_dsn="postgresql://nobody@127.0.0.1:9/none",
        control_topic=staged.kafka.control_topic,
    )
    router = ReadRouter(broken, ["data"], mode="table", poll_interval_s=0.1).start()
    try:
        time.sleep(0.5)
        assert router.database_for("data") == "legacy"  # nothing known: the starting state
        assert not router.healthy
    finally:
        router.close()
    rollback(staged, list(DOMAINS), "data", actor="t")
