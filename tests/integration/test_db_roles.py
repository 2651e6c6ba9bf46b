"""Least-privilege database roles (issue 15): the grants `cutover init --print-grants` prints,
applied by an administrator on scratch databases, are enough to run the pipeline as those roles
(produce as the producer, apply as the applier, verify/status/switch-reads as the SRE) and no
more: the producer cannot read a social column, the applier cannot write legacy."""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cutover import grants
from devtools.harness import Scenario, init, stop
from devtools.workload import prefill
from tests.integration.shop_compare import assert_commerce_matches_legacy, compare

pytestmark = pytest.mark.integration


@dataclasses.dataclass
class RoleScenario(Scenario):
    """A scenario whose config names roles of its own ([roles]), so runs never share them."""

    def role(self, part: str) -> str:
        return f"t{self.tag}_{part}"

    def write_config(self) -> Path:
        path = super().write_config()
        names = ("producer", "applier", "reverse_applier", "sre", "control_owner")
        with path.open("a") as fh:
            fh.write("[roles]\n" + "".join(f'{n} = "{self.role(n)}"\n' for n in names))
        return path


def as_role(dsn: str, user: str, password: str) -> str:
    params = conninfo_to_dict(dsn)
    params.update(user=user, password=password)
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture
def roles(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[RoleScenario, dict[str, str]]]:
    """init as the administrator, then the printed grants, then a password per login role."""
    prefill(fresh_legacy, orders=150, seed=11)
    scenario = RoleScenario(fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=3)
    logins = ("producer", "applier", "reverse_applier", "sre")
    passwords = {p: secrets.token_urlsafe(12) for p in logins}
    try:
        report = init(scenario)
        assert any("superuser" in w for w in report["warnings"]), report["warnings"]
        printed = scenario.cli("init", "--print-grants")
        assert printed.returncode == 0, printed.stderr
        parts = grants.split(printed.stdout)
        for dsn, part in ((fresh_legacy, "legacy"), (fresh_commerce, "commerce")):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(parts[part].encode())
                for p in logins:
                    conn.execute(
                        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                            sql.Identifier(scenario.role(p)), sql.Literal(passwords[p])
                        )
                    )
        yield scenario, passwords
    finally:
        scenario.drop_slot()
        for dsn in (fresh_legacy, fresh_commerce):
            with psycopg.connect(dsn, autocommit=True) as conn:
                for p in (*logins, "control_owner"):
                    name = sql.Identifier(scenario.role(p))
                    if conn.execute(
                        "SELECT 1 FROM pg_roles WHERE rolname = %s", [scenario.role(p)]
                    ).fetchone():
                        conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(name))
                        conn.execute(sql.SQL("DROP ROLE {}").format(name))


def _as(scenario: RoleScenario, passwords: dict[str, str], part: str) -> Scenario:
    """The scenario with both DSNs naming role ``part``: what that component is given."""
    user, password = scenario.role(part), passwords[part]
    return dataclasses.replace(
        scenario,
        source_dsn=as_role(scenario.source_dsn, user, password),
        target_dsn=as_role(scenario.target_dsn, user, password),
        tag=scenario.tag,
    )


def _denied(dsn: str, statement: str) -> str:
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege) as refused,
    ):
        conn.execute(statement)
    return str(refused.value)


def test_pipeline_runs_as_the_printed_roles_and_no_further(
    roles: tuple[RoleScenario, dict[str, str]],
) -> None:
    scenario, passwords = roles
    producer = _as(scenario, passwords, "producer")
    applier = _as(scenario, passwords, "applier")
    sre = _as(scenario, passwords, "sre")
    # Column-level grants: the social column is out of reach, even for a snapshot's SELECT.
    assert "permission denied" in _denied(producer.source_dsn, "SELECT bio FROM shop.users")
    assert "permission denied" in _denied(
        producer.source_dsn, "SELECT id FROM shop.users WHERE bio IS NOT NULL"
    )
    # The applier writes commerce only: a legacy shop table is refused.
    assert "permission denied" in _denied(
        applier.source_dsn, "UPDATE shop.users SET email = email WHERE id = 1"
    )
    outputs: list[str] = []
    produced = producer.cli("produce", "--exit-when-idle", timeout=240)
    outputs += [produced.stdout, produced.stderr]
    assert produced.returncode == 0, produced.stderr[-3000:]
    applier.write_config()
    log = (scenario.workdir / "apply.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.entry", "--config", str(applier.config), "--log-json",
         "apply"],
        env=applier.env(), stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not all(d.ok for d in compare(scenario.source_dsn, scenario.target_dsn)):
            assert proc.poll() is None, (scenario.workdir / "apply.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(1.0)
        assert_commerce_matches_legacy(scenario.source_dsn, scenario.target_dsn)
    finally:
        assert stop(proc) == 0, (scenario.workdir / "apply.log").read_text()[-3000:]
    outputs.append((scenario.workdir / "apply.log").read_text())
    assert "superuser" not in outputs[-1]  # the roles are not: no warning
    verified = sre.cli("verify", "--json", "--recheck-timeout", "5", "--no-progress")
    outputs += [verified.stdout, verified.stderr]
    assert verified.returncode == 0, verified.stderr[-3000:]
    status = sre.cli("status", "--json")
    outputs += [status.stdout, status.stderr]
    assert status.returncode == 0, status.stderr[-3000:]
    payment = {d["domain"]: d for d in json.loads(status.stdout)["domains"]}["payment"]
    assert payment["last_verify"]["passed"] is True
    switched = sre.cli("switch-reads", "payment", "--yes", "--reason", "roles test", "--force")
    outputs += [switched.stdout, switched.stderr]
    assert switched.returncode == 0, switched.stdout + switched.stderr
    with psycopg.connect(scenario.target_dsn) as conn:
        row = conn.execute("SELECT state FROM cutover.domain_state WHERE domain = 'payment'")
        assert row.fetchone() == ("reads_switched",)
    # The role passwords never appear in anything the commands printed or logged.
    for password in passwords.values():
        assert not any(password in out for out in outputs)
