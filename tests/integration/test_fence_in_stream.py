"""The write fence in the WAL, on the real stack: while legacy's fence of a domain is up, the
forward producer drops that domain's row changes, so the legacy social app's whole-row updates
(allowed by the narrowed fence) cannot carry a mapped value older than commerce's forward and
overwrite it there (the CI failure of stop 11 in test_write_cutover_e2e). The producer knows the
fence after a restart (``write_fence_log``), and forwards again once the fence is lowered.

Real processes: ``cutover produce`` and ``cutover apply`` both ways, PostgreSQL 15, Kafka.
"""

from __future__ import annotations

import signal
from typing import Any

import psycopg
import pytest

from cutover import fence
from devtools.harness import Scenario, init, open_scenario
from devtools.workload import prefill
from tests.integration.faults_support import (
    cli_processes,
    log_events,
    start_cli,
    wait_equal,
    wait_for,
)

pytestmark = pytest.mark.integration

USER = 7  # a user the prefill made
NAME = "SELECT display_name FROM commerce.customers WHERE customer_id = %s"


def _dropped(scenario: Scenario) -> int:
    batches = log_events(scenario, "produce", "producer.batch_delivered")
    return sum(int(e.get("fence_dropped", 0)) for e in batches)


def _one(dsn: str, query: str, *params: object) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query.encode(), params).fetchone()
    return None if row is None else row[0]


def test_a_social_update_behind_the_fence_does_not_overwrite_commerce(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Any
) -> None:
    prefill(fresh_legacy, orders=40, seed=5)
    with (
        open_scenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=2) as sc,
        cli_processes() as procs,
    ):
        init(sc, "--reverse")
        procs["produce"] = start_cli(sc, "produce", "produce")
        procs["apply"] = start_cli(sc, "apply", "apply")
        procs["produce-reverse"] = start_cli(sc, "produce-reverse", "produce", "--reverse")
        wait_equal(fresh_legacy, fresh_commerce, timeout=180)
        old_email = _one(fresh_legacy, "SELECT email FROM shop.users WHERE id = %s", USER)

        # The data domain's writes move to commerce: legacy's fence goes up (narrowed on
        # shop.users: the social app still writes handle, bio, follower_count).
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            fence.raise_fence(
                conn, "cutover", "data", state="writes_switched", reason="test", side="source"
            )
        # Commerce takes a write; its reverse event waits (no reverse applier yet). The social
        # app then updates its own columns of the same user in legacy: the row image carries
        # the email legacy still holds, older than commerce's.
        with psycopg.connect(fresh_commerce, autocommit=True) as conn:
            conn.execute(
                "UPDATE commerce.customers SET email = 'fresh@example.org' WHERE customer_id = %s",
                (USER,),
            )
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            conn.execute("UPDATE shop.users SET bio = 'social 1' WHERE id = %s", (USER,))
            # A later change of another domain: once it is in commerce, the forward pipeline
            # has passed the social update (one producer, commit order).
            conn.execute("UPDATE shop.merchants SET rating = 1.25 WHERE id = 1")
        wait_for(lambda: _dropped(sc) >= 1, 60, "the producer to drop the fenced domain's change")
        wait_for(
            lambda: (
                _one(fresh_commerce, "SELECT rating FROM commerce.sellers WHERE seller_id = 1")
                == 1.25
            ),
            60,
            "the later change in commerce",
        )
        email = "SELECT email FROM commerce.customers WHERE customer_id = %s"
        assert _one(fresh_commerce, email, USER) == "fresh@example.org", old_email

        # A restarted producer knows the fence is up at its slot's position.
        procs["produce"].send_signal(signal.SIGTERM)
        assert procs["produce"].wait(timeout=60) == 0
        procs["produce"] = start_cli(sc, "produce", "produce")
        wait_for(lambda: len(log_events(sc, "produce", "producer.started")) == 2, 60, "the restart")
        assert log_events(sc, "produce", "producer.started")[-1]["fenced"] == ["data"]
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            conn.execute("UPDATE shop.users SET bio = 'social 2' WHERE id = %s", (USER,))
        wait_for(lambda: _dropped(sc) >= 2, 60, "the restarted producer to drop it too")

        # The reverse applier delivers commerce's write: both sides agree, through the mapping.
        procs["apply-reverse"] = start_cli(sc, "apply-reverse", "apply", "--reverse")
        wait_for(
            lambda: (
                _one(fresh_legacy, "SELECT email FROM shop.users WHERE id = %s", USER)
                == "fresh@example.org"
            ),
            120,
            "the reverse path",
        )
        wait_equal(fresh_legacy, fresh_commerce, timeout=60)

        # Lowered, the fence is out of the stream: legacy's changes of the domain flow again.
        with psycopg.connect(fresh_legacy, autocommit=True) as conn:
            fence.lower_fence(conn, "cutover", "data", state="reads_switched", side="source")
            conn.execute("UPDATE shop.users SET display_name = 'After' WHERE id = %s", (USER,))
        wait_for(
            lambda: _one(fresh_commerce, NAME, USER) == "After",
            60,
            "a change after the fence came down",
        )  # fmt: skip
        changed = log_events(sc, "produce", "producer.fences_changed")
        assert changed and changed[-1]["fenced"] == []
        assert _dropped(sc) == 2
        assert _one(fresh_legacy, "SELECT bio FROM shop.users WHERE id = %s", USER) == "social 2"
