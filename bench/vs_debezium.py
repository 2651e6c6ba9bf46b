"""`cutover produce` against Debezium's PostgreSQL connector, same stack, same WAL backlog.

Run with the local stack up (``make up``; Java 17 and Maven on PATH)::

    .venv/bin/python -m bench.vs_debezium [N] [--workload-transactions T] [--only KIND]
    make bench-vs-debezium [N=1000000]

Method (see /work/shared/notes/debezium-bench.md for why each step is there):

* Debezium 3.6.1.Final's PostgreSQL connector on Kafka Connect 4.1.1 standalone, fetched from
  Maven Central with ``bench/debezium/pom.xml`` into ``.stack-cache/debezium-libs`` (first run);
* two backlogs, each on its own scratch databases, one after the other: ``synthetic``, ``N``
  changes of one narrow table (10 per transaction, bench/producer_throughput.py), and
  ``workload``, ``T`` transactions of the shop workload (devtools.workload: timestamptz, numeric,
  text; about 3.5 changes each) written after a small prefill;
* each tool reads its OWN slot, both created (pgoutput, the same publication) BEFORE the backlog
  is written, so both decode the identical WAL; Debezium with ``snapshot.mode=no_data`` streams
  from its slot;
* the tools run one after the other; every topic has ``message.timestamp.type=LogAppendTime``:
  a tool's time is from its slot becoming active to the broker's append time of its last record,
  its records are counted by reading every one back; the rate over the second half of the
  records is given too (the JVM's JIT warm-up weighs on Debezium's first half);
* RSS (peak) and CPU of each tool's process, and the CPU of the PostgreSQL backends serving it
  (its sessions and walsender, autovacuum left out; sampled from /proc while it runs).

Prints ``RATIO cutover/debezium = X (A ev/s, B ev/s, N=..., backlog)`` per backlog and a table;
writes ``bench/results/vs_debezium.json`` and ``bench/results/vs_debezium.md``. Not part of
``make test``; the pure parts are unit-tested (tests/unit/test_bench_vs_debezium.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
POM = REPO / "bench" / "debezium" / "pom.xml"
CACHE = REPO / ".stack-cache"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ------------------------------------------------------------------------------ pure parts


@dataclass
class Count:
    """Records of one tool read back: how many, and the first/last broker append time (ms)."""

    records: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    stamps: list[int] = field(default_factory=list)

    def add(self, append_ms: int) -> None:
        self.records += 1
        self.first_ms = append_ms if self.first_ms is None else min(self.first_ms, append_ms)
        self.last_ms = append_ms if self.last_ms is None else max(self.last_ms, append_ms)
        self.stamps.append(append_ms)

    def second_half_rate(self) -> float:
        """Events/s over the second half of the records, by append time (no warm-up in it)."""
        if self.records < 2:
            return 0.0
        ordered = sorted(self.stamps)
        half = self.records // 2
        return rate(self.records - half, ordered[half - 1], ordered[-1])


def count_records(timestamps: Iterable[tuple[int, int]]) -> Count:
    """Count records from ``(timestamp type, ms)`` pairs; only LogAppendTime (type 2) counts.

    A record with a producer's CreateTime would measure the client, not the broker: refused.
    """
    out = Count()
    for kind, ms in timestamps:
        if kind != 2:
            raise ValueError(f"record timestamp type {kind} is not LogAppendTime (2)")
        out.add(ms)
    return out


def rate(records: int, start_ms: int, last_ms: int | None) -> float:
    """Events/s from the tool's start to the broker's append of its last record."""
    if not records or last_ms is None or last_ms <= start_ms:
        return 0.0
    return records / ((last_ms - start_ms) / 1000.0)


def ratio_line(ours: float, theirs: float, n: int, backlog: str | None = None) -> str:
    """The summary line: ``RATIO cutover/debezium = X (A ev/s, B ev/s, N=...[, backlog])``."""
    ratio = f"{ours / theirs:.2f}" if theirs > 0 else "inf"
    label = f", {backlog}" if backlog else ""
    return (
        f"RATIO cutover/debezium = {ratio} ({ours:,.0f} ev/s, {theirs:,.0f} ev/s, N={n:,}{label})"
    )


@dataclass
class Usage:
    """CPU seconds and peak RSS of a process tree, from /proc samples."""

    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    _cpu: dict[int, float] = field(default_factory=dict)

    def sample(self, pids: Iterable[int]) -> None:
        for pid in pids:
            cpu, rss = _proc_sample(pid)
            if cpu is not None:
                self._cpu[pid] = cpu
            self.peak_rss_mb = max(self.peak_rss_mb, rss)
        self.cpu_s = sum(self._cpu.values())


def _proc_sample(pid: int) -> tuple[float | None, float]:
    """(utime+stime in s, RSS high-water mark in MB) of a live process; (None, 0) if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        rss = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
        return cpu, rss
    except (OSError, IndexError, ValueError):
        return None, 0.0


def markdown(result: dict[str, Any]) -> str:
    """The RATIO lines, then one table row per backlog and tool, then the settings."""
    runs = result["backlogs"]
    rows = [
        "| backlog | tool | events | ev/s | ev/s, 2nd half | RSS peak MB | CPU s "
        "| CPU µs/event | PostgreSQL CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, run in runs.items():
        for name in ("cutover", "debezium"):
            r = run[name]
            per_event = r["cpu_s"] / r["records"] * 1e6 if r["records"] else 0.0
            rows.append(
                f"| {kind} | {name} | {r['records']:,} | {r['events_per_s']:,.0f} "
                f"| {r.get('second_half_events_per_s', 0):,.0f} | {r['rss_mb']:.0f} "
                f"| {r['cpu_s']:.1f} | {per_event:.0f} | {r['pg_cpu_s']:.1f} |"
            )
    ratios = [run["ratio"] for run in runs.values()]
    return "\n".join([*ratios, "", *rows, "", f"settings: {result['settings']}"])


# ------------------------------------------------------------------------------ running


def debezium_libs() -> Path:
    """The folder of Debezium + Kafka Connect jars, fetched with Maven on first use."""
    libs = CACHE / "debezium-libs"
    if (libs / ".complete").exists():
        return libs
    tmp = libs.with_name("debezium-libs.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
         f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"],
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit("mvn could not fetch the Debezium jars (see its output above)")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    (libs / ".complete").touch()
    return libs


def _properties(values: dict[str, Any]) -> str:
    return "".join(f"{k}={v}\n" for k, v in values.items())


def _published(conn: Any, publication: str) -> tuple[list[str], list[str]]:
    """Tables of the publication and the columns its column lists leave out (for Debezium)."""
    rows = conn.execute(
        "SELECT p.schemaname || '.' || p.tablename, c.column_name"
        " FROM pg_publication_tables p JOIN information_schema.columns c"
        "   ON c.table_schema = p.schemaname AND c.table_name = p.tablename"
        " WHERE p.pubname = %s AND NOT c.column_name::name = ANY (p.attnames)",
        (publication,),
    ).fetchall()
    tables = [r[0] for r in conn.execute(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
        (publication,),
    ).fetchall()]  # fmt: skip
    return sorted(tables), sorted(f"{t}.{c}" for t, c in rows)


def _create_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    """Topics with the broker's append time; existing ones switched to it."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    conf = {"message.timestamp.type": "LogAppendTime"}
    new = [NewTopic(t, partitions, 1, config=conf) for t in topics]
    for topic, fut in admin.create_topics(new).items():
        try:
            fut.result(30)
        except Exception:
            entry = ConfigEntry(
                "message.timestamp.type", "LogAppendTime",
                incremental_operation=AlterConfigOpType.SET,
            )  # fmt: skip
            res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
            for altered in admin.incremental_alter_configs([res]).values():
                altered.result(30)


def _drop_topics(bootstrap: str, topics: list[str]) -> None:
    from confluent_kafka.admin import AdminClient

    for fut in AdminClient({"bootstrap.servers": bootstrap}).delete_topics(topics).values():
        with contextlib.suppress(Exception):  # never created: nothing to drop
            fut.result(30)


def _read_back(bootstrap: str, topics: list[str]) -> Count:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "vs-debezium",
                         "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
    parts = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=15).topics[topic]
        for p in meta.partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            if hi > lo:
                parts.append(TopicPartition(topic, p, lo))
    consumer.assign(parts)
    left = len(parts)

    def stamps() -> Iterable[tuple[int, int]]:
        nonlocal left
        while left:
            for msg in consumer.consume(10_000, 1.0):
                if msg.error() is not None:
                    left -= 1  # partition EOF
                    continue
                if ("cutover.kind", b"heartbeat") in (msg.headers() or ()):
                    continue  # our idle heartbeats are not changes
                yield msg.timestamp()

    try:
        return count_records(stamps())
    finally:
        consumer.close()


def _watch(tool: subprocess.Popen[bytes], dsn: str, slot: str,
           done: Callable[[], bool]) -> tuple[Usage, Usage, int]:  # fmt: skip
    """Sample the tool and the backends of its database until ``done``; slot first active ms."""
    import psycopg

    ours, pg = Usage(), Usage()
    first_active = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        me = conn.info.backend_pid
        while tool.poll() is None and not done():
            # The tool's own sessions (its walsender included), not autovacuum: the backlog was
            # just written, so autovacuum works during whichever tool runs first (cutover),
            # which charged it ~0.7 s per 1M changes that serve neither tool.
            pids = [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> %s AND backend_type IN ('client backend', 'walsender')",
                (me,)).fetchall()]  # fmt: skip
            pg.sample(pids)
            ours.sample([tool.pid])
            if not first_active and conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone() == (True,):
                first_active = time.time_ns() // 1_000_000
            time.sleep(0.1)
    return ours, pg, first_active


def _summary(count: Count, started_ms: int, usage: Usage, pg: Usage) -> dict[str, Any]:
    start = min(x for x in (started_ms, count.first_ms or started_ms) if x)
    return {
        "records": count.records,
        "events_per_s": round(rate(count.records, start, count.last_ms)),
        "second_half_events_per_s": round(count.second_half_rate()),
        "rss_mb": round(usage.peak_rss_mb, 1),
        "cpu_s": round(usage.cpu_s, 2),
        "pg_cpu_s": round(pg.cpu_s, 2),
    }


def _run_cutover(sc: Any, env: dict[str, str], topics: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "cli.entry", "--config", str(sc.write_config()), "produce",
           "--exit-when-idle", "--no-initial-snapshot"]  # fmt: skip
    log = (sc.workdir / "produce.log").open("ab")
    started = time.time_ns() // 1_000_000
    tool = subprocess.Popen(cmd, env=sc.env(), stdout=log, stderr=log)
    usage, pg, active = _watch(tool, sc.source_dsn, sc.slot, lambda: False)
    if tool.wait() != 0:
        raise SystemExit(f"cutover produce exited {tool.returncode}: see {sc.workdir}")
    count = _read_back(sc.bootstrap, topics)
    return _summary(count, active or started, usage, pg)


def _run_debezium(
    sc: Any, libs: Path, slot: str, published: tuple[list[str], list[str]], expected: int
) -> dict[str, Any]:
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from psycopg import conninfo

    tables, excluded = published
    prefix = f"dbz{sc.tag}"
    topics = [f"{prefix}.{t}" for t in tables]
    _create_topics(sc.bootstrap, topics, sc.partitions)
    db = conninfo.conninfo_to_dict(sc.source_dsn)
    worker = sc.workdir / "worker.properties"
    worker.write_text(_properties(DEBEZIUM_WORKER | {
        "bootstrap.servers": sc.bootstrap,
        "offset.storage.file.filename": sc.workdir / "dbz.offsets",
    }))  # fmt: skip
    connector = sc.workdir / "connector.properties"
    connector.write_text(_properties(DEBEZIUM_CONNECTOR | {
        "database.hostname": db.get("host", "127.0.0.1"), "database.port": db.get("port", 5432),
        "database.user": db.get("user", ""), "database.password": db.get("password", ""),
        "database.dbname": db["dbname"], "topic.prefix": prefix, "slot.name": slot,
        "publication.name": sc.publication, "table.include.list": ",".join(tables),
        "column.exclude.list": ",".join(excluded),
    }))  # fmt: skip
    probe = Consumer({"bootstrap.servers": sc.bootstrap, "group.id": "vs-debezium-probe"})

    def appended() -> int:
        try:
            return sum(probe.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                       for t in topics for p in range(sc.partitions))  # fmt: skip
        except KafkaException:  # a new topic's leader not elected yet: ask again later
            return 0

    last_probe = [0.0, 0]

    def done() -> bool:  # probe the broker at most twice a second
        if time.monotonic() - last_probe[0] > 0.5:
            last_probe[:] = [time.monotonic(), appended()]
        return last_probe[1] >= expected

    log = (sc.workdir / "debezium.log").open("ab")
    log4j = sc.workdir / "log4j2.properties"
    log4j.write_text(LOG4J2)
    started = time.time_ns() // 1_000_000
    tool = subprocess.Popen(
        ["java", "-Xms256M", "-Xmx2G", f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*",
         "org.apache.kafka.connect.cli.ConnectStandalone", str(worker), str(connector)],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        usage, pg, active = _watch(tool, sc.source_dsn, slot, done)
        if tool.poll() is not None:
            raise SystemExit(f"Debezium exited {tool.returncode}: see {sc.workdir}/debezium.log")
    finally:
        tool.terminate()
        tool.wait(60)
        probe.close()
    count = _read_back(sc.bootstrap, topics)
    return _summary(count, active or started, usage, pg)


# Warnings and errors to the tool's log (Log4j 2's default would print errors only).
LOG4J2 = """\
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = %d %p %c{1} %m%n
"""
DEBEZIUM_WORKER: dict[str, Any] = {
    "key.converter": "org.apache.kafka.connect.json.JsonConverter",
    "value.converter": "org.apache.kafka.connect.json.JsonConverter",
    "key.converter.schemas.enable": "false",
    "value.converter.schemas.enable": "false",
    "offset.flush.interval.ms": 10_000,
    # Plugins from their ServiceLoader manifests: the reflective scan takes minutes under load.
    "plugin.discovery": "service_load",
    "producer.linger.ms": 50,
    "producer.batch.size": 1_048_576,
}
DEBEZIUM_CONNECTOR: dict[str, Any] = {
    "name": "vs-debezium",
    "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
    "plugin.name": "pgoutput",
    "publication.autocreate.mode": "disabled",
    "snapshot.mode": "no_data",
    "tombstones.on.delete": "false",
    "max.batch.size": 20_480,
    "max.queue.size": 81_920,
    "poll.interval.ms": 100,
}


SETTINGS = (
    "cutover: defaults (read_mode stream, linger.ms 100, lz4, Avro); Debezium 3.6.1 on Connect "
    "4.1.1 standalone: JSON schemas off, max.batch.size 20,480, max.queue.size 81,920, poll "
    "100 ms, linger 50 ms, batch.size 1 MB, -Xmx2G"
)


def _compare(
    sc: Any, libs: Path, env: dict[str, str], write: Callable[[], object]
) -> dict[str, Any]:
    """Both tools over one backlog: slots first, then ``write()``, then each tool in turn."""
    import psycopg

    slot = f"dbz_{sc.tag}"
    with psycopg.connect(sc.source_dsn, autocommit=True) as conn:
        # Both slots exist before the backlog is written: both decode the same WAL.
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        published = _published(conn, sc.publication)
    try:
        _create_topics(sc.bootstrap, sc.topics(), sc.partitions)
        write()
        load = round(os.getloadavg()[0], 1)
        ours = _run_cutover(sc, env, sc.topics())
        theirs = _run_debezium(sc, libs, slot, published, ours["records"])
    finally:
        with psycopg.connect(sc.source_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        _drop_topics(sc.bootstrap, [f"dbz{sc.tag}.{t}" for t in published[0]])
    return {"load_1m_at_start": load, "cutover": ours, "debezium": theirs}


def run_synthetic(libs: Path, env: dict[str, str], n: int) -> dict[str, Any]:
    """``n`` changes of one narrow table, 10 per transaction."""
    from bench.producer_throughput import pipeline, write_backlog

    workdir = Path(tempfile.mkdtemp(prefix="bench-vs-debezium-"))
    with pipeline(env, workdir) as sc:
        out = _compare(sc, libs, env, lambda: write_backlog(sc.source_dsn, n))
    return {"n_changes": n} | out


def run_workload_backlog(libs: Path, env: dict[str, str], transactions: int) -> dict[str, Any]:
    """``transactions`` of the shop workload, after a prefill that neither tool reads."""
    from bench.producer_throughput import scratch
    from devtools import harness
    from devtools.workload import prefill, run_workload

    shop = REPO / "examples" / "shop"
    workdir = Path(tempfile.mkdtemp(prefix="bench-vs-debezium-"))
    with (
        scratch(env["CUTOVER_SOURCE_DSN"], shop / "legacy.sql", "benchlegacy") as source,
        scratch(env["CUTOVER_TARGET_DSN"], None, "benchcommerce") as target,
    ):
        prefill(source, orders=20_000, seed=11)  # before the slots: not part of the backlog
        with harness.open_scenario(source, target, env["CUTOVER_KAFKA_BOOTSTRAP"], workdir) as sc:
            harness.init(sc)

            def write() -> None:
                run_workload(source, rate=1_000_000, max_transactions=transactions, seed=12)

            out = _compare(sc, libs, env, write)
    return {"n_transactions": transactions, "n_changes": out["cutover"]["records"]} | out


def run(n: int, transactions: int, only: str | None = None) -> dict[str, Any]:
    from bench.producer_throughput import stack_env

    libs = debezium_libs()
    env = stack_env()
    backlogs: dict[str, dict[str, Any]] = {}
    if only in (None, "synthetic"):
        backlogs["synthetic"] = run_synthetic(libs, env, n)
    if only in (None, "workload"):
        backlogs["workload"] = run_workload_backlog(libs, env, transactions)
    for kind, result in backlogs.items():
        ours, theirs = result["cutover"], result["debezium"]
        result["ratio"] = ratio_line(
            ours["events_per_s"], theirs["events_per_s"], result["n_changes"], kind
        )
        result["ratio_second_half"] = round(
            ours["second_half_events_per_s"] / max(1, theirs["second_half_events_per_s"]), 2
        )
    return {
        "benchmark": "vs_debezium",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 1)},
        "backlogs": backlogs,
        "settings": SETTINGS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=1_000_000, help="synthetic changes")
    parser.add_argument(
        "--workload-transactions", type=int, default=125_000,
        help="shop workload transactions of the second backlog (125,000 ≈ 310,000 changes)",
    )  # fmt: skip
    parser.add_argument("--only", choices=("synthetic", "workload"), help="run one backlog")
    args = parser.parse_args()
    result = run(args.n, args.workload_transactions, args.only)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vs_debezium.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "vs_debezium.md").write_text(markdown(result) + "\n")
    print(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
