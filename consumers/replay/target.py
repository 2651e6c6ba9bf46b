"""`cutover replay play --to-target`: a replay file applied to a sandbox commerce database.

The file is a source of the apply engine (:mod:`consumers.engine`), so it takes the apply path of
``cutover apply``: mapping, position guards, tombstones, per-aggregate atomicity (a batch is
committed only where no partition is inside a source transaction; a long one is applied in
sub-batches of one database transaction). Poison messages are recorded in the sandbox's
``cutover.dead_letters`` (group ``cutover-replay``), not sent to a topic. Offsets are not stored:
a sandbox has no consumer to resume.

A sandbox is not a live database. :func:`live_reasons` says why a database looks live (issue 13:
a file from another environment once overwrote 2,996 rows of one, exit 0):

* it is the configured target, by identity: the cluster's system identifier
  (``pg_control_system()``) and the database's oid, whatever the DSN text says (host name or
  address, keyword or URL form, extra parameters);
* it holds consumer positions (``cutover.consumer_offsets`` rows): a consumer group applies there;
* it holds a cutover state (``cutover.domain_state`` rows): the control plane runs there.

The command refuses such a target (exit 2) unless told ``--i-know-this-is-live REASON``, which the
CLI writes to the audit trail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from structlog.typing import FilteringBoundLogger

from consumers.batch import TP, Entry
from consumers.engine import ApplyEngine, Batch, Decoder, SimpleSource
from consumers.letters import RecordLetters
from consumers.replay.avro import REPLAY_GROUP
from consumers.replay.filters import Filters, Pacer, ProgressFn, Rate
from consumers.replay.play import PlaySummary, selected
from consumers.replay.reader import Recorded, ReplayFile
from consumers.sink import Sink
from cutover import pg
from cutover.config import Settings
from cutover.errors import DatabaseError, UsageError, redact_dsn
from cutover.logging import get_logger
from cutover.mapping import load_mapping
from cutover.registry import with_registry

Conn = psycopg.Connection[tuple[object, ...]]


def log() -> FilteringBoundLogger:
    # Looked up at each use: a logger bound before cutover.logging.configure() keeps defaults.
    return get_logger(__name__)


def play_to_target(
    settings: Settings,
    path: Path,
    dsn: str,
    filters: Filters,
    rate: Rate,
    *,
    batch_events: int | None = None,
    progress: ProgressFn | None = None,
) -> PlaySummary:
    """Apply the file's change events to the commerce database ``dsn`` through the apply engine
    (see the module docstring). The caller checks first that ``dsn`` is no live database."""
    started = time.monotonic()
    summary = PlaySummary(str(path), f"database {redact_dsn(dsn)}", rate.describe())
    batch_max = batch_events or settings.apply.batch_max_events
    if batch_max <= 0:
        raise UsageError("--batch-events must be positive")
    mapping = load_mapping(settings.mapping_path)
    control = settings.target.control_schema
    with ReplayFile(path) as replay:
        engine = ApplyEngine(
            mapping,
            connect=lambda: _connect(dsn, "connecting to the sandbox"),
            control_schema=control,
            letters=RecordLetters(REPLAY_GROUP, halt=False),
            domain_of={settings.kafka.topic(d): d for d in mapping.domains},
        )
        source = _FileSource(
            selected(replay, filters, summary),
            Decoder(with_registry(replay.schema_store(), settings.kafka)),
            pacer=Pacer(rate),
            batch_max=batch_max,
            summary=summary,
            progress=progress,
            total=replay.events or 0,
        )
        try:
            _check_sandbox(engine.connect(), control, mapping.target_schema)
            engine.run(source)
        finally:
            engine.close()
    summary.upserted = engine.summary.upserted
    summary.deleted = engine.summary.deleted
    summary.dead_letters = engine.summary.dead_letters
    if progress is not None:
        progress(summary.played + summary.skipped, replay.events or 0)
    summary.seconds = time.monotonic() - started
    log().info("replay.played", **summary.as_json())
    return summary


class _FileSource(SimpleSource):
    """The records of a replay file, paced, in batches of ``batch_max`` messages."""

    def __init__(
        self,
        records: Iterator[Recorded],
        decoder: Decoder,
        *,
        pacer: Pacer,
        batch_max: int,
        summary: PlaySummary,
        progress: ProgressFn | None,
        total: int,
    ) -> None:
        self.records = records
        self.decoder = decoder
        self.pacer = pacer
        self.batch_max = batch_max
        self.summary = summary
        self.progress = progress
        self.total = total
        #: Partitions inside a source transaction: no COMMIT until it closes.
        self.open: set[TP] = set()
        self._held: Recorded | None = None
        self._done = False

    def next_batch(self) -> Batch | None:
        if self._done:
            return None
        if self.progress is not None:
            self.progress(self.summary.played + self.summary.skipped, self.total)
        entries: dict[TP, list[Entry]] = {}
        taken = 0
        while (rec := self._next_record()) is not None:
            wait = self.pacer.delay(self.summary.played, rec.timestamp_ms)
            if wait > 0:
                if taken:  # apply (and show) what was read before waiting
                    self._held = rec
                    return Batch(entries, commit=not self.open)
                time.sleep(wait)
            self.summary.played += 1
            tp = (rec.topic, rec.partition)
            entry = Entry(rec.offset, rec.key, rec.value)
            self.decoder.decode(entry)
            # Like closed_prefix: an undecodable message neither opens nor closes a unit.
            if entry.event is not None:
                if entry.event.closes:
                    self.open.discard(tp)
                else:
                    self.open.add(tp)
            entries.setdefault(tp, []).append(entry)
            taken += 1
            if taken >= self.batch_max:
                return Batch(entries, commit=not self.open)
        self._done = True
        self.summary.open_units_at_end = len(self.open)
        if self.open:
            log().warning(
                "replay.open_units_at_end",
                partitions=sorted(f"{t}[{p}]" for t, p in self.open),
            )
        return Batch(entries, commit=True)

    def _next_record(self) -> Recorded | None:
        if self._held is not None:
            rec, self._held = self._held, None
            return rec
        return next(self.records, None)


def _connect(dsn: str, what: str) -> Conn:
    return pg.connect(
        dsn, side="target", connect_timeout=10, application_name="cutover-replay", doing=what
    )


def _check_sandbox(sink: Sink, control: str, target_schema: str) -> None:
    for table in sink.control.missing(["tombstones", "dead_letters"])[:1]:
        raise DatabaseError(
            f"the sandbox has no control table {control}.{table}: run `cutover init` against it "
            "first",
            side="target",
        )
    row = sink.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (target_schema,)).fetchone()
    if row is None:
        raise DatabaseError(
            f"the sandbox has no schema {target_schema}: load the commerce DDL first "
            "(e.g. `cutover init --target-ddl examples/shop/commerce.sql`)",
            side="target",
        )


# ---------------------------------------------------------------------------- live targets


@dataclass(frozen=True, slots=True)
class Identity:
    """Which database a connection reached, whatever its DSN said."""

    system_identifier: int
    database_oid: int
    database: str

    def same_database(self, other: Identity) -> bool:
        return (self.system_identifier, self.database_oid) == (
            other.system_identifier,
            other.database_oid,
        )


def identity(conn: Conn) -> Identity:
    try:
        row = conn.execute(
            "SELECT (SELECT system_identifier FROM pg_control_system()), d.oid::bigint, "
            "d.datname FROM pg_database AS d WHERE d.datname = current_database()"
        ).fetchone()
    except psycopg.Error as exc:
        raise pg.translate(exc, "reading the database's identity", "target") from None
    assert row is not None
    return Identity(int(row[0]), int(row[1]), str(row[2]))  # type: ignore[call-overload]


def live_reasons(conn: Conn, control: str, configured: Identity | None) -> list[str]:
    """Why the database of ``conn`` looks live (see the module docstring); empty: a sandbox."""
    reasons: list[str] = []
    if configured is not None and identity(conn).same_database(configured):
        reasons.append(
            f"it is the configured target database ({configured.database}: same system "
            "identifier and database oid as [target] dsn / CUTOVER_TARGET_DSN)"
        )
    groups = _rows(conn, control, "consumer_offsets", "group_id")
    if groups:
        reasons.append(
            f"it holds consumer positions ({control}.consumer_offsets) of group(s) "
            f"{', '.join(groups)}: a consumer group applies into it"
        )
    domains = _rows(conn, control, "domain_state", "domain")
    if domains:
        reasons.append(
            f"it holds a cutover state ({control}.domain_state) for {', '.join(domains)}"
        )
    return reasons


def _rows(conn: Conn, control: str, table: str, column: str) -> list[str]:
    """The distinct ``column`` values of ``control.table`` (none when there is no table)."""
    try:
        found = conn.execute("SELECT to_regclass(%s)", (f"{control}.{table}",)).fetchone()
        if found is None or found[0] is None:
            return []
        query = sql.SQL("SELECT DISTINCT {c}::text FROM {t} ORDER BY 1 LIMIT 10").format(
            c=sql.Identifier(column), t=sql.Identifier(control, table)
        )
        return [str(r[0]) for r in conn.execute(query).fetchall()]
    except psycopg.Error as exc:
        raise pg.translate(exc, f"reading {control}.{table}", "target") from None


def check_live_target(settings: Settings, dsn: str) -> list[str]:
    """:func:`live_reasons` of the database ``dsn``, compared with the configured target.

    A configured target that cannot be reached cannot be compared: logged, and the other
    reasons still apply (a live database holds consumer positions anyway).
    """
    configured: Identity | None = None
    try:
        with _connect(settings.target.dsn, "connecting to the configured target") as conn:
            configured = identity(conn)
    except DatabaseError as exc:
        log().warning("replay.configured_target_unreachable", error=exc.message)
    with _connect(dsn, "connecting to the sandbox") as conn:
        reasons = live_reasons(conn, settings.target.control_schema, configured)
    if reasons:
        log().warning("replay.live_target", target=redact_dsn(dsn), reasons=reasons)
    return reasons
