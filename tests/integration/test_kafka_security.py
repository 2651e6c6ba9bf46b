"""The pipeline against a secured Kafka (TLS + SASL/SCRAM-SHA-512 + ACLs, ``make up SECURE=1``).

On the shared stack when it is secured, else on a private secured stack in a temporary folder.
One run is shared by the module (init as the operator, ``produce`` as the producer user,
``apply`` as the applier user); the tests then check that (a) commerce equals the mapped legacy,
(b) each principal is refused what its ACLs do not allow, with our error and exit code,
(c) a wrong password fails fast naming the user and the fix, (d) no output of the run holds a
generated password.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException, TopicPartition

from cutover import kafka
from cutover.config import KafkaSettings, load_settings
from cutover.errors import KafkaAccessError, StackError
from devtools import kafka_security, stack
from devtools.harness import Scenario, open_scenario
from devtools.scratch import scratch_database
from devtools.workload import prefill
from tests.integration.conftest import EXAMPLES
from tests.integration.faults_support import CACHE, dump_database, wait_equal, wait_for

REPO = Path(__file__).resolve().parents[2]
PROCESS_S = 120


@dataclass
class Secured:
    """A secured stack: its folder, addresses and ``CUTOVER_*`` settings (operator's user)."""

    root: Path
    env: dict[str, str]

    def as_user(self, user: str) -> dict[str, str]:
        keys = [
            k for k in self.env if k.startswith("CUTOVER_KAFKA_") and k != "CUTOVER_KAFKA_BOOTSTRAP"
        ]
        return kafka_security.as_user({k: self.env[k] for k in keys}, user)

    def passwords(self) -> dict[str, str]:
        users = (kafka_security.ADMIN, *kafka_security.USERS)
        return {u: kafka_security.password(self.root, u) for u in users}


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    shared = stack.read_env(REPO / ".stack", os.environ)
    # The environment wins over the env file (CUTOVER_KAFKA_SECURITY_PROTOCOL=PLAINTEXT: private).
    protocol = os.environ.get(
        "CUTOVER_KAFKA_SECURITY_PROTOCOL", shared.get("CUTOVER_KAFKA_SECURITY_PROTOCOL")
    )
    if protocol == "SASL_SSL":
        yield Secured(Path(shared["CUTOVER_KAFKA_CA"]).parents[1], stack.read_env(REPO / ".stack"))
        return
    base = Path(tempfile.mkdtemp(prefix="cutover-kafkasec-"))
    base.chmod(0o755)  # the PostgreSQL clusters run as another user
    root = base / "stack"
    try:
        try:
            stack.up(root, CACHE, secure=True, quick_jvm=True)
        except StackError:
            # A JVM starting on a loaded 2-core machine may take longer than up's deadline:
            # wait for it (a second up would restart a lone broker that does not answer yet).
            bootstrap = _bootstrap(root)
            security = kafka_security.client_config(root)
            wait_for(lambda: stack._kafka_ready(bootstrap, 1, security), 300, "secured Kafka")
            # What up does once Kafka answers (another up could take a slow answer for none).
            kafka_security.grant(root, bootstrap)
            stack.write_env(root, _state(root))
        yield Secured(root, stack.read_env(root))
    finally:
        try:
            stack.down(root)
        finally:
            shutil.rmtree(base, ignore_errors=True)


@dataclass
class Run:
    scenario: Scenario
    legacy: str
    commerce: str
    group: str
    #: Every text a process of the run printed (the scan of test (d)).
    outputs: dict[str, str] = field(default_factory=dict)

    def cli(self, name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        done = self.scenario.cli(*args, extra_env=env, timeout=PROCESS_S)
        self.outputs[name] = done.stdout + done.stderr
        return done


def _state(root: Path) -> stack.StackState:
    state = stack.load_state(root)
    assert state is not None, f"no stack in {root}"
    return state


def _bootstrap(root: Path) -> str:
    return _state(root).env()["CUTOVER_KAFKA_BOOTSTRAP"]


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout=timeout)
    return None


@pytest.fixture(scope="module")
def run(secured: Secured) -> Iterator[Run]:
    legacy_admin = secured.env["CUTOVER_SOURCE_DSN"]
    commerce_admin = secured.env["CUTOVER_TARGET_DSN"]
    legacy_db = contextlib.contextmanager(scratch_database)
    commerce_db = contextlib.contextmanager(scratch_database)
    workdir = Path(tempfile.mkdtemp(prefix="cutover-kafkasec-run-"))
    with (
        legacy_db(legacy_admin, EXAMPLES / "legacy.sql", "legacy") as legacy,
        commerce_db(commerce_admin, EXAMPLES / "commerce.sql", "commerce") as commerce,
        open_scenario(
            legacy, commerce, secured.env["CUTOVER_KAFKA_BOOTSTRAP"], workdir, partitions=3
        ) as scenario,
    ):
        kafka_security.grant(secured.root, scenario.bootstrap, scenario.prefix)
        run = Run(scenario, legacy, commerce, group=f"cutover-apply-sec-{scenario.tag}")
        prefill(legacy, orders=150, seed=5)
        init = run.cli("init", "init", "--json", env=secured.as_user("operator"))
        assert init.returncode == 0, init.stderr
        producer = scenario.start_produce(extra_env=secured.as_user("producer"))
        apply_log = workdir / "apply.log"
        with apply_log.open("ab") as log:
            applier = subprocess.Popen(
                [sys.executable, "-m", "cli.entry", "--config", str(scenario.config),
                 "--log-json", "apply", "--group-id", run.group],
                env=scenario.env(secured.as_user("applier")), stdout=log, stderr=log,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            wait_equal(legacy, commerce, timeout=150)
        finally:
            for proc in (producer, applier):
                proc.terminate()
            codes = [_wait_exit(p, 60) for p in (producer, applier)]
            run.outputs["produce"] = scenario.log_path.read_text(errors="replace")
            run.outputs["apply"] = apply_log.read_text(errors="replace")
        assert codes == [0, 0], run.outputs
        yield run
    shutil.rmtree(workdir, ignore_errors=True)


def _settings(run: Run, env: dict[str, str]) -> KafkaSettings:
    return load_settings(run.scenario.config, run.scenario.env(env)).kafka


def test_pipeline_runs_over_sasl_ssl_with_the_component_users(secured: Secured, run: Run) -> None:
    # The fixture ran init, produce and apply as their users and waited for commerce to equal
    # the mapped legacy; the brokers take nothing but SASL_SSL (and mutual TLS for the quorum).
    props = (secured.root / "kafka" / "server.properties").read_text()
    assert "SASL_SSL://" in props and "PLAINTEXT://" not in props
    assert secured.env["CUTOVER_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert wait_equal(run.legacy, run.commerce, timeout=30) >= 0


def test_applier_may_not_produce_a_domain_topic(secured: Secured, run: Run) -> None:
    with psycopg_connect(run.legacy) as conn:
        conn.execute(
            "UPDATE shop.users SET email = 'acl-' || email "
            "WHERE id = (SELECT min(id) FROM shop.users)"
        )
    t0 = time.monotonic()
    done = run.cli("produce-as-applier", "produce", env=secured.as_user("applier"))
    assert done.returncode == KafkaAccessError.exit_code == 2, done.stderr
    assert "TOPIC_AUTHORIZATION_FAILED" in done.stderr
    assert "an ACL denies this" in done.stderr and "sasl_username" in done.stderr
    assert time.monotonic() - t0 < PROCESS_S


def test_producer_may_not_read_dead_letters_nor_join_the_appliers_group(
    secured: Secured, run: Run
) -> None:
    settings = _settings(run, secured.as_user("producer"))
    dlq = kafka.consumer(settings, "replay", group_id=f"cutover-replay-sec-{run.scenario.tag}")
    try:
        dlq.assign([TopicPartition(settings.dlq_topic, 0, 0)])
        # Refused on the topic, or already on the group it would read under (it has neither).
        refusals = {"TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED"}
        assert _first_error(dlq) in refusals
    finally:
        dlq.close()
    member = kafka.consumer(settings, "apply", group_id=run.group)
    try:
        member.subscribe([settings.topic("users")])
        assert _first_error(member) == "GROUP_AUTHORIZATION_FAILED"
    finally:
        member.close()
    # Such a refusal becomes our error: exit code 2, the fix in the message.
    err = kafka.translate(
        KafkaException(RdKafkaError(RdKafkaError.TOPIC_AUTHORIZATION_FAILED)), "reading"
    )
    assert isinstance(err, KafkaAccessError) and err.exit_code == 2


def _first_error(consumer: object, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = consumer.poll(1.0)  # type: ignore[attr-defined]
        except KafkaException as exc:
            return str(exc.args[0].name())
        if msg is not None and msg.error() is not None:
            if msg.error().code() == RdKafkaError._PARTITION_EOF:
                continue
            return str(msg.error().name())
        assert msg is None, "the refused principal read a message"
    raise AssertionError("no refusal within the timeout")


def test_wrong_password_fails_fast_naming_the_user_and_the_fix(secured: Secured, run: Run) -> None:
    env = {**secured.as_user("applier"), "CUTOVER_KAFKA_SASL_PASSWORD_FILE": ""}
    env["CUTOVER_KAFKA_SASL_PASSWORD"] = "not-the-password-of-applier"
    t0 = time.monotonic()
    done = run.cli("apply-wrong-password", "apply", "--group-id", run.group, env=env)
    took = time.monotonic() - t0
    assert done.returncode == 2, done.stderr
    assert "'applier'" in done.stderr and "sasl_password_file" in done.stderr
    assert "not-the-password-of-applier" not in done.stdout + done.stderr
    assert took < 60, f"took {took:.0f} s"


def test_no_output_of_the_secured_run_holds_a_password(secured: Secured, run: Run) -> None:
    operator = secured.as_user("operator")
    run.cli("status", "status", "--json", env=operator)
    run.cli("help", "--help", env=operator)
    for command in ("produce", "apply"):
        run.cli(f"help-{command}", command, "--help", env=operator)
    run.outputs["commerce dump (audit, dead letters, ...)"] = dump_database(run.commerce)
    run.outputs["env file"] = (secured.root / "env").read_text()
    for path in secured.root.rglob("*.log"):
        run.outputs[str(path)] = path.read_text(errors="replace")
    assert {"produce", "apply", "status", "help", "init"} <= set(run.outputs)
    for user, password in secured.passwords().items():
        leaks = [name for name, text in run.outputs.items() if password in text]
        assert not leaks, f"the password of {user} is in {leaks}"


@contextlib.contextmanager
def psycopg_connect(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn
