"""Helpers for the end-to-end fault matrix (tests/integration/test_faults_e2e.py).

* :class:`PrivateStack`: a Kafka + legacy + commerce stack of its own (``devtools.stack``), for
  the tests that kill a server, so that the shared stack other tests use is never disturbed.
* :class:`Pipeline`: one producer and N apply consumers of a :class:`~devtools.harness.Scenario`
  run as real ``cutover`` processes whose output goes to files; restart what died, stop all.
* Canaries: values written to the excluded (social) columns of ``shop.users``, and a scanner
  proving they reached no topic byte, no commerce table and no log file.
* :class:`Traffic`: the workload in a background thread.
* :func:`start_cli` / :func:`cli_processes` / :func:`log_events`: single ``cutover`` processes
  of a scenario (logs in its workdir), stopped at the end whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from devtools import procs, stack
from devtools.harness import Scenario, init, open_scenario, stop
from devtools.scratch import scratch_database
from devtools.workload import WorkloadReport, prefill, run_workload
from tests.integration.conftest import EXAMPLES
from tests.integration.shop_compare import assert_commerce_matches_legacy, compare

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".stack-cache"
PG_BIN = Path("/usr/lib/postgresql/15/bin")

#: Written into users.handle and users.bio (excluded columns): must appear nowhere downstream.
CANARY_TEXT = "canary-social-5e8b27d1"
#: Written into users.follower_count (an int column): distinctive, must appear nowhere either.
CANARY_FOLLOWERS = 918_273_645


# --------------------------------------------------------------------------- waiting


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def db_up(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def wait_equal(
    legacy: str, commerce: str, timeout: float, legacy_renames: Mapping[str, str] | None = None
) -> float:
    """Wait until the independent comparison finds no difference; seconds it took. On timeout
    fails with the differences."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        try:
            if all(d.ok for d in compare(legacy, commerce, legacy_renames)):
                return time.monotonic() - t0
        except psycopg.OperationalError:
            pass  # a server restarting
        time.sleep(1.0)
    assert_commerce_matches_legacy(legacy, commerce, legacy_renames)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- single processes


def start_cli(
    scenario: Scenario, name: str, *args: str, crash_at: str | None = None
) -> subprocess.Popen[bytes]:
    """``cutover --log-json ARGS`` of ``scenario``, its output in ``<workdir>/<name>.log``."""
    log = (scenario.workdir / f"{name}.log").open("ab")
    env = scenario.env({"CUTOVER_CRASH_AT": crash_at} if crash_at else None)
    return subprocess.Popen(
        [sys.executable, "-m", "cli.entry", "--config", str(scenario.config), "--log-json", *args],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip


@contextlib.contextmanager
def cli_processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """A name -> process dict whose processes still running at the end are stopped."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                stop(proc)


def log_events(scenario: Scenario, name: str, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of process ``name`` (only those of ``event`` when given)."""
    path = scenario.workdir / f"{name}.log"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]
    return [e for e in lines if event is None or e.get("event") == event]


# --------------------------------------------------------------------------- private stack


@dataclass
class PrivateStack:
    """A stack in a folder of its own; servers can be killed and restarted."""

    root: Path
    cache: Path = CACHE

    def up(self) -> stack.StackState:
        return stack.up(self.root, self.cache, quick_jvm=True)

    def down(self) -> None:
        stack.down(self.root)

    @property
    def state(self) -> stack.StackState:
        state = stack.load_state(self.root)
        assert state is not None, f"no stack state in {self.root}"
        return state

    def env(self) -> dict[str, str]:
        return self.state.env()

    # Kafka ------------------------------------------------------------------------------

    def kill_kafka(self) -> int:
        """SIGKILL the broker (the JVM); returns its pid once it is gone."""
        pid = self.state.kafka_pid
        assert pid is not None and procs.pid_alive(pid), "Kafka is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while procs.pid_alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our child when started in-process: reap it
            assert time.monotonic() < deadline, f"Kafka pid {pid} survived SIGKILL"
            time.sleep(0.1)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return pid

    def kafka_alive(self) -> bool:
        return procs.pid_alive(self.state.kafka_pid)

    # PostgreSQL --------------------------------------------------------------------------

    def _pg_ctl(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.root / "pg" / name), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def pg_immediate_stop(self, name: str) -> None:
        done = self._pg_ctl(name, "-m", "immediate", "stop")
        assert done.returncode == 0, done.stderr

    def pg_start(self, name: str) -> None:
        if stack._pg_pid(self.root, name):
            return
        log = self.root / "pg" / f"{name}.log"
        done = self._pg_ctl(name, "-l", str(log), "-w", "-t", "60", "start")
        assert done.returncode == 0 or stack._pg_pid(self.root, name), done.stderr

    def restore(self) -> None:
        """Everything running again (used in ``finally``)."""
        for name in ("legacy", "commerce"):
            self.pg_start(name)
        self.up()


@contextlib.contextmanager
def private_stack() -> Iterator[PrivateStack]:
    """Start a private stack in a world-searchable temporary folder; always stop it."""
    base = Path(tempfile.mkdtemp(prefix="cutover-faults-"))
    base.chmod(0o755)
    ps = PrivateStack(base / "stack")
    try:
        ps.up()
        yield ps
    finally:
        try:
            ps.down()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def fresh_databases(ps: PrivateStack) -> Iterator[tuple[str, str]]:
    """(legacy DSN, commerce DSN): new databases with the shop schemas on the private stack."""
    env = ps.env()
    legacy = contextlib.contextmanager(scratch_database)
    commerce = contextlib.contextmanager(scratch_database)
    with (
        legacy(env["CUTOVER_SOURCE_DSN"], EXAMPLES / "legacy.sql", "legacy") as src,
        commerce(env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "commerce") as dst,
    ):
        yield src, dst


# --------------------------------------------------------------------------- processes


@dataclass
class Pipeline:
    """``cutover produce`` and ``cutover apply`` processes of one scenario, output to files."""

    scenario: Scenario
    group: str
    apply_args: Sequence[str] = ()
    producer: subprocess.Popen[bytes] | None = None
    appliers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: (process name, exit code) of every process that ended, in order.
    exits: list[tuple[str, int]] = field(default_factory=list)

    @property
    def workdir(self) -> Path:
        return self.scenario.workdir

    def apply_log(self, name: str) -> Path:
        return self.workdir / f"apply-{self.scenario.tag}-{name}.log"

    def start_producer(self, extra_env: Mapping[str, str] | None = None) -> None:
        self.producer = self.scenario.start_produce(extra_env=extra_env)

    def start_apply(self, name: str, extra_env: Mapping[str, str] | None = None) -> None:
        self.scenario.write_config()
        with self.apply_log(name).open("ab") as log:
            self.appliers[name] = subprocess.Popen(
                [
                    sys.executable, "-m", "cli.entry", "--config", str(self.scenario.config),
                    "--log-json", "apply", "--group-id", self.group, *self.apply_args,
                ],
                env=self.scenario.env(extra_env), stdout=log, stderr=log,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def start(self, consumers: int = 2) -> None:
        self.start_producer()
        for i in range(consumers):
            self.start_apply(f"c{i}")

    def producer_code(self) -> int | None:
        return None if self.producer is None else self.producer.poll()

    def dead_appliers(self) -> dict[str, int]:
        return {n: code for n, p in self.appliers.items() if (code := p.poll()) is not None}

    def reap_producer(self) -> int | None:
        """The producer's exit code if it ended (recorded, and the handle dropped)."""
        if self.producer is None:
            return None
        code = self.producer.poll()
        if code is not None:
            self.exits.append(("produce", code))
            self.producer = None
        return code

    def revive(self) -> list[tuple[str, int]]:
        """Restart every process that exited; returns (name, exit code) of those restarted."""
        restarted = []
        code = self.reap_producer()
        if code is not None:
            restarted.append(("produce", code))
            self.start_producer()
        for name, code in self.dead_appliers().items():
            self.exits.append((name, code))
            restarted.append((name, code))
            self.start_apply(name)
        return restarted

    def kill_apply(self, name: str) -> None:
        proc = self.appliers[name]
        proc.kill()
        proc.wait(timeout=30)
        self.exits.append((name, -9))

    def kill_producer(self) -> None:
        assert self.producer is not None
        self.producer.kill()
        self.producer.wait(timeout=30)
        self.exits.append(("produce", -9))
        self.producer = None

    def stop_all(self, timeout: float = 60) -> dict[str, int]:
        """SIGTERM everything still running; the exit codes (killed after ``timeout``)."""
        procs = dict(self.appliers)
        if self.producer is not None:
            procs["produce"] = self.producer
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in procs.items():
            try:
                codes[name] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
                codes[name] = -999  # did not stop on SIGTERM
        self.appliers.clear()
        self.producer = None
        return codes

    def log_paths(self) -> list[Path]:
        paths = [self.scenario.log_path, *(self.apply_log(n) for n in self.appliers)]
        paths += sorted(self.workdir.glob(f"apply-{self.scenario.tag}-*.log"))
        return sorted({p for p in paths if p.exists()})

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.log_paths())

    def producer_log(self) -> str:
        path = self.scenario.log_path
        return path.read_text(errors="replace") if path.exists() else ""


# --------------------------------------------------------------------------- pipeline

ORDERS = 800  # prefill: ~800 orders with lines, payments, invoices; users, merchants, products


@contextlib.contextmanager
def running_pipeline(
    legacy: str,
    commerce: str,
    bootstrap: str,
    workdir: Path,
    *,
    apply_args: tuple[str, ...] = (),
    orders: int = ORDERS,
    **scenario_kwargs: object,
) -> Iterator[Pipeline]:
    """Prefill (with canaries, so the snapshot path is exercised), init, start the producer and
    two consumers; stop whatever still runs at the end."""
    prefill(legacy, orders=orders, seed=11)
    assert write_canaries(legacy) > 0
    with open_scenario(
        legacy, commerce, bootstrap, workdir, partitions=3, **scenario_kwargs
    ) as scenario:
        init(scenario)
        pipe = Pipeline(scenario, group=f"faults-{scenario.tag}", apply_args=apply_args)
        pipe.start(consumers=2)
        try:
            yield pipe
        finally:
            pipe.stop_all()


# --------------------------------------------------------------------------- traffic


class Traffic:
    """:func:`run_workload` in a background thread; errors kept for the test to judge."""

    def __init__(self, dsn: str, *, rate: float, duration: float, seed: int) -> None:
        self.errors: list[BaseException] = []
        self.report: WorkloadReport | None = None
        self._thread = threading.Thread(
            target=self._run, args=(dsn, rate, duration, seed), daemon=True
        )
        self._thread.start()

    def _run(self, dsn: str, rate: float, duration: float, seed: int) -> None:
        try:
            self.report = run_workload(dsn, rate=rate, duration=duration, seed=seed)
        except BaseException as exc:  # surfaced by join()
            self.errors.append(exc)

    def join(self, timeout: float = 180) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the workload did not finish"


# --------------------------------------------------------------------------- canaries


def write_canaries(legacy_dsn: str, users: int = 5) -> int:
    """Write the canaries into the excluded columns of some users; how many rows took them."""
    with psycopg.connect(legacy_dsn, autocommit=True) as conn:
        cur = conn.execute(
            "UPDATE shop.users SET bio = %s || ' ' || id, handle = handle || %s,"
            " follower_count = %s"
            " WHERE id IN (SELECT id FROM shop.users WHERE handle NOT LIKE %s"
            " ORDER BY random() LIMIT %s)",
            (CANARY_TEXT, CANARY_TEXT, CANARY_FOLLOWERS, f"%{CANARY_TEXT}%", users),
        )
        return cur.rowcount


def canary_rows_in_legacy(legacy_dsn: str) -> int:
    """Users holding a canary in at least one excluded column (the workload overwrites some)."""
    with psycopg.connect(legacy_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM shop.users"
            " WHERE handle LIKE %s OR bio LIKE %s OR follower_count = %s",
            (f"%{CANARY_TEXT}%", f"%{CANARY_TEXT}%", CANARY_FOLLOWERS),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _zigzag_varint(n: int) -> bytes:
    """Avro's encoding of an int/long: what the number would look like inside an event."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        byte = z & 0x7F
        z >>= 7
        if z:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def dump_database(dsn: str) -> str:
    """Every row of every user table of the database, as text (one line per row)."""
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE'"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        lines = []
        for schema, table in tables:
            query = sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(schema, table))
            lines += [f"{schema}.{table}: {r[0]}" for r in conn.execute(query)]
    return "\n".join(lines)


def assert_no_canary(
    scenario: Scenario, commerce_dsn: str, log_paths: Sequence[Path], *, expect_written: int = 1
) -> dict[str, Any]:
    """The canaries are in the legacy DB (so the check can fail), and in no topic byte, no
    commerce table and no log file. Returns what was scanned."""
    written = canary_rows_in_legacy(scenario.source_dsn)
    assert written >= expect_written, f"only {written} canary rows in legacy: the check is void"
    needles = [CANARY_TEXT.encode(), b"follower_count", _zigzag_varint(CANARY_FOLLOWERS)]
    raw = scenario.raw_values()
    assert raw, "no message in any topic: nothing was scanned"
    hits = [n for n in needles for m in raw if n in m]
    assert not hits, f"excluded-column canary found in topic bytes: {sorted(set(hits))}"
    dump = dump_database(commerce_dsn)
    assert dump, "the commerce database is empty: nothing was scanned"
    for needle in (CANARY_TEXT, str(CANARY_FOLLOWERS)):
        found = [line for line in dump.splitlines() if needle in line]
        assert not found, f"canary {needle!r} in the commerce DB: {found[:3]}"
    for path in log_paths:
        text = path.read_text(errors="replace")
        for needle in (CANARY_TEXT, str(CANARY_FOLLOWERS)):
            assert needle not in text, f"canary {needle!r} in log {path}"
    return {"messages": len(raw), "commerce_rows": dump.count("\n") + 1, "logs": len(log_paths)}


def assert_no_rollback_marker(scenario: Scenario, commerce_dsn: str, marker: str) -> None:
    """Rolled-back source transactions reached neither a topic nor the commerce DB."""
    needle = marker.encode()
    assert not any(needle in m for m in scenario.raw_values()), f"{marker} in topic bytes"
    found = [line for line in dump_database(commerce_dsn).splitlines() if marker in line]
    assert not found, f"{marker} in the commerce DB: {found[:3]}"


def rolled_back_transactions(report: WorkloadReport | None) -> int:
    """How many rolled-back transactions the workload ran."""
    return 0 if report is None else report.rolled_back
