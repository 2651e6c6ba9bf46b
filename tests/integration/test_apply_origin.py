"""The appliers write under a replication origin (cutover/origin.py) on a real PostgreSQL 15:
their transactions carry it (the origin's local position moves with each commit), a fenced
domain lets them through while a plain session is refused, and two sessions take two origins of
the pool."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from cutover import fence
from cutover.origin import ORIGIN_NAMES, setup_session
from devtools.apply_support import (
    EventFactory,
    Topics,
    apply_until,
    delete_topics,
    fetch_commerce,
    make_topics,
    produce,
    publish_schemas,
    settings_for,
)

# The replication origin pool is cluster-wide: another test's appliers would hold some of it.
pytestmark = [pytest.mark.integration, pytest.mark.serial]

T = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=2)
    try:
        yield t
    finally:
        delete_topics(t)


def _origin_lsn(conn: psycopg.Connection[tuple[object, ...]], name: str) -> int:
    row = conn.execute(
        "SELECT s.local_lsn - '0/0'::pg_lsn FROM pg_replication_origin_status s "
        "JOIN pg_replication_origin o ON o.roident = s.local_id WHERE o.roname = %s",
        [name],
    ).fetchone()
    return 0 if row is None or row[0] is None else int(str(row[0]))


def test_applier_writes_under_its_origin_through_a_fence(commerce: str, topics: Topics) -> None:
    f = EventFactory(topics.prefix, topics.partitions)
    publish_schemas(topics, f)
    settings = settings_for(commerce, topics)
    origin = ORIGIN_NAMES[0]  # the test's applier is the only one: it takes the first
    with psycopg.connect(commerce, autocommit=True) as conn:
        fence.install(conn, "cutover", {"data": [("commerce", "customers")]}, side="target")
        fence.raise_fence(conn, "cutover", "data", state="replicating", reason="t", side="target")
        # A plain session (an app instance that missed the switch) is refused.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM commerce.customers")
        before = _origin_lsn(conn, origin)

    user = {
        "id": 1,
        "display_name": "U1",
        "email": "a@x",
        "phone": None,
        "created_at": T,
        "updated_at": T,
    }
    produce(topics.bootstrap, [f.change("users", "c", user, lsn=100, seq=0)])
    apply_until(settings, lambda: bool(fetch_commerce(commerce).get("customers")))

    with psycopg.connect(commerce, autocommit=True) as conn:
        after = _origin_lsn(conn, origin)
    assert after > before, f"the applier's commit did not carry origin {origin}"


def test_concurrent_sessions_take_different_origins(commerce: str) -> None:
    with (
        psycopg.connect(commerce, autocommit=True) as a,
        psycopg.connect(commerce, autocommit=True) as b,
    ):
        first = setup_session(a, side="target")
        second = setup_session(b, side="target")
        assert (first, second) == ORIGIN_NAMES[:2]
        assert a.execute("SELECT pg_replication_origin_session_is_setup()").fetchone() == (True,)
