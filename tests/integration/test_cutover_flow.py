"""The state machine on the real stack: a crash in the middle of a switch leaves a state that
status explains and that a re-run completes; rollback abandons an unfinished switch; every
transition reaches the compacted control topic with a growing version; the commands' exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

from cli.commands import audit as audit_command
from cli.commands import switch_reads as switch_command
from control.state import CrashForTest, rollback, status_report, switch_reads
from control.verify import VerifyOptions, run_verify
from cutover.config import Settings
from cutover.errors import UsageError
from cutover.routing import ReadRouter
from tests.integration.test_verify_support import (
    DOMAINS,
    beat,
    commerce,
    control_messages,
    create_topics,
    mapping,
    scratch_pair,
    seed,
    stage_pipeline,
)

pytestmark = pytest.mark.integration

WEIGHTS = {"payment": 60, "data": 20, "merchant": 20}


@pytest.fixture(scope="module")
def staged(source_dsn: str, target_dsn: str, kafka_bootstrap: str) -> Iterator[Settings]:
    with scratch_pair(source_dsn, target_dsn, kafka_bootstrap) as settings:
        seed(settings, orders=200)
        create_topics(settings)
        stage_pipeline(settings)
        report = run_verify(
            settings, mapping(), actor="t", options=VerifyOptions(recheck_timeout_s=5)
        )
        assert report.passed
        yield settings


def domain_status(settings: Settings, domain: str) -> dict[str, Any]:
    report = status_report(settings, WEIGHTS)
    return next(d for d in report["domains"] if d["domain"] == domain)


def test_crash_after_intent_then_rerun_completes(staged: Settings) -> None:
    domains = list(DOMAINS)
    beat(staged)
    with pytest.raises(CrashForTest):
        switch_reads(staged, domains, "data", actor="sre", crash_at="after_intent")
    st = domain_status(staged, "data")
    assert st["state"] == "switching_reads" and st["effective_state"] == "replicating"
    assert "not yet published" in st["explanation"]
    assert "cutover switch-reads data" in st["explanation"]
    assert "cutover rollback data" in st["explanation"]
    table_router = ReadRouter(staged, "data", mode="table").start()
    try:
        assert table_router.database_for("data") == "legacy"
        out = switch_reads(staged, domains, "data", actor="sre")
        assert out.outcome == "resumed" and out.to_state == "reads_switched"
        assert table_router.wait_for("data", "reads_switched", 2.0)
    finally:
        table_router.close()
    st = domain_status(staged, "data")
    assert st["state"] == "reads_switched" and st["pending"] is None
    assert status_report(staged, WEIGHTS)["progress_percent"] == 20
    # crash after publishing the rollback: readers already follow it; a re-run completes it
    with pytest.raises(CrashForTest):
        rollback(staged, domains, "data", actor="sre", crash_at="after_publish")
    st = domain_status(staged, "data")
    assert st["state"] == "rolling_back" and st["effective_state"] == "replicating"
    assert "published: routers already follow replicating" in st["explanation"]
    assert rollback(staged, domains, "data", actor="sre").outcome == "resumed"
    assert domain_status(staged, "data")["state"] == "replicating"
    msgs = [m for m in control_messages(staged) if m["domain"] == "data"]
    # (the active segment of a compacted topic is not compacted yet: every message is there)
    assert [(m["state"], m["version"], m["actor"]) for m in msgs] == [
        ("reads_switched", 1, "sre"),
        ("replicating", 2, "sre"),
        ("replicating", 2, "sre"),  # the re-run published the same version again: harmless
    ]


def test_rollback_abandons_an_unfinished_switch(staged: Settings) -> None:
    domains = list(DOMAINS)
    beat(staged)
    with pytest.raises(CrashForTest):
        switch_reads(staged, domains, "merchant", actor="sre", crash_at="after_publish")
    st = domain_status(staged, "merchant")
    assert st["effective_state"] == "reads_switched"  # published: readers follow it already
    assert status_report(staged, WEIGHTS)["progress_percent"] == 20
    out = rollback(staged, domains, "merchant", actor="sre")
    assert out.outcome == "done" and out.to_state == "replicating"
    rows = commerce(
        staged,
        "SELECT action, status, version FROM cutover.transitions WHERE domain = 'merchant' "
        "ORDER BY created_at",
    )
    assert rows == [("switch_reads", "abandoned", 1), ("rollback", "done", 2)]
    last = [m for m in control_messages(staged) if m["domain"] == "merchant"][-1]
    assert (last["state"], last["version"]) == ("replicating", 2)


def _args(**kw: Any) -> argparse.Namespace:
    base = {
        "domain": "payment",
        "dry_run": False,
        "yes": False,
        "force": False,
        "reason": None,
        "actor": "cli",
        "json": True,
    }
    base.update(kw)
    return argparse.Namespace(**base)


class _Ctx:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings


def test_commands_need_yes_without_a_terminal(staged: Settings) -> None:
    ctx: Any = _Ctx(staged)
    with pytest.raises(UsageError, match="pass --yes") as err:
        switch_command.run(_args(), ctx)  # pytest's stdin is not a terminal
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="--force needs --reason"):
        switch_command.run(_args(force=True, yes=True), ctx)
    beat(staged)
    assert switch_command.run(_args(dry_run=True), ctx) == 0  # every gate passes
    assert commerce(staged, "SELECT state FROM cutover.domain_state WHERE domain = 'payment'") == [
        ("replicating",)
    ]
    assert audit_command.run(argparse.Namespace(json=True, domain="payment", limit=5), ctx) == 0
