"""The local stack: Apache Kafka (KRaft, one combined node, or a cluster of three with
``--brokers 3``: :mod:`devtools.kafka_cluster`) and two PostgreSQL 15 clusters, run as plain
processes on 127.0.0.1 (no Docker engine needed). Used by ``make up`` / ``make down``.

``python -m devtools.stack up|down|status [--dir DIR] [--brokers 1|3] [--secure] [--registry]``

* Kafka comes from the official jars on Maven Central (``stack/pom.xml``), copied with
  ``mvn dependency:copy-dependencies`` into a cache folder shared by all stacks of this checkout
  (``.stack-cache/``), and runs on Java 17 with a capped heap.
* The PostgreSQL clusters are made with Debian's ``postgresql-15`` ``initdb``: ``legacy``
  (``wal_level=logical``) and ``commerce``. They run as a non-root user (``postgres`` when we are
  root, since initdb refuses root), with their sockets inside the stack folder, password
  authentication, and a password generated per stack.
* ``up`` waits until each server really answers (a Kafka metadata request listing every broker,
  a SQL query), then writes ``<dir>/env`` with the ``CUTOVER_*`` variables (the Kafka bootstrap
  is the list of all brokers). A second ``up`` reuses what runs and restarts a node that died.
  Without ``--brokers`` a stack keeps its size (one node for a new one); another size, asked
  for while Kafka is stopped, formats Kafka afresh (its topics are lost; PostgreSQL is kept).
* ``down`` stops everything ``up`` started and checks that no process is left.
* With ``--secure`` (``make up SECURE=1``), Kafka takes only TLS + SASL/SCRAM clients, with
  ACLs per component user (:mod:`devtools.kafka_security`); the env file names the CA and the
  users' password files. Asked for while Kafka is stopped, it formats Kafka afresh.
* With ``--registry`` (``make up REGISTRY=1``, ``make test``), a Confluent-compatible schema
  registry too (:mod:`devtools.registry_stack`); its URL is ``CUTOVER_SCHEMA_REGISTRY_URL``.
* With ``--prometheus`` (``make up PROMETHEUS=1``), a Prometheus scraping the processes listed in
  its targets folder (:mod:`devtools.prometheus_stack`); its URL is ``CUTOVER_PROMETHEUS_URL``.

The state of a stack (ports, pids, password) lives in ``<dir>/state.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cutover.errors import CutoverError, PrerequisiteMissing, StackError
from devtools import kafka_cluster, kafka_security, pg_security, tls
from devtools.ports import free_port
from devtools.procs import pid_alive, stop_pids

REPO = Path(__file__).resolve().parents[1]
PG_BIN = Path(os.environ.get("CUTOVER_PG_BIN", "/usr/lib/postgresql/15/bin"))
KAFKA_HEAP = os.environ.get("CUTOVER_KAFKA_HEAP", "-Xms256m -Xmx512m")
READY_TIMEOUT_S = 90.0


@dataclass
class StackState:
    """What a running stack is made of; persisted as ``state.json``."""

    kafka_port: int
    controller_port: int
    legacy_port: int
    commerce_port: int
    password: str
    kafka_pid: int | None = None
    brokers: int = 1
    #: (broker port, controller port) of Kafka nodes 2..brokers, and their pids in that order.
    more_ports: list[list[int]] = field(default_factory=list)
    more_pids: list[int | None] = field(default_factory=list)
    #: One id for every node of a cluster (a single node gets a new one at each format).
    cluster_id: str | None = None
    #: The secured stack's CA certificate (--secure): PostgreSQL speaks TLS only, the DSNs
    #: check the server against it (devtools/pg_security.py).
    ca_cert: str | None = None
    #: TLS + SASL/SCRAM + ACLs (devtools.kafka_security).
    secure: bool = False
    #: Kafka's JVMs with the C1 compiler only and the serial collector: about half the CPU to
    #: start (6.5 s against 11.6 s here), slower when hot. For the tests' private stacks,
    #: whose brokers are killed and restarted; never for the stack benchmarks measure.
    quick_jvm: bool = False

    def node_ports(self) -> list[tuple[int, int]]:
        """(broker port, controller port) of every Kafka node, node 1 first."""
        return [(self.kafka_port, self.controller_port), *((b, c) for b, c in self.more_ports)]

    def kafka_pids(self) -> list[int | None]:
        return [self.kafka_pid, *self.more_pids]

    def set_kafka_pid(self, node: int, pid: int | None) -> None:
        if node == 1:
            self.kafka_pid = pid
        else:
            self.more_pids[node - 2] = pid

    def env(self) -> dict[str, str]:
        # URL form: no spaces, so `.stack/env` can be sourced by a shell as it is.
        def dsn(port: int, db: str) -> str:
            url = f"postgresql://cutover:{self.password}@127.0.0.1:{port}/{db}"
            return f"{url}?{pg_security.client_params(Path(self.ca_cert))}" if self.ca_cert else url

        return {
            "CUTOVER_SOURCE_DSN": dsn(self.legacy_port, "legacy"),
            "CUTOVER_TARGET_DSN": dsn(self.commerce_port, "commerce"),
            "CUTOVER_KAFKA_BOOTSTRAP": kafka_cluster.bootstrap(self.node_ports()),
        }


# --------------------------------------------------------------------------- prerequisites


_APT_PACKAGES = {
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "initdb": "postgresql-15",
    "prometheus": "prometheus",
}


def _have(program: str) -> bool:
    if program == "initdb":
        return (PG_BIN / "initdb").exists() and (PG_BIN / "postgres").exists()
    return shutil.which(program) is not None


def ensure_prerequisites(programs: Sequence[str] = ("java", "mvn", "initdb")) -> None:
    """Install what is missing when we are root with apt (as in CI), else name it and the fix."""
    missing = [p for p in programs if not _have(p)]
    if not missing:
        return
    packages = [_APT_PACKAGES[p] for p in missing]
    hint = f"sudo apt-get update && sudo apt-get install -y {' '.join(packages)}"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _say(f"installing {', '.join(packages)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            check=False,
            env=env,
        )
        if done.returncode == 0 and all(_have(p) for p in missing):
            return
    raise PrerequisiteMissing(missing[0], hint)


# --------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def _run_as_db_user() -> list[str]:
    """Prefix that runs a PostgreSQL binary as a non-root user (initdb refuses root)."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def _chown_for_db(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user="postgres", group="postgres")


# --------------------------------------------------------------------------- kafka


def kafka_libs(cache: Path) -> Path:
    """The folder of Kafka jars, fetched with Maven on first use."""
    libs = cache / "kafka-libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    ensure_prerequisites(("mvn",))
    _say(f"fetching the Apache Kafka jars with Maven into {libs} (first run only)")
    tmp = libs.with_name("kafka-libs.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run(
        [
            "mvn", "-q", "-B", "-f", str(REPO / "stack" / "pom.xml"),
            "dependency:copy-dependencies", f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
        ],
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise StackError("mvn could not fetch the Kafka jars (see its output above)")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.touch()
    return libs


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = warn
logger.apache.name = org.apache.kafka
logger.apache.level = warn
"""


def _kafka_properties(state: StackState, data: Path) -> str:
    b, c = state.kafka_port, state.controller_port
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{c}",
            f"listeners=PLAINTEXT://127.0.0.1:{b},CONTROLLER://127.0.0.1:{c}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{b}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=6",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=12",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.hours=168",
            "",
        ]
    )


def _new_cluster_id() -> str:
    # Like Kafka's Uuid.randomUuid: never an id starting with "-", which reads as a flag.
    cluster_id = "-"
    while cluster_id.startswith("-"):
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return cluster_id


def _start_kafka(state: StackState, root: Path, libs: Path, node: int = 1) -> int:
    kdir = kafka_cluster.node_dir(root, node)
    kdir.mkdir(parents=True, exist_ok=True)
    props = kdir / "server.properties"
    single = _kafka_properties(state, kdir / "data")
    cluster = state.brokers > 1
    text = kafka_cluster.node_properties(single, state.node_ports(), node) if cluster else single
    # 0600: a secured node's properties hold the admin's password.
    props.touch(mode=0o600)
    props.write_text(kafka_security.node_properties(text, root) if state.secure else text)
    (kdir / "log4j2.properties").write_text(_LOG4J2.format(log=kdir / "server.log"))
    heap = kafka_cluster.CLUSTER_HEAP if cluster else KAFKA_HEAP
    jit = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"] if state.quick_jvm else ["-XX:+UseG1GC"]
    java = [
        "java", *heap.split(), *jit, "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={kdir / 'log4j2.properties'}",
        "-cp", f"{libs}/*",
    ]  # fmt: skip
    if not (kdir / "data" / "meta.properties").exists():
        scram = kafka_security.format_args(root) if state.secure else []
        cluster_id = state.cluster_id or _new_cluster_id()
        done = subprocess.run(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(props),
                *scram,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"formatting Kafka storage failed: {done.stdout}{done.stderr}")
    out = (kdir / "stdout.log").open("ab")
    proc = subprocess.Popen(
        [*java, "kafka.Kafka", str(props)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # survive `make up` returning; `down` stops it by pid
    )
    return proc.pid


def _kafka_ready(
    bootstrap: str, brokers: int = 1, security: Mapping[str, str] | None = None
) -> bool:
    """A metadata request answers and lists ``brokers`` brokers (every node registered)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **(security or {})})
    try:
        meta = admin.list_topics(timeout=2)
    except Exception:
        return False
    return len(meta.brokers) >= brokers


# --------------------------------------------------------------------------- postgres


_PG_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "256MB",
    # Local stack only: the tests kill servers (immediate shutdown), never the OS, so fsync off
    # keeps crash safety for what they test and saves the disk. Never do this in production.
    "fsync": "off",
    "max_wal_size": "2GB",
    "log_min_messages": "warning",
}
# Both clusters decode their WAL: legacy for the forward direction, commerce for the reverse one
# of the write cutover (its own slot; the appliers' replication origins use the same budget).
_LOGICAL_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_slot_wal_keep_size": "4GB",
}


def _init_cluster(root: Path, name: str, port: int, password: str, extra: dict[str, str]) -> None:
    pgdir = root / "pg"
    data = pgdir / name
    if (data / "PG_VERSION").exists():
        return
    pgdir.mkdir(parents=True, exist_ok=True)
    _chown_for_db(pgdir)
    pwfile = pgdir / f".pw-{name}"
    pwfile.write_text(password + "\n")
    _chown_for_db(pwfile)
    try:
        done = subprocess.run(
            [
                *_run_as_db_user(), str(PG_BIN / "initdb"), "-D", str(data), "-U", "cutover",
                f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise StackError(f"initdb of the {name} cluster failed: {done.stderr.strip()}")
    conf = {**_PG_SETTINGS, **extra, "port": str(port), "unix_socket_directories": f"'{pgdir}'"}
    with (data / "postgresql.conf").open("a") as fh:
        fh.write("\n# kafka-cutover local stack\n")
        fh.writelines(f"{k} = {v}\n" for k, v in conf.items())


def _pg_ctl(root: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    data = root / "pg" / name
    return subprocess.run(
        [*_run_as_db_user(), str(PG_BIN / "pg_ctl"), "-D", str(data), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _pg_pid(root: Path, name: str) -> int | None:
    pidfile = root / "pg" / name / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


def _start_pg(root: Path, name: str) -> None:
    if _pg_pid(root, name):
        return
    log = root / "pg" / f"{name}.log"
    done = _pg_ctl(root, name, "-l", str(log), "-w", "-t", "60", "start")
    if done.returncode != 0:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise StackError(f"PostgreSQL cluster {name} did not start: {done.stderr.strip()}\n{tail}")


def _pg_ready(port: int, password: str, dbname: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, user="cutover", password=password,
            dbname=dbname, connect_timeout=2,
        ) as conn:  # fmt: skip
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _ensure_database(port: int, password: str, dbname: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host="127.0.0.1", port=port, user="cutover", password=password,
        dbname="postgres", autocommit=True, connect_timeout=5,
    ) as conn:  # fmt: skip
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


# --------------------------------------------------------------------------- up / down


def _wait(what: str, probe: object, deadline: float) -> None:
    assert callable(probe)
    while not probe():
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer in time")
        time.sleep(0.25)


STACK_VARS = (
    "CUTOVER_SOURCE_DSN",
    "CUTOVER_TARGET_DSN",
    "CUTOVER_KAFKA_BOOTSTRAP",
    "CUTOVER_SCHEMA_REGISTRY_URL",
    *kafka_security.ENV_VARS,
)


def read_env(
    root: Path = REPO / ".stack", environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The stack's ``CUTOVER_*`` variables from ``<root>/env``, overridden by those set in
    ``environ`` (tests and benchmarks run against whatever stack the environment names)."""
    env: dict[str, str] = {}
    path = root / "env"
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.lstrip().startswith("#"):
                value = value.strip()
                env[key.strip()] = shlex.split(value)[0] if value.startswith("'") else value
    for key in STACK_VARS:
        if environ and environ.get(key):
            env[key] = environ[key]
    return env


def load_state(root: Path) -> StackState | None:
    try:
        return StackState(**json.loads((root / "state.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _save_state(root: Path, state: StackState) -> None:
    tmp = root / "state.json.tmp"
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.chmod(0o600)
    tmp.replace(root / "state.json")


def write_env(root: Path, state: StackState) -> Path:
    from devtools import prometheus_stack, registry_stack

    path = root / "env"
    tmp = root / "env.tmp"
    variables = {**state.env(), **registry_stack.env(root), **prometheus_stack.env(root)}
    if state.secure:
        variables.update(kafka_security.env(root))
    # Quoted where a shell would split it (the secured DSNs' "&"): the file is sourced.
    tmp.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items()))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def _set_brokers(root: Path, state: StackState, brokers: int) -> None:
    """Give ``state`` a Kafka of ``brokers`` nodes (new ports); an old Kafka's data is removed."""
    alive = [p for p in state.kafka_pids() if pid_alive(p)]
    if alive:
        raise StackError(
            f"the stack in {root} runs {state.brokers} Kafka node(s), not {brokers}: stop it "
            "first (make down), then start it with the size you want"
        )
    for node in range(1, state.brokers + 1):
        shutil.rmtree(kafka_cluster.node_dir(root, node), ignore_errors=True)
    state.brokers = brokers
    state.more_ports = [[free_port(), free_port()] for _ in range(brokers - 1)]
    state.more_pids = [None] * (brokers - 1)
    state.cluster_id = _new_cluster_id() if brokers > 1 else None


def _admin_security(root: Path, state: StackState) -> dict[str, str]:
    """The stack's own probes' connection settings: the admin user's on a secured stack."""
    return kafka_security.client_config(root) if state.secure else {}


def _start_kafka_nodes(root: Path, state: StackState, libs: Path) -> None:
    """Start every Kafka node that is not running (reuse a cluster that answers)."""
    bootstrap = state.env()["CUTOVER_KAFKA_BOOTSTRAP"]
    pids = state.kafka_pids()
    security = _admin_security(root, state)
    if all(pid_alive(p) for p in pids) and _kafka_ready(bootstrap, state.brokers, security):
        _say(f"kafka already running on {bootstrap} (pid {', '.join(map(str, pids))})")
        return
    for node, pid in enumerate(pids, 1):
        if pid is not None and pid_alive(pid) and state.brokers == 1:
            stop_pids([pid])  # a lone broker that does not answer: start it afresh
        if not pid_alive(pid):
            # Nodes of a cluster start together: each waits for a quorum of the others.
            state.set_kafka_pid(node, _start_kafka(state, root, libs, node))
    _save_state(root, state)
    _say(f"kafka starting on {bootstrap} (pid {', '.join(map(str, state.kafka_pids()))})")


def _stack_ca(root: Path) -> tls.CertificateAuthority:
    """The secured stack's CA in ``<root>/tls``, made on first use (both halves share it)."""
    folder = root / "tls"
    ca = tls.CertificateAuthority(cert=folder / "ca.crt", key=folder / "ca.key")
    return ca if ca.cert.exists() and ca.key.exists() else tls.make_ca(folder)


def up(
    root: Path,
    cache: Path,
    brokers: int | None = None,
    *,
    registry: bool = False,
    secure: bool | None = None,
    prometheus: bool = False,
    quick_jvm: bool | None = None,
) -> StackState:
    """Start (or reuse) the stack in ``root``; return its state once every server answers.
    ``brokers``: the size of the Kafka cluster (None: the stack's own, 1 for a new one).
    With ``registry``, the schema registry too (:mod:`devtools.registry_stack`); with
    ``secure``, PostgreSQL over TLS only (:mod:`devtools.pg_security`), set up while a cluster
    is stopped, and Kafka with TLS, SASL and ACLs (:mod:`devtools.kafka_security`; None: the
    stack's own mode, plaintext for a new one); with ``prometheus``, Prometheus
    (:mod:`devtools.prometheus_stack`); ``quick_jvm`` (None: the stack's own) for Kafka nodes
    started from now on (:attr:`StackState.quick_jvm`)."""
    t0 = time.monotonic()
    ensure_prerequisites()
    root.mkdir(parents=True, exist_ok=True)
    # The clusters run as another user: it must be able to reach the stack folder.
    if os.geteuid() == 0:
        root.chmod(0o755)
        reachable = subprocess.run([*_run_as_db_user(), "test", "-x", str(root)], check=False)
        if reachable.returncode != 0:
            raise StackError(
                f"user postgres cannot reach {root}: the PostgreSQL clusters run as that user; "
                "pick a stack folder whose parents are world-searchable (chmod o+x)"
            )
    state = load_state(root)
    if state is None:
        state = StackState(
            kafka_port=free_port(),
            controller_port=free_port(),
            legacy_port=free_port(),
            commerce_port=free_port(),
            password=secrets.token_urlsafe(18),
        )
        _set_brokers(root, state, brokers or 1)
        _save_state(root, state)
    elif brokers is not None and brokers != state.brokers:
        _set_brokers(root, state, brokers)
        _save_state(root, state)
        _say(f"kafka will be formatted afresh as {brokers} node(s)")
    if quick_jvm is not None and quick_jvm != state.quick_jvm:
        state.quick_jvm = quick_jvm
        _save_state(root, state)
    if secure is not None and secure != state.secure:
        _set_brokers(root, state, state.brokers)  # listeners and SCRAM users: a new format
        state.secure = secure
        _save_state(root, state)
    if state.secure:  # the secured stack's hooks: Kafka's CA, certificates, users
        kafka_security.prepare(root, _stack_ca(root))
    libs = kafka_libs(cache)
    # Three JVMs starting at once on a small machine take longer than one; so does a secured
    # node (its quorum and its brokers first meet over TLS).
    slow = state.brokers > 1 or state.secure
    deadline = time.monotonic() + READY_TIMEOUT_S * (2 if slow else 1)
    bootstrap = state.env()["CUTOVER_KAFKA_BOOTSTRAP"]
    _start_kafka_nodes(root, state, libs)
    for name, port, extra in (
        ("legacy", state.legacy_port, _LOGICAL_SETTINGS),
        ("commerce", state.commerce_port, _LOGICAL_SETTINGS),
    ):
        _init_cluster(root, name, port, state.password, extra)
        if secure and not _pg_pid(root, name):
            pg_security.secure_cluster(root / "pg" / name, _stack_ca(root))
            state.ca_cert = str(root / "tls" / "ca.crt")
            _save_state(root, state)
        _start_pg(root, name)
        _wait(f"PostgreSQL {name} on port {port}", lambda p=port: _pg_ready(
            p, state.password, "postgres"), deadline)  # fmt: skip
        _ensure_database(port, state.password, name)
        _say(f"postgresql {name} ready on 127.0.0.1:{port}")
    security = _admin_security(root, state)

    def kafka_ready() -> bool:
        # A node that died (its port taken, a bad config) never answers: say so at once.
        for node, pid in enumerate(state.kafka_pids(), 1):
            if not pid_alive(pid):
                log = kafka_cluster.node_dir(root, node) / "stdout.log"
                raise StackError(f"Kafka node {node} exited during start-up; see {log}")
        return _kafka_ready(bootstrap, state.brokers, security)

    _wait(f"Kafka on {bootstrap}", kafka_ready, deadline)
    if state.secure:
        kafka_security.grant(root, bootstrap)
    if registry:
        from devtools import registry_stack

        registry_stack.start(root, cache)
    if prometheus:
        from devtools import prometheus_stack

        prometheus_stack.start(root)
    env_path = write_env(root, state)
    _say(f"ready in {time.monotonic() - t0:.1f} s; environment in {env_path}")
    return state


def down(root: Path) -> list[str]:
    """Stop everything ``up`` started in ``root``; return what was stopped."""
    from devtools import prometheus_stack, registry_stack

    stopped: list[str] = []
    for what in (registry_stack.stop(root), prometheus_stack.stop(root)):
        if what is not None:
            stopped.append(what)
    state = load_state(root)
    alive = [p for p in (state.kafka_pids() if state else []) if p is not None and pid_alive(p)]
    stop_pids(alive)
    stopped += [f"kafka (pid {pid})" for pid in alive]
    for name in ("legacy", "commerce"):
        pid = _pg_pid(root, name)
        if pid:
            done = _pg_ctl(root, name, "-m", "fast", "-w", "-t", "60", "stop")
            if done.returncode != 0 and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            stopped.append(f"postgresql {name} (pid {pid})")
    left = running_pids(root)
    if left:
        raise StackError(f"processes still running after stop: {left}")
    (root / "env").unlink(missing_ok=True)
    return stopped


def running_pids(root: Path) -> list[int]:
    """Pids of processes whose command line mentions the stack folder (none after ``down``)."""
    marker = str(root.resolve()).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stack",
        description="Start, stop or inspect the local stack (Kafka KRaft + legacy and commerce "
        "PostgreSQL 15 clusters) as plain processes on 127.0.0.1.",
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--registry", action="store_true", help="up: start the schema registry too")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="up: PostgreSQL over TLS only (sslmode=verify-full); Kafka with TLS, SASL/SCRAM "
        "users and ACLs",
    )
    parser.add_argument("--prometheus", action="store_true", help="up: start Prometheus too")
    parser.add_argument("--dir", type=Path, default=REPO / ".stack", help="stack folder")
    parser.add_argument(
        "--cache", type=Path, default=REPO / ".stack-cache", help="Kafka jar cache folder"
    )
    parser.add_argument(
        "--brokers",
        type=int,
        choices=kafka_cluster.SIZES,
        help="Kafka nodes: 1, or a KRaft quorum of 3 (default: the stack's own size, 1 if new)",
    )
    args = parser.parse_args(argv)
    root: Path = args.dir.resolve()
    try:
        if args.action == "up":
            secure = True if args.secure else None
            up(root, args.cache.resolve(), args.brokers, registry=args.registry,
               secure=secure, prometheus=args.prometheus)  # fmt: skip
        elif args.action == "down":
            stopped = down(root)
            _say("stopped " + (", ".join(stopped) if stopped else "nothing (was not running)"))
        else:
            state = load_state(root)
            pids = running_pids(root)
            print(json.dumps({"running_pids": pids, "env": str(root / "env"),
                              "ports": None if state is None else {
                                  "kafka": state.kafka_port,
                                  "kafka_brokers": [b for b, _ in state.node_ports()],
                                  "legacy": state.legacy_port,
                                  "commerce": state.commerce_port}}, indent=2))  # fmt: skip
    except CutoverError as exc:
        print(f"stack {args.action}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
