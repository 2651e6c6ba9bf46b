"""The read router's decisions without services: versions only move forward (no flapping),
bad control messages are ignored, the default is legacy, only followed domains count."""

from __future__ import annotations

import json

import pytest

from cutover.routing import ReadRouter, RouterConfig

CONFIG = RouterConfig(
    legacy_dsn="postgresql://legacy.example/shop",
    commerce_dsn="postgresql://commerce.example/commerce",
    kafka_bootstrap="127.0.0.1:9",
)


def router(**kw: object) -> ReadRouter:
    return ReadRouter(CONFIG, ["payment", "data"], mode="table", **kw)  # type: ignore[arg-type]


def test_default_is_legacy() -> None:
    r = router()
    assert r.state_of("payment") == "replicating"
    assert r.database_for("payment") == "legacy"
    assert r.dsn_for("payment") == CONFIG.legacy_dsn
    assert not r.healthy


def test_versions_only_move_forward() -> None:
    seen: list[tuple[str, str, int]] = []
    r = router(on_change=lambda d, s, v: seen.append((d, s, v)))
    assert r.offer("payment", "reads_switched", 1)
    assert r.database_for("payment") == "commerce"
    assert r.dsn_for("payment") == CONFIG.commerce_dsn
    # a stale or duplicated message (replay, late table read) never moves it back
    assert not r.offer("payment", "replicating", 0)
    assert not r.offer("payment", "reads_switched", 1)
    assert r.database_for("payment") == "commerce"
    assert r.offer("payment", "replicating", 2)
    assert r.database_for("payment") == "legacy"
    assert seen == [("payment", "reads_switched", 1), ("payment", "replicating", 2)]
    assert r.version_of("payment") == 2


def test_only_followed_domains() -> None:
    r = router()
    assert not r.offer("merchant", "reads_switched", 5)
    assert r.state_of("merchant") == "replicating"


def test_in_flight_and_future_states() -> None:
    r = router()
    r.offer("data", "writes_switched", 3)
    assert r.database_for("data") == "commerce"


def test_control_messages() -> None:
    r = router()
    r._apply_message(
        b"data", json.dumps({"domain": "data", "state": "reads_switched", "version": 4}).encode()
    )
    assert r.database_for("data") == "commerce"
    r._apply_message(b"data", b"not json")  # ignored, state kept
    r._apply_message(b"data", json.dumps({"domain": "data"}).encode())
    r._apply_message(b"data", None)  # a compaction tombstone
    assert (r.state_of("data"), r.version_of("data")) == ("reads_switched", 4)


def test_a_failing_callback_does_not_break_the_router() -> None:
    def boom(_d: str, _s: str, _v: int) -> None:
        raise RuntimeError("app bug")

    r = router(on_change=boom)
    assert r.offer("data", "reads_switched", 1)
    assert r.database_for("data") == "commerce"


def test_topic_mode_needs_kafka() -> None:
    with pytest.raises(ValueError, match="kafka_bootstrap"):
        ReadRouter(RouterConfig("a", "b"), "data", mode="topic")


@pytest.mark.parametrize(
    ("state", "reads", "writes"),
    [
        ("replicating", "legacy", "legacy"),
        ("reads_switched", "commerce", "legacy"),
        ("writes_switched", "commerce", "commerce"),
        ("completed", "commerce", "commerce"),
    ],
)
def test_writes_follow_the_state_separately_from_reads(state: str, reads: str, writes: str) -> None:
    r = router()
    r.offer("payment", state, 1)
    assert r.database_for("payment") == reads
    assert r.write_database_for("payment") == writes
    expected = CONFIG.commerce_dsn if writes == "commerce" else CONFIG.legacy_dsn
    assert r.write_dsn_for("payment") == expected
