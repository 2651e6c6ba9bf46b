"""A producer on a scratch source, for integration tests and benchmarks (not used in production).

A :class:`Scenario` is one isolated pipeline: its own legacy database, topic prefix, slot and
publication, and a config file pointing at them. Tests and ``bench/producer_*.py`` share it so
that both exercise the real commands (``python -m cli.main produce``) the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cutover.config import Settings, load_settings
from cutover.mapping import load_mapping
from devtools.readback import Decoded, decode_all, read_all, schema_store

REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "examples" / "shop" / "mapping.toml"
# Tests and benchmarks only (Scenario.env() keeps CUTOVER_* away from the product).
READ_MODE_ENV = "CUTOVER_TEST_READ_MODE"


@dataclass
class Scenario:
    """One isolated pipeline on the local stack."""

    source_dsn: str
    target_dsn: str
    bootstrap: str
    workdir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    partitions: int = 6
    peek_batch: int = 20_000
    chunk_rows: int = 20_000
    heartbeat_s: float = 1.0
    mapping: Path = MAPPING
    producer_settings: Mapping[str, Any] = field(default_factory=dict)
    apply_settings: Mapping[str, Any] = field(default_factory=dict)  # the [apply] section
    #: More ``[kafka]`` settings (e.g. replication_factor on a cluster).
    kafka_settings: Mapping[str, Any] = field(default_factory=dict)
    #: The ``[gates]`` section (e.g. soak times 0 for a write-cutover test).
    gate_settings: Mapping[str, Any] = field(default_factory=dict)
    #: ``[source] read_mode``; unset: ``$CUTOVER_TEST_READ_MODE`` (runs whole test files in
    #: the other mode), else the product's default.
    read_mode: str | None = field(default_factory=lambda: os.environ.get(READ_MODE_ENV) or None)

    @property
    def prefix(self) -> str:
        return f"t{self.tag}"

    @property
    def slot(self) -> str:
        return f"cutover_t{self.tag}"

    @property
    def publication(self) -> str:
        return f"cutover_pub_t{self.tag}"

    @property
    def reverse_slot(self) -> str:
        """The reverse direction's slot (on commerce)."""
        return f"cutover_rt{self.tag}"

    @property
    def reverse_publication(self) -> str:
        return f"cutover_rpub_t{self.tag}"

    def reverse_topics(self) -> list[str]:
        return [f"{self.prefix}.reverse.{d}" for d in load_mapping(self.mapping).domains]

    @property
    def config(self) -> Path:
        return self.workdir / f"cutover-{self.tag}.toml"

    def topics(self) -> list[str]:
        return [f"{self.prefix}.{d}" for d in load_mapping(self.mapping).domains]

    def write_config(self) -> Path:
        lines = [
            "[source]",
            f'slot = "{self.slot}"',
            f'publication = "{self.publication}"',
            f"peek_batch = {self.peek_batch}",
            f"heartbeat_interval_s = {self.heartbeat_s}",
            f"snapshot_chunk_rows = {self.chunk_rows}",
            *([f'read_mode = "{self.read_mode}"'] if self.read_mode else []),
            "[target]",
            "[reverse]",
            f'slot = "{self.reverse_slot}"',
            f'publication = "{self.reverse_publication}"',
            "[kafka]",
            f'topic_prefix = "{self.prefix}"',
            f"partitions = {self.partitions}",
            *(f"{k} = {_toml(v)}" for k, v in self.kafka_settings.items()),
            "[kafka.producer]",
            *(f'"{k}" = {_toml(v)}' for k, v in self.producer_settings.items()),
            "[apply]",
            *(f"{k} = {_toml(v)}" for k, v in self.apply_settings.items()),
            "[gates]",
            *(f"{k} = {_toml(v)}" for k, v in self.gate_settings.items()),
            "[mapping]",
            f'file = "{self.mapping}"',
        ]
        self.config.write_text("\n".join(lines) + "\n")
        return self.config

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUTOVER_")}
        env.update(
            {
                "CUTOVER_SOURCE_DSN": self.source_dsn,
                "CUTOVER_TARGET_DSN": self.target_dsn,
                "CUTOVER_KAFKA_BOOTSTRAP": self.bootstrap,
                "PYTHONPATH": str(REPO),
            }
        )
        env.update(extra or {})
        return env

    def settings(self) -> Settings:
        self.write_config()
        return load_settings(self.config, self.env())

    def cli(
        self, *args: str, extra_env: Mapping[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        self.write_config()
        return subprocess.run(
            [sys.executable, "-m", "cli.entry", "--config", str(self.config), *args],
            env=self.env(extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @property
    def log_path(self) -> Path:
        return self.workdir / f"produce-{self.tag}.log"

    def start_produce(
        self, *args: str, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``cutover produce`` in the background; its output is appended to :attr:`log_path`
        (a file, not a pipe: an undrained pipe would block the producer on its own logging)."""
        self.write_config()
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [
                    sys.executable, "-m", "cli.entry", "--config", str(self.config),
                    "--log-json", "produce", *args,
                ],
                env=self.env(extra_env),
                stdout=log,
                stderr=log,
            )  # fmt: skip

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines the background producers wrote so far."""
        out = []
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                if line.startswith("{"):
                    out.append(json.loads(line))
        return out

    def read(self, topics: Sequence[str] | None = None) -> list[Decoded]:
        store = schema_store(self.bootstrap, f"{self.prefix}.schemas")
        return decode_all(store, read_all(self.bootstrap, topics or self.topics()))

    def raw_values(self) -> list[bytes]:
        return [
            (m.key or b"") + b"|" + (m.value or b"")
            for m in read_all(
                self.bootstrap, [*self.topics(), f"{self.prefix}.schemas", f"{self.prefix}.dlq"]
            )
        ]

    def slot_state(self) -> tuple[int | None, str | None]:
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint, wal_status"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            ).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def drop_slot(self, *, reverse: bool = False) -> None:
        """Drop the slot (waiting for a killed producer's backend to let go of it); with
        ``reverse``, the reverse direction's slot on commerce."""
        deadline = time.monotonic() + 30
        dsn, slot = (
            (self.target_dsn, self.reverse_slot) if reverse else (self.source_dsn, self.slot)
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
                if row is None:
                    return
                if row[0] is not None:
                    conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    return
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` and wait; returns the exit code (kills on timeout)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def changes(events: Sequence[Decoded]) -> list[Decoded]:
    """Only the change events (no heartbeats)."""
    return [e for e in events if e.is_change]


def last_state(
    events: Sequence[Decoded], table: str, primary_key: Sequence[str]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """What applying the events of ``table`` gives, as a consumer does: pk → row.

    The newest (lsn, seq) position wins per key, whatever the arrival order; a delete removes
    the row; unchanged TOAST columns keep the value the row had.
    """
    by_key: dict[tuple[Any, ...], tuple[tuple[int, int], dict[str, Any] | None]] = {}
    for e in changes(events):
        rec = e.record
        if rec["source"]["table"] != table:
            continue
        pos = (rec["source"]["lsn"], rec["source"]["seq"])
        image = rec["after"] if rec["op"] != "d" else rec["before"]
        assert image is not None
        key = tuple(image[c] for c in primary_key)
        current = by_key.get(key)
        if current is not None and current[0] >= pos:
            continue
        if rec["op"] == "d":
            by_key[key] = (pos, None)
            continue
        after = dict(rec["after"])
        previous = current[1] if current else None
        for col in rec["unchanged_toast"]:
            after[col] = previous.get(col) if previous else None
        by_key[key] = (pos, after)
    return {k: v[1] for k, v in by_key.items() if v[1] is not None}


def source_state(
    dsn: str, schema: str, table: str, columns: Sequence[str], primary_key: Sequence[str]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """pk → row (the given columns) of a source table, read with psycopg's typed values."""
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, table)
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(query).fetchall()
    out = {}
    for values in rows:
        row = dict(zip(columns, values, strict=True))
        out[tuple(row[c] for c in primary_key)] = row
    return out


@contextmanager
def open_scenario(
    source_dsn: str, target_dsn: str, bootstrap: str, workdir: Path, **kwargs: Any
) -> Iterator[Scenario]:
    """A :class:`Scenario`, initialised with ``cutover init``; its slot is dropped at the end."""
    scenario = Scenario(source_dsn, target_dsn, bootstrap, workdir, **kwargs)
    try:
        yield scenario
    finally:
        scenario.drop_slot()
        scenario.drop_slot(reverse=True)


def init(scenario: Scenario, *args: str) -> dict[str, Any]:
    """Run ``cutover init --json``; the report (AssertionError with stderr if it failed)."""
    result = scenario.cli("init", "--json", *args)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report
