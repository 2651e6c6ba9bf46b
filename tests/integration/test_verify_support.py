"""Helpers for the verify, cutover and routing tests on the real stack (no tests in here).

Commerce is filled from legacy through the mapping by :func:`control.verify.copy_mapped_rows`
(SQL, independent of the apply consumer), and the "pipeline" the gates look at is staged by
hand: topics with a unique prefix, a logical slot, a producer heartbeat row, consumer offsets.
:class:`LaggingConsumer` stands in for the apply consumer under a live workload: it copies a
legacy snapshot into commerce a fixed delay after taking it and records the position the
snapshot holds for in ``cutover.consumer_offsets`` (as the real consumer does per partition).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from psycopg import sql

from control import digest as dg
from control.verify import connect, copy_mapped_rows, current_lsn, target_column_types
from cutover.config import (
    GateSettings,
    KafkaSettings,
    Settings,
    SourceSettings,
    TargetSettings,
)
from cutover.control_store import LEGACY_SCHEMA, ControlStore
from cutover.mapping import MappingSpec, load_mapping
from devtools.harness import Scenario

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "shop"
MAPPING_PATH = EXAMPLES / "mapping.toml"
DOMAINS = tuple(load_mapping(MAPPING_PATH).domains)
PARTITIONS = 3


def mapping() -> MappingSpec:
    return load_mapping(MAPPING_PATH)


def make_settings(
    legacy: str,
    commerce: str,
    bootstrap: str,
    *,
    prefix: str | None = None,
    slot: str | None = None,
    publication: str = "cutover_pub",
    gates: GateSettings | None = None,
) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(
        source=SourceSettings(dsn=legacy, slot=slot or f"vt_slot_{tag}", publication=publication),
        target=TargetSettings(dsn=commerce),
        kafka=KafkaSettings(
            bootstrap=bootstrap, topic_prefix=prefix or f"vt{tag}", partitions=PARTITIONS
        ),
        mapping_path=MAPPING_PATH,
        gates=gates or GateSettings(),
    )


def seed(settings: Settings, *, orders: int = 2000) -> dict[str, int]:
    """Prefill legacy, copy it mapped into commerce, create the consumer's control tables."""
    from devtools import workload

    workload.prefill(settings.source.dsn, orders=orders, seed=5)
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        ControlStore(conn, "cutover").ensure("consumer")
    return copy_mapped_rows(settings.source.dsn, settings.target.dsn, mapping())


def create_topics(settings: Settings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap})
    new = [
        NewTopic(settings.kafka.topic(d), num_partitions=PARTITIONS, replication_factor=1)
        for d in DOMAINS
    ]
    new.append(
        NewTopic(
            settings.kafka.control_topic,
            num_partitions=1,
            replication_factor=1,
            config={"cleanup.policy": "compact"},
        )
    )
    for fut in admin.create_topics(new, operation_timeout=30).values():
        fut.result(timeout=30)


def delete_topics(settings: Settings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka.bootstrap})
    topics = [settings.kafka.topic(d) for d in DOMAINS] + [settings.kafka.control_topic]
    for fut in admin.delete_topics(topics, operation_timeout=30).values():
        with suppress(Exception):
            fut.result(timeout=30)


def stage_pipeline(settings: Settings) -> None:
    """Everything the gates check, healthy: slot, heartbeat, offsets at the end of each topic."""
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [settings.source.slot]
        )
        ControlStore(conn, LEGACY_SCHEMA, "source").ensure("producer")
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(settings.source.publication),
                sql.SQL(", ").join(published_table(name) for name in mapping().tables),
            )
        )
        beat(settings)
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        for d in DOMAINS:
            for p in range(PARTITIONS):
                conn.execute(
                    "INSERT INTO cutover.consumer_offsets (group_id, topic, kafka_partition, "
                    "next_offset, last_source_lsn) VALUES (%s, %s, %s, 0, NULL) "
                    "ON CONFLICT DO NOTHING",
                    [settings.apply.group_id, settings.kafka.topic(d), p],
                )


def published_table(name: str) -> sql.Composed:
    """``shop.name (columns the mapping reads)``: one entry of a publication's table list."""
    cols = sorted(mapping().tables[name].source_columns_used())
    return sql.SQL("{} ({})").format(
        sql.Identifier("shop", name), sql.SQL(", ").join(map(sql.Identifier, cols))
    )


def beat(settings: Settings, age_s: float = 0.0) -> None:
    """Record a producer heartbeat ``age_s`` seconds old (and its delivered position)."""
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO cutover.producer_state (slot_name, publication, delivered_lsn, "
            "producer, heartbeat_at) VALUES (%s, 'pub', 0, 'test', now() - make_interval("
            "secs => %s)) ON CONFLICT (slot_name) DO UPDATE SET heartbeat_at = "
            "EXCLUDED.heartbeat_at",
            [settings.source.slot, age_s],
        )


def drop_slot(settings: Settings) -> None:
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            [settings.source.slot],
        )


def commerce(settings: Settings, query: str, params: list[Any] | None = None) -> list[Any]:
    with psycopg.connect(settings.target.dsn, autocommit=True) as conn:
        cur = conn.execute(query.encode(), params)
        return cur.fetchall() if cur.description else []


def legacy(
    settings: Settings, query: str | sql.Composed, params: list[Any] | None = None
) -> list[Any]:
    with psycopg.connect(settings.source.dsn, autocommit=True) as conn:
        cur = conn.execute(query.encode() if isinstance(query, str) else query, params)
        return cur.fetchall() if cur.description else []


def control_messages(settings: Settings, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every message of the control topic, decoded (JSON values)."""
    import json

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap,
            "group.id": f"t-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(settings.kafka.control_topic, 0, OFFSET_BEGINNING)])
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == -191:  # _PARTITION_EOF
                    break
                continue
            value = msg.value()
            assert value is not None
            out.append(json.loads(value))
    finally:
        consumer.close()
    return out


@contextmanager
def scratch_pair(
    source_admin: str, target_admin: str, bootstrap: str, **kw: Any
) -> Iterator[Settings]:
    """Fresh legacy + commerce databases and topics for a module-scoped fixture."""
    from devtools.scratch import scratch_database
    from tests.integration.conftest import EXAMPLES as EX

    lg = scratch_database(source_admin, EX / "legacy.sql", "legacy")
    cm = scratch_database(target_admin, EX / "commerce.sql", "commerce")
    legacy_dsn = next(lg)
    commerce_dsn = next(cm)
    settings = make_settings(legacy_dsn, commerce_dsn, bootstrap, **kw)
    try:
        yield settings
    finally:
        drop_slot(settings)
        delete_topics(settings)
        for gen in (lg, cm):
            with suppress(StopIteration):
                next(gen)


@contextmanager
def staged_scenario(
    source_admin: str, target_admin: str, bootstrap: str, workdir: Path, *, orders: int
) -> Iterator[tuple[Scenario, Settings]]:
    """A healthy-looking pipeline (seeded shop, topics, slot, heartbeat, offsets; not verified)
    as a :class:`devtools.harness.Scenario` the CLI can be pointed at, and its settings."""
    probe = Scenario("", "", bootstrap, workdir, partitions=PARTITIONS)
    with scratch_pair(
        source_admin,
        target_admin,
        bootstrap,
        prefix=probe.prefix,
        slot=probe.slot,
        publication=probe.publication,
    ) as settings:
        seed(settings, orders=orders)
        create_topics(settings)
        stage_pipeline(settings)
        probe.source_dsn, probe.target_dsn = settings.source.dsn, settings.target.dsn
        yield probe, settings


# ---------------------------------------------------------------------------------------------
# A lagging stand-in for the apply consumer
# ---------------------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    lsn: int
    taken: float
    tables: dict[str, list[str]]  # target table -> COPY text lines (mapped values)


class LaggingConsumer:
    """Copies legacy (mapped) into commerce ``delay_s`` after reading it, repeatedly.

    Each round: read ``L = pg_current_wal_lsn()``, wait a moment (so every transaction that
    committed before ``L`` is visible), take a REPEATABLE READ snapshot of every mapped table as
    COPY text; ``delay_s`` later, replace the commerce rows with it in ONE transaction (a reader
    never sees half of a source transaction) together with ``consumer_offsets.last_source_lsn =
    L`` for every partition: the real consumer's promise ("applied everything up to L"). As with
    the real consumer, a row's ``_src_lsn`` is the position of its last change: ``L`` for rows
    that changed since the previous snapshot, the old position for the others.
    """

    def __init__(
        self,
        settings: Settings,
        delay_s: float = 1.0,
        every_s: float = 0.5,
        *,
        bug_sql: str | None = None,
    ) -> None:
        self.settings = settings
        # A statement run inside every apply transaction: simulates a consumer bug.
        self.bug_sql = bug_sql
        self.delay_s = delay_s
        self.every_s = every_s
        self.spec = mapping()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stamps: dict[str, dict[str, tuple[str, int]]] = {}
        self.rounds = 0
        self.error: BaseException | None = None

    def __enter__(self) -> LaggingConsumer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_rounds(self, n: int, timeout_s: float = 30.0) -> None:
        """Block until ``n`` snapshots were applied (commerce lags the workload from then on)."""
        deadline = time.monotonic() + timeout_s
        while self.rounds < n and self.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.error is None, self.error
        assert self.rounds >= n, f"the lagging consumer applied {self.rounds} of {n} rounds"

    def _sides(self, dst: psycopg.Connection[Any]) -> list[dg.TableSides]:
        return [
            dg.build_sides(
                t,
                source_schema=self.spec.source_schema,
                target_schema=self.spec.target_schema,
                target_types=target_column_types(dst, self.spec.target_schema, t.target_table),
            )
            for t in self.spec.tables.values()
        ]

    def _snapshot(self, src: psycopg.Connection[Any], dst: psycopg.Connection[Any]) -> _Snapshot:
        lsn = current_lsn(src)
        time.sleep(0.05)
        tables: dict[str, list[str]] = {}
        with src.transaction():
            src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            for s in self._sides(dst):
                q = sql.SQL(
                    "COPY (SELECT {vals} FROM {rel} AS r WHERE NOT {deleted}) TO STDOUT"
                ).format(
                    vals=sql.SQL(", ").join(s.legacy.values),
                    rel=s.legacy.relation,
                    deleted=s.legacy.deleted,
                )
                buf = bytearray()
                with src.cursor() as cur, cur.copy(q) as copy:
                    for block in copy:
                        buf += block
                tables[s.table.target_table] = buf.decode().splitlines()
        return _Snapshot(lsn, time.monotonic(), tables)

    def _stamped(self, s: dg.TableSides, lines: list[str], lsn: int) -> str:
        key_at = [s.columns.index(c) for c in s.table.target_key]
        old = self._stamps.get(s.table.target_table, {})
        new: dict[str, tuple[str, int]] = {}
        out: list[str] = []
        for line in lines:
            fields = line.split("\t")
            key = "\t".join(fields[i] for i in key_at)
            before = old.get(key)
            stamp = before[1] if before is not None and before[0] == line else lsn
            new[key] = (line, stamp)
            out.append(f"{line}\t{stamp}\t0\n")
        self._stamps[s.table.target_table] = new
        return "".join(out)

    def _apply(self, dst: psycopg.Connection[Any], snap: _Snapshot) -> None:
        with dst.transaction():
            for s in self._sides(dst):
                dst.execute(sql.SQL("DELETE FROM {}").format(s.commerce.relation))
                cols = sql.SQL(", ").join(
                    sql.Identifier(c) for c in (*s.columns, "_src_lsn", "_src_seq")
                )
                with (
                    dst.cursor() as cur,
                    cur.copy(
                        sql.SQL("COPY {} ({}) FROM STDIN").format(s.commerce.relation, cols)
                    ) as copy,
                ):
                    copy.write(self._stamped(s, snap.tables[s.table.target_table], snap.lsn))
            dst.execute(
                "UPDATE cutover.consumer_offsets SET last_source_lsn = %s, applied_at = now() "
                "WHERE group_id = %s",
                [snap.lsn, self.settings.apply.group_id],
            )
            if self.bug_sql is not None:
                dst.execute(self.bug_sql.encode())
        self.rounds += 1

    def _run(self) -> None:
        pending: list[_Snapshot] = []
        try:
            with (
                connect(self.settings.source.dsn, "source") as src,
                connect(self.settings.target.dsn, "target") as dst,
            ):
                while not self._stop.is_set():
                    pending.append(self._snapshot(src, dst))
                    while pending and time.monotonic() - pending[0].taken >= self.delay_s:
                        self._apply(dst, pending.pop(0))
                    self._stop.wait(self.every_s)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
