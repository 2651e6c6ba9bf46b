"""Least-privilege database roles (issue 15): the grants `cutover init --print-grants` prints,
applied by an administrator on scratch databases, are enough to run the pipeline as those roles
(produce as the producer, apply as the applier, verify/status/switch-reads as the SRE) and no
more: the producer cannot read a social column, the applier cannot write legacy. And PostgreSQL
over TLS as the secured stack sets it up (devtools/pg_security.py): verify-full against the
stack's CA connects, another CA or plaintext is refused."""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cutover import grants, pg
from cutover.errors import DatabaseError
from devtools import pg_security, stack, tls
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


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[str, tls.CertificateAuthority, Path]]:
    """A private PostgreSQL cluster secured as `make up SECURE=1` does (the shared stack may be
    plaintext): (its admin DSN without TLS settings, the stack CA, the base folder)."""
    base = Path(tempfile.mkdtemp(prefix="cutover-pgtls-"))
    base.chmod(0o755)  # the cluster runs as postgres when we are root
    root = base / "stack"
    root.mkdir()
    root.chmod(0o755)
    password, port = secrets.token_urlsafe(12), stack._free_port()
    stack._init_cluster(root, "legacy", port, password, {})
    ca = tls.make_ca(root / "tls")
    pg_security.secure_cluster(root / "pg" / "legacy", ca)
    pg_security.secure_cluster(root / "pg" / "legacy", ca)  # idempotent: nothing changes
    stack._start_pg(root, "legacy")
    try:
        yield f"postgresql://cutover:{password}@127.0.0.1:{port}/postgres", ca, base
    finally:
        stack._pg_ctl(root, "legacy", "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_tls_verify_full_against_the_stack_ca(
    tls_cluster: tuple[str, tls.CertificateAuthority, Path],
) -> None:
    dsn, ca, base = tls_cluster
    key = base / "stack" / "pg" / "legacy" / f"{pg_security.SERVER_NAME}.key"
    assert key.stat().st_mode & 0o077 == 0  # readable by the database user only
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        secured = f"{dsn.replace('127.0.0.1', host)}?{pg_security.client_params(ca.cert)}"
        with pg.connect(secured, side="source", application_name="tls test") as conn:
            row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
    # Another CA (here a stack made again: same name, other key): the client refuses the
    # server, and says what to check (the password stays masked).
    wrong = tls.make_ca(base / "other")
    with pytest.raises(DatabaseError) as refused:
        pg.connect(f"{dsn}?{pg_security.client_params(wrong.cert)}", side="source",
                   application_name="tls test")  # fmt: skip
    assert "SSL error" in refused.value.message
    assert "signed by the CA in sslrootcert" in refused.value.message
    password = conninfo_to_dict(dsn)["password"]
    assert isinstance(password, str) and password not in refused.value.message
    # Plaintext TCP is refused by the server.
    with pytest.raises(DatabaseError) as plain:
        pg.connect(f"{dsn}?sslmode=disable", side="source", application_name="tls test")
    assert "no encryption" in plain.value.message
