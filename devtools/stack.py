"""The local stack: Apache Kafka (KRaft, one combined node) and two PostgreSQL 15 clusters, run as
plain processes on 127.0.0.1 (no Docker engine needed). Used by ``make up`` / ``make down``.

``python -m devtools.stack up|down|status [--dir DIR]``

* Kafka comes from the official jars on Maven Central (``stack/pom.xml``), copied with
  ``mvn dependency:copy-dependencies`` into a cache folder shared by all stacks of this checkout
  (``.stack-cache/``), and runs on Java 17 with a capped heap.
* The PostgreSQL clusters are made with Debian's ``postgresql-15`` ``initdb``: ``legacy``
  (``wal_level=logical``) and ``commerce``. They run as a non-root user (``postgres`` when we are
  root, since initdb refuses root), with their sockets inside the stack folder, password
  authentication, and a password generated per stack.
* ``up`` waits until each server really answers (a Kafka metadata request, a SQL query), then
  writes ``<dir>/env`` with the ``CUTOVER_*`` variables. A second ``up`` reuses what runs.
* ``down`` stops everything ``up`` started and checks that no process is left.

The state of a stack (ports, pids, password) lives in ``<dir>/state.json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cutover.errors import CutoverError, PrerequisiteMissing, StackError

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

    def env(self) -> dict[str, str]:
        # URL form: no spaces, so `.stack/env` can be sourced by a shell as it is.
        def dsn(port: int, db: str) -> str:
            return f"postgresql://cutover:{self.password}@127.0.0.1:{port}/{db}"

        return {
            "CUTOVER_SOURCE_DSN": dsn(self.legacy_port, "legacy"),
            "CUTOVER_TARGET_DSN": dsn(self.commerce_port, "commerce"),
            "CUTOVER_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.kafka_port}",
        }


# --------------------------------------------------------------------------- prerequisites


_APT_PACKAGES = {
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "initdb": "postgresql-15",
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): look at its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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


def _start_kafka(state: StackState, root: Path, libs: Path) -> int:
    kdir = root / "kafka"
    kdir.mkdir(parents=True, exist_ok=True)
    props = kdir / "server.properties"
    props.write_text(_kafka_properties(state, kdir / "data"))
    (kdir / "log4j2.properties").write_text(_LOG4J2.format(log=kdir / "server.log"))
    java = [
        "java", *KAFKA_HEAP.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={kdir / 'log4j2.properties'}",
        "-cp", f"{libs}/*",
    ]  # fmt: skip
    if not (kdir / "data" / "meta.properties").exists():
        # Like Kafka's Uuid.randomUuid: never an id starting with "-", which reads as a flag.
        cluster_id = "-"
        while cluster_id.startswith("-"):
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        done = subprocess.run(
            [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
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


def _kafka_ready(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        meta = admin.list_topics(timeout=2)
    except Exception:
        return False
    return bool(meta.brokers)


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
    return pid if _pid_alive(pid) else None


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
            raise StackError(f"{what} did not answer within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.25)


STACK_VARS = ("CUTOVER_SOURCE_DSN", "CUTOVER_TARGET_DSN", "CUTOVER_KAFKA_BOOTSTRAP")


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
                env[key.strip()] = value.strip()
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
    path = root / "env"
    tmp = root / "env.tmp"
    tmp.write_text("".join(f"{k}={v}\n" for k, v in state.env().items()))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def up(root: Path, cache: Path) -> StackState:
    """Start (or reuse) the stack in ``root``; return its state once every server answers."""
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
            kafka_port=_free_port(),
            controller_port=_free_port(),
            legacy_port=_free_port(),
            commerce_port=_free_port(),
            password=secrets.token_urlsafe(18),
        )
        _save_state(root, state)
    libs = kafka_libs(cache)
    deadline = time.monotonic() + READY_TIMEOUT_S
    bootstrap = state.env()["CUTOVER_KAFKA_BOOTSTRAP"]
    if _pid_alive(state.kafka_pid) and _kafka_ready(bootstrap):
        _say(f"kafka already running on {bootstrap} (pid {state.kafka_pid})")
    else:
        if state.kafka_pid is not None and _pid_alive(state.kafka_pid):
            _stop_pid(state.kafka_pid)
        state.kafka_pid = _start_kafka(state, root, libs)
        _save_state(root, state)
        _say(f"kafka starting on {bootstrap} (pid {state.kafka_pid})")
    for name, port, extra in (
        ("legacy", state.legacy_port, _LOGICAL_SETTINGS),
        ("commerce", state.commerce_port, _LOGICAL_SETTINGS),
    ):
        _init_cluster(root, name, port, state.password, extra)
        _start_pg(root, name)
        _wait(f"PostgreSQL {name} on port {port}", lambda p=port: _pg_ready(
            p, state.password, "postgres"), deadline)  # fmt: skip
        _ensure_database(port, state.password, name)
        _say(f"postgresql {name} ready on 127.0.0.1:{port}")
    _wait(f"Kafka on {bootstrap}", lambda: _kafka_ready(bootstrap), deadline)
    if not _pid_alive(state.kafka_pid):
        raise StackError(f"Kafka exited during start-up; see {root / 'kafka' / 'stdout.log'}")
    env_path = write_env(root, state)
    _say(f"ready in {time.monotonic() - t0:.1f} s; environment in {env_path}")
    return state


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        time.sleep(0.2)


def down(root: Path) -> list[str]:
    """Stop everything ``up`` started in ``root``; return what was stopped."""
    stopped: list[str] = []
    state = load_state(root)
    if state and _pid_alive(state.kafka_pid):
        assert state.kafka_pid is not None
        _stop_pid(state.kafka_pid)
        stopped.append(f"kafka (pid {state.kafka_pid})")
    for name in ("legacy", "commerce"):
        pid = _pg_pid(root, name)
        if pid:
            done = _pg_ctl(root, name, "-m", "fast", "-w", "-t", "60", "stop")
            if done.returncode != 0 and _pid_alive(pid):
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
        if marker in cmdline and _pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stack",
        description="Start, stop or inspect the local stack (Kafka KRaft + legacy and commerce "
        "PostgreSQL 15 clusters) as plain processes on 127.0.0.1.",
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=REPO / ".stack", help="stack folder")
    parser.add_argument(
        "--cache", type=Path, default=REPO / ".stack-cache", help="Kafka jar cache folder"
    )
    args = parser.parse_args(argv)
    root: Path = args.dir.resolve()
    try:
        if args.action == "up":
            up(root, args.cache.resolve())
        elif args.action == "down":
            stopped = down(root)
            _say("stopped " + (", ".join(stopped) if stopped else "nothing (was not running)"))
        else:
            state = load_state(root)
            pids = running_pids(root)
            print(json.dumps({"running_pids": pids, "env": str(root / "env"),
                              "ports": None if state is None else {
                                  "kafka": state.kafka_port, "legacy": state.legacy_port,
                                  "commerce": state.commerce_port}}, indent=2))  # fmt: skip
    except CutoverError as exc:
        print(f"stack {args.action}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
