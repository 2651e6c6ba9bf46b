"""Least-privilege database roles (issue 15): the grants `cutover init --print-grants` prints,
applied by an administrator on scratch databases, are enough to run the pipeline as those roles
(produce as the producer, apply as the applier, verify/status/switch-reads as the SRE) and no
more: the producer cannot read a social column, the applier cannot write legacy. And PostgreSQL
over TLS as the secured stack sets it up (devtools/pg_security.py): verify-full against the
stack's CA connects, another CA or plaintext is refused.

The write cutover too: switch-writes and rollback-writes as the SRE while the reverse producer
(``produce --reverse``, the producer role on commerce) and the reverse applier (``apply
--reverse``, reverse_applier) carry a write made on commerce back to legacy; the reverse applier
can neither write a legacy social column nor commerce."""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cutover import grants, pg
from cutover.errors import DatabaseError
from devtools import pg_security, stack, tls
from devtools.harness import Scenario, init, stop
from devtools.ports import free_port
from devtools.workload import prefill
from tests.integration.faults_support import cli_processes, start_cli
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
    scenario = RoleScenario(
        fresh_legacy, fresh_commerce, kafka_bootstrap, tmp_path, partitions=3,
        gate_settings={"min_reads_soak_minutes": 0, "min_writes_soak_minutes": 0},
    )  # fmt: skip
    logins = ("producer", "applier", "reverse_applier", "sre")
    passwords = {p: secrets.token_urlsafe(12) for p in logins}
    try:
        report = init(scenario)
        assert any("superuser" in w for w in report["warnings"]), report["warnings"]
        init(scenario, "--reverse")  # before the grants: they grant on what it creates
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
        scenario.drop_slot(reverse=True)
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
    assert _state(scenario) == "reads_switched"
    outputs += _write_switch_and_back(scenario, passwords)
    # The role passwords never appear in anything the commands printed or logged.
    for password in passwords.values():
        assert not any(password in out for out in outputs)


def _state(scenario: Scenario, domain: str = "payment") -> str:
    with psycopg.connect(scenario.target_dsn) as conn:
        row = conn.execute("SELECT state FROM cutover.domain_state WHERE domain = %s", [domain])
        return str(row.fetchone()[0])  # type: ignore[index]


def _legacy_has(dsn: str, order: object, invoice: object) -> bool:
    """The commerce write is in legacy (mapped back): the order shipped, the invoice renamed
    with its legacy url rebuilt."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT status FROM shop.orders WHERE id = %s), "
            "(SELECT url FROM shop.invoices WHERE id = %s AND invoice_no LIKE '%%-R')",
            [order, invoice],
        ).fetchone()
    return row is not None and row[0] == "shipped" and str(row[1]).endswith("-R")


# The application's write on commerce once it takes payment's writes, and what legacy must
# then show (the reverse mapping: enum in lower case; an invoice's legacy url is rebuilt).
COMMERCE_WRITE = (
    "UPDATE commerce.orders SET state = 'SHIPPED' WHERE order_id = (SELECT min(order_id) FROM "
    "commerce.orders WHERE state <> 'SHIPPED') RETURNING order_id",
    "UPDATE commerce.invoices SET invoice_no = invoice_no || '-R', link = link || '-R' "
    "WHERE invoice_id = (SELECT min(invoice_id) FROM commerce.invoices) RETURNING invoice_id",
)


def _write_switch_and_back(scenario: RoleScenario, passwords: dict[str, str]) -> list[str]:
    """switch-writes payment as the SRE with both pipelines running as their roles, a commerce
    write reaching legacy, rollback-writes as the SRE; what the commands printed."""
    producer = _as(scenario, passwords, "producer")
    reverse_applier = _as(scenario, passwords, "reverse_applier")
    sre = _as(scenario, passwords, "sre")
    # The reverse applier writes the mapped legacy columns only: not a social one, not commerce.
    assert "permission denied" in _denied(
        reverse_applier.source_dsn, "UPDATE shop.users SET bio = 'x' WHERE id = 1"
    )
    assert "permission denied" in _denied(
        reverse_applier.target_dsn, "UPDATE commerce.orders SET state = state"
    )
    outputs: list[str] = []
    with cli_processes() as procs:
        procs["produce"] = start_cli(producer, "produce", "produce")
        procs["apply"] = start_cli(_as(scenario, passwords, "applier"), "apply", "apply")
        procs["produce-reverse"] = start_cli(producer, "produce-reverse", "produce", "--reverse")
        procs["apply-reverse"] = start_cli(reverse_applier, "apply-reverse", "apply", "--reverse")
        _poll(scenario, procs, lambda: _reverse_beat(scenario))  # the switch's gate wants it
        switched = sre.cli("switch-writes", "payment", "--yes", "--reason", "roles test",
                           timeout=240)  # fmt: skip
        outputs += [switched.stdout, switched.stderr]
        assert switched.returncode == 0, _tail(scenario, switched)
        assert _state(scenario) == "writes_switched"
        with psycopg.connect(scenario.target_dsn, autocommit=True) as conn:
            order, invoice = (conn.execute(q.encode()).fetchone() for q in COMMERCE_WRITE)
        assert order is not None and invoice is not None
        _poll(scenario, procs, lambda: _legacy_has(scenario.source_dsn, order[0], invoice[0]))
        back = sre.cli("rollback-writes", "payment", "--yes", "--reason", "roles test",
                       timeout=240)  # fmt: skip
        outputs += [back.stdout, back.stderr]
        assert back.returncode == 0, _tail(scenario, back)
        assert _state(scenario) == "reads_switched"
        for name, proc in procs.items():
            assert stop(proc) == 0, f"{name}: {_logs(scenario)}"
    return [*outputs, _logs(scenario)]


def _reverse_beat(scenario: Scenario) -> bool:
    with psycopg.connect(scenario.target_dsn) as conn:
        return bool(
            conn.execute(
                "SELECT 1 FROM cutover.producer_state WHERE slot_name = %s "
                "AND heartbeat_at IS NOT NULL",
                [scenario.reverse_slot],
            ).fetchone()
        )


def _poll(
    scenario: Scenario, procs: dict[str, subprocess.Popen[bytes]], done: Callable[[], bool]
) -> None:
    """Until ``done()``, the processes running all along (generous: a loaded machine)."""
    deadline = time.monotonic() + 120
    while not done():
        assert all(p.poll() is None for p in procs.values()), _logs(scenario)
        assert time.monotonic() < deadline, _logs(scenario)
        time.sleep(0.5)


def _logs(scenario: Scenario) -> str:
    names = ("produce", "apply", "produce-reverse", "apply-reverse")
    return "\n".join(
        f"== {n}\n" + (scenario.workdir / f"{n}.log").read_text()[-1500:] for n in names
    )


def _tail(scenario: Scenario, done: subprocess.CompletedProcess[str]) -> str:
    return f"{done.stdout[-2000:]}{done.stderr[-2000:]}\n{_logs(scenario)}"


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[str, tls.CertificateAuthority, Path]]:
    """A private PostgreSQL cluster secured as `make up SECURE=1` does (the shared stack may be
    plaintext): (its admin DSN without TLS settings, the stack CA, the base folder)."""
    base = Path(tempfile.mkdtemp(prefix="cutover-pgtls-"))
    base.chmod(0o755)  # the cluster runs as postgres when we are root
    root = base / "stack"
    root.mkdir()
    root.chmod(0o755)
    password, port = secrets.token_urlsafe(12), free_port()
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
