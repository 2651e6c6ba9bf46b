"""``cutover verify``: prove, table by table and key by key, that commerce holds the mapped legacy.

The run, in numbered steps (each one restartable; see ``--resume``):

1. Create the control plane if needed and a ``verify_runs`` row (status ``running``) holding the
   chunk plan of every table in scope: ranges of the primary key of about ``chunk_rows`` rows
   (:func:`control.digest.plan_integer_chunks`, or keyset boundaries for non-integer keys).
2. First pass, per chunk: a digest (rows, sum of row hashes) computed inside each database, both
   sides in parallel (:func:`control.digest.digest_sql`). Equal digests: every row of the chunk
   matches. Different digests: the chunk is split into buckets over the leading key, recursively,
   down to ranges of at most ``fetch_rows`` rows that are fetched from both sides and diffed
   key by key. Each chunk's figures and candidate keys are stored in ``verify_chunks`` once
   done, so an interrupted run resumes after the last finished chunk.
3. Recheck (lag awareness): the candidate keys of each table are re-read: legacy in one
   REPEATABLE READ snapshot together with the WAL position ``X`` it holds for; then verify waits
   (bounded by ``recheck_timeout_s``) until the domain's consumers have applied everything up to
   ``X`` (``cutover.consumer_offsets``, plus the producer's delivered position and Kafka's high
   watermarks for idle partitions: :func:`control.digest.applied_position`); then the commerce
   rows (and tombstones) are read. A key differing while commerce was behind or ahead of the
   snapshot is *pending*; one differing twice in a row with commerce exactly caught up is a
   persistent mismatch (:class:`control.digest.RecheckTracker`). A domain with no consumer
   positions recorded at all is treated as static: two immediate re-reads confirm.
4. The scenario invariants of DESIGN §3 are checked on commerce (violations are re-read once
   after a catch-up wait, so a transient state never counts).
5. The result is stored in ``verify_runs`` (passed, figures per table, the LSNs it holds for);
   the switch-reads gate reads it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import sql

from control import digest as dg
from control.state import ensure_control_plane
from cutover.config import Settings
from cutover.errors import DatabaseError, UsageError
from cutover.kafka import fetch_watermarks, kafka_consumer
from cutover.logging import get_logger
from cutover.mapping import MappingSpec, TableMapping

__all__ = [
    "InvariantReport",
    "TableReport",
    "VerifyOptions",
    "VerifyProgress",
    "VerifyReport",
    "copy_mapped_rows",
    "latest_runs",
    "run_verify",
    "select_tables",
]

log = get_logger("control.verify")

Conn = psycopg.Connection[Any]
T = TypeVar("T")

#: Schema of the producer's control tables in the LEGACY database (producers/source_state.py).
LEGACY_CONTROL_SCHEMA = "cutover"
SAMPLE_KINDS = ("missing", "extra", "different", "unresolved")


@dataclass(frozen=True, slots=True)
class VerifyOptions:
    """Tuning of a verify run. The defaults suit tables of millions of rows on a small machine."""

    chunk_rows: int = 100_000
    #: A differing range with at most this many rows (either side) is fetched and diffed.
    fetch_rows: int = 2_000
    #: Buckets per bisection level of a differing range.
    buckets: int = 32
    recheck_timeout_s: float = 30.0
    recheck_poll_s: float = 0.25
    #: More candidate keys than this in one table: no recheck, the first-pass figures stand.
    #: Large, so that consumers catching up on a big backlog (a snapshot just loaded) are
    #: waited for rather than reported; keys are rechecked in batches, memory stays small.
    max_recheck_keys: int = 500_000
    sample_keys: int = 20

    def to_json(self) -> dict[str, object]:
        return {
            "chunk_rows": self.chunk_rows,
            "fetch_rows": self.fetch_rows,
            "buckets": self.buckets,
            "recheck_timeout_s": self.recheck_timeout_s,
            "max_recheck_keys": self.max_recheck_keys,
        }


class VerifyProgress(Protocol):
    """Receives progress of the first pass (the command draws a progress bar with it)."""

    def start(self, total_rows: int) -> None: ...

    def advance(self, table: str, rows: int) -> None: ...

    def phase(self, text: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


@dataclass
class TableReport:
    """The verdict on one table. ``extra`` includes rows the mapping deletes but commerce holds."""

    table: str
    target: str
    domain: str
    legacy_rows: int = 0
    commerce_rows: int = 0
    absent_by_mapping: int = 0
    rows_compared: int = 0
    matching: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    unresolved: int = 0
    transient: int = 0
    chunks: int = 0
    chunks_differing: int = 0
    seconds: float = 0.0
    recheck: str = "not needed"
    samples: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.missing + self.extra + self.different + self.unresolved == 0

    def to_json(self) -> dict[str, object]:
        return {
            "table": self.table,
            "target": self.target,
            "domain": self.domain,
            "passed": self.passed,
            "legacy_rows": self.legacy_rows,
            "commerce_rows": self.commerce_rows,
            "absent_by_mapping": self.absent_by_mapping,
            "rows_compared": self.rows_compared,
            "matching": self.matching,
            "missing": self.missing,
            "extra": self.extra,
            "different": self.different,
            "unresolved": self.unresolved,
            "transient": self.transient,
            "chunks": self.chunks,
            "chunks_differing": self.chunks_differing,
            "seconds": round(self.seconds, 3),
            "recheck": self.recheck,
            "samples": self.samples,
        }


@dataclass
class InvariantReport:
    """One scenario invariant (DESIGN §3) checked on commerce."""

    name: str
    domain: str
    description: str
    violations: int = 0
    samples: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.violations == 0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "domain": self.domain,
            "description": self.description,
            "passed": self.passed,
            "violations": self.violations,
            "samples": self.samples,
        }


@dataclass
class VerifyReport:
    """The whole run: what ``--json`` prints and ``verify_runs.figures`` stores."""

    run_id: int
    domains: list[str]
    tables: list[TableReport]
    invariants: list[InvariantReport]
    source_lsn_start: int
    source_lsn_end: int
    applied_lsn: dict[str, int | None]
    first_pass_s: float
    elapsed_s: float
    resumed: bool = False

    @property
    def failed_domains(self) -> list[str]:
        failed = {t.domain for t in self.tables if not t.passed}
        failed |= {i.domain for i in self.invariants if not i.passed}
        return sorted(failed)

    @property
    def passed(self) -> bool:
        return not self.failed_domains

    @property
    def legacy_rows(self) -> int:
        return sum(t.legacy_rows + t.absent_by_mapping for t in self.tables)

    @property
    def commerce_rows(self) -> int:
        return sum(t.commerce_rows for t in self.tables)

    def rows_per_s(self) -> float:
        """Legacy rows compared per second of the first pass (per side: both run in parallel)."""
        return self.legacy_rows / self.first_pass_s if self.first_pass_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "passed": self.passed,
            "domains": self.domains,
            "failed_domains": self.failed_domains,
            "resumed": self.resumed,
            "source_lsn_start": _lsn_text(self.source_lsn_start),
            "source_lsn_end": _lsn_text(self.source_lsn_end),
            "applied_lsn": {
                d: (None if v is None else _lsn_text(v)) for d, v in self.applied_lsn.items()
            },
            "legacy_rows": self.legacy_rows,
            "commerce_rows": self.commerce_rows,
            "first_pass_s": round(self.first_pass_s, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "rows_per_s_per_side": round(self.rows_per_s()),
            "tables": [t.to_json() for t in self.tables],
            "invariants": [i.to_json() for i in self.invariants],
        }

    def mismatch_summary(self) -> str:
        """One line naming each failing table (with sample keys) and invariant."""
        parts: list[str] = []
        for t in self.tables:
            if t.passed:
                continue
            figures = ", ".join(
                f"{n} {k}"
                for k, n in (
                    ("missing", t.missing),
                    ("extra", t.extra),
                    ("different", t.different),
                    ("unresolved", t.unresolved),
                )
                if n
            )
            keys = [
                json.dumps(s["key"]) for kind in SAMPLE_KINDS for s in t.samples.get(kind, [])[:3]
            ][:5]
            parts.append(f"{t.target} ({figures}; keys {', '.join(keys)})")
        for i in self.invariants:
            if not i.passed:
                parts.append(f"invariant {i.name} ({i.violations} violations)")
        return "; ".join(parts)


def _lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# ---------------------------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------------------------


def _db_error(exc: psycopg.Error, side: str, doing: str) -> DatabaseError:
    return DatabaseError(f"{doing}: {str(exc).strip()}", side=side, sqlstate=exc.sqlstate)


def connect(dsn: str, side: str) -> Conn:
    """An autocommit connection for verify: UTC, no JIT, no parallel workers.

    TimeZone UTC so any value compared as text renders identically on both sides; no JIT because
    compiling each chunk query costs more than running it; no parallel workers because the
    machine is shared and both databases already work at once.
    """
    try:
        conn = psycopg.connect(dsn, autocommit=True, application_name="cutover-verify")
        conn.execute("SET TimeZone = 'UTC'; SET jit = off; SET max_parallel_workers_per_gather = 0")
    except psycopg.Error as exc:
        raise _db_error(exc, side, "connecting") from None
    return conn


def _query(
    conn: Conn, side: str, query: sql.Composed | sql.SQL, params: Sequence[object] | None = None
) -> list[tuple[Any, ...]]:
    try:
        rows: list[tuple[Any, ...]] = conn.execute(query, params).fetchall()
    except psycopg.Error as exc:
        raise _db_error(exc, side, "verify query") from None
    return rows


def _exec(conn: Conn, side: str, query: sql.Composed | sql.SQL, params: Sequence[object]) -> None:
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        raise _db_error(exc, side, "verify bookkeeping") from None


def current_lsn(conn: Conn) -> int:
    """The legacy WAL insert position, as an integer (the form of ``_src_lsn``)."""
    row = _query(conn, "source", sql.SQL("SELECT (pg_current_wal_lsn() - '0/0')::bigint"))
    return int(row[0][0])


def target_column_types(conn: Conn, schema: str, table: str) -> dict[str, str]:
    """Commerce column → type name (``format_type`` without typmod) of ``schema.table``."""
    rows = _query(
        conn,
        "target",
        sql.SQL(
            "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
            "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped"
        ),
        [sql.Identifier(schema, table).as_string(conn)],
    )
    return {name: typ for name, typ in rows}


# ---------------------------------------------------------------------------------------------
# Scope
# ---------------------------------------------------------------------------------------------


def select_tables(
    mapping: MappingSpec, domain: str | None, table: str | None
) -> tuple[list[TableMapping], list[str]]:
    """The tables in scope and the domains they fully cover (only those count for the gates)."""
    if domain is not None and domain not in mapping.domains:
        raise UsageError(
            f"unknown domain {domain!r}; the mapping declares: {', '.join(mapping.domains)}"
        )
    tables = list(mapping.tables.values() if domain is None else mapping.tables_of(domain))
    if table is not None:
        chosen = [t for t in tables if table in (t.source_table, t.target_table)]
        if not chosen:
            names = ", ".join(f"{t.source_table} ({t.target_table})" for t in tables)
            raise UsageError(f"unknown table {table!r} in scope; tables: {names}")
        tables = chosen
    in_scope = {t.source_table for t in tables}
    covered = [
        d for d in mapping.domains if all(t.source_table in in_scope for t in mapping.tables_of(d))
    ]
    return tables, covered


# ---------------------------------------------------------------------------------------------
# Consumer positions (lag awareness)
# ---------------------------------------------------------------------------------------------


class PositionReader:
    """Reads what source position the consumers of a domain have applied (see the module doc)."""

    def __init__(
        self, settings: Settings, mapping: MappingSpec, legacy: Conn, commerce: Conn
    ) -> None:
        self.settings = settings
        self.mapping = mapping
        self.legacy = legacy
        self.commerce = commerce
        self._consumer: Any = None

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def applied(self, domain: str) -> int | None:
        """The position every partition of ``domain`` has applied; None when no consumer ever
        recorded a position for the domain (then commerce is treated as static)."""
        topic = self.settings.kafka.topic(domain)
        schema = self.settings.target.control_schema
        if not _table_exists(self.commerce, "target", schema, "consumer_offsets"):
            return None
        rows = _query(
            self.commerce,
            "target",
            sql.SQL(
                "SELECT kafka_partition, next_offset, last_source_lsn FROM {} "
                "WHERE group_id = %s AND topic = %s"
            ).format(sql.Identifier(schema, "consumer_offsets")),
            [self.settings.apply.group_id, topic],
        )
        if not rows:
            return None
        if self._snapshot_unfinished(domain):
            # Snapshot rows of chunks not read yet carry no position below the delivered one:
            # until the snapshot is done, nothing of this domain counts as applied.
            return 0
        offsets = {int(p): (int(n), None if lsn is None else int(lsn)) for p, n, lsn in rows}
        delivered = self._delivered()
        watermarks = self._watermarks(topic) if delivered is not None else None
        return dg.applied_position(
            range(self.settings.kafka.partitions), offsets, delivered, watermarks
        )

    def _snapshot_unfinished(self, domain: str) -> bool:
        """Whether a snapshot of one of the domain's tables is pending or running."""
        if not _table_exists(self.legacy, "source", LEGACY_CONTROL_SCHEMA, "snapshot_requests"):
            return False
        tables = [t.source_table for t in self.mapping.tables_of(domain)]
        rows = _query(
            self.legacy,
            "source",
            sql.SQL(
                "SELECT count(*) FROM {} WHERE slot_name = %s AND source_table = ANY(%s)"
                " AND status IN ('pending', 'running')"
            ).format(sql.Identifier(LEGACY_CONTROL_SCHEMA, "snapshot_requests")),
            [self.settings.source.slot, tables],
        )
        unfinished = bool(rows and rows[0][0])
        if unfinished:
            log.info("verify.snapshot_unfinished", domain=domain)
        return unfinished

    def _delivered(self) -> int | None:
        if not _table_exists(self.legacy, "source", LEGACY_CONTROL_SCHEMA, "producer_state"):
            return None
        rows = _query(
            self.legacy,
            "source",
            sql.SQL("SELECT delivered_lsn FROM {} WHERE slot_name = %s").format(
                sql.Identifier(LEGACY_CONTROL_SCHEMA, "producer_state")
            ),
            [self.settings.source.slot],
        )
        return int(rows[0][0]) if rows else None

    def _watermarks(self, topic: str) -> dict[int, int] | None:
        try:
            if self._consumer is None:
                self._consumer = kafka_consumer(self.settings)
            marks = fetch_watermarks(self._consumer, topic, timeout_s=2.0)
        except Exception as exc:  # Kafka down: fall back to last_source_lsn only
            log.debug("verify.watermarks_unavailable", topic=topic, error=str(exc))
            return None
        return {p: high for p, (_low, high) in marks.items()}


def _table_exists(conn: Conn, side: str, schema: str, table: str) -> bool:
    rows = _query(
        conn,
        side,
        sql.SQL("SELECT to_regclass(%s) IS NOT NULL"),
        [sql.Identifier(schema, table).as_string(conn)],
    )
    return bool(rows[0][0])


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@dataclass
class _TableState:
    sides: dg.TableSides
    ranges: list[dg.KeyRange]
    report: TableReport
    candidates: list[dg.KeyDiff] = field(default_factory=list)
    first_pass_matching: int = 0


class _Verifier:
    def __init__(
        self,
        settings: Settings,
        mapping: MappingSpec,
        options: VerifyOptions,
        progress: VerifyProgress | None,
        sleep: Callable[[float], None],
    ) -> None:
        self.settings = settings
        self.mapping = mapping
        self.options = options
        self.progress = progress
        self.sleep = sleep
        self.legacy = connect(settings.source.dsn, "source")
        self.commerce = connect(settings.target.dsn, "target")
        # A third connection for control writes, so the query connections stay single-purpose.
        self.control = connect(settings.target.dsn, "target")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-commerce")
        self.positions = PositionReader(settings, mapping, self.legacy, self.control)
        self.control_schema = settings.target.control_schema

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.positions.close()
        for conn in (self.legacy, self.commerce, self.control):
            conn.close()

    # -- both sides at once ---------------------------------------------------------------------

    def both(
        self,
        legacy_q: sql.Composed | sql.SQL,
        commerce_q: sql.Composed | sql.SQL,
        legacy_params: Sequence[object] | None = None,
        commerce_params: Sequence[object] | None = None,
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Run one query on each database in parallel (the databases do the work, not Python)."""
        fut: Future[list[tuple[Any, ...]]] = self.pool.submit(
            _query, self.commerce, "target", commerce_q, commerce_params
        )
        try:
            left = _query(self.legacy, "source", legacy_q, legacy_params)
        finally:
            right = fut.result()
        return left, right

    # -- planning ------------------------------------------------------------------------------

    def sides_of(self, table: TableMapping) -> dg.TableSides:
        types = target_column_types(self.commerce, self.mapping.target_schema, table.target_table)
        if not types:
            raise DatabaseError(
                f"table {self.mapping.target_schema}.{table.target_table} does not exist",
                side="target",
            )
        try:
            return dg.build_sides(
                table,
                source_schema=self.mapping.source_schema,
                target_schema=self.mapping.target_schema,
                target_types=types,
            )
        except KeyError as exc:
            raise DatabaseError(str(exc.args[0]), side="target") from None

    def plan(self, sides: dg.TableSides) -> tuple[list[dg.KeyRange], int]:
        """Chunk ranges of a table and its legacy row count (for the progress total)."""
        count_q = sql.SQL("SELECT count(*) FROM {}").format(sides.legacy.relation)
        if sides.integer_leading_key:
            lq = sql.SQL("SELECT min({k}), max({k}), count(*) FROM {rel} AS r").format(
                k=sides.legacy.keys[0], rel=sides.legacy.relation
            )
            cq = sql.SQL("SELECT min({k}), max({k}), count(*) FROM {rel} AS r").format(
                k=sides.commerce.keys[0], rel=sides.commerce.relation
            )
            (l_row,), (c_row,) = self.both(lq, cq)
            los = [v for v in (l_row[0], c_row[0]) if v is not None]
            his = [v for v in (l_row[1], c_row[1]) if v is not None]
            rows = max(int(l_row[2]), int(c_row[2]))
            ranges = dg.plan_integer_chunks(
                min(los) if los else None, max(his) if his else None, rows, self.options.chunk_rows
            )
            return ranges, int(l_row[2])
        bq = dg.boundaries_sql(sides.legacy, self.options.chunk_rows)
        boundaries = [tuple(r) for r in _query(self.legacy, "source", bq)]
        total = int(_query(self.legacy, "source", count_q)[0][0])
        return dg.ranges_from_boundaries(boundaries), total

    # -- first pass ------------------------------------------------------------------------------

    def digests(self, sides: dg.TableSides, rng: dg.KeyRange) -> tuple[dg.Digest, dg.Digest]:
        (left,), (right,) = self.both(
            dg.digest_sql(sides.legacy, rng), dg.digest_sql(sides.commerce, rng)
        )
        return (
            dg.Digest(int(left[0]), int(left[1]), int(left[2])),
            dg.Digest(int(right[0]), int(right[1]), int(right[2])),
        )

    def fetch_diff(self, sides: dg.TableSides, rng: dg.KeyRange) -> dg.RowsDiff:
        left, right = self.both(dg.rows_sql(sides.legacy, rng), dg.rows_sql(sides.commerce, rng))
        n = len(sides.table.primary_key)
        return dg.diff_rows(
            sides.columns,
            (dg.split_row(r, n) for r in left),
            (dg.split_row(r, n) for r in right),
        )

    def bisect(
        self, sides: dg.TableSides, rng: dg.KeyRange, dl: dg.Digest, dc: dg.Digest
    ) -> tuple[int, list[dg.KeyDiff]]:
        """(matching rows, differing keys) of a range whose digests differ."""
        if (
            not sides.integer_leading_key
            or max(dl.rows + dl.absent, dc.rows) <= self.options.fetch_rows
        ):
            found = self.fetch_diff(sides, rng)
            return found.matching, list(found.diffs)
        (lb,), (cb,) = self.both(
            dg.bounds_sql(sides.legacy, rng), dg.bounds_sql(sides.commerce, rng)
        )
        los = [v for v in (lb[0], cb[0]) if v is not None]
        his = [v for v in (lb[1], cb[1]) if v is not None]
        lo, hi = int(min(los)), int(max(his)) + 1
        if hi - lo <= 1:  # one leading key value holds all the rows: nothing left to split
            found = self.fetch_diff(sides, rng)
            return found.matching, list(found.diffs)
        width = dg.bucket_width(lo, hi, self.options.buckets)
        inner = dg.KeyRange((lo,), (hi,))
        left, right = self.both(
            dg.bucket_digest_sql(sides.legacy, inner, lo, width),
            dg.bucket_digest_sql(sides.commerce, inner, lo, width),
        )
        lmap = {int(b): dg.Digest(int(n), int(h), int(a)) for b, n, h, a in left}
        cmap = {int(b): dg.Digest(int(n), int(h), int(a)) for b, n, h, a in right}
        differing = set(dg.differing_buckets(lmap, cmap))
        matching = sum(d.rows for b, d in lmap.items() if b not in differing)
        diffs: list[dg.KeyDiff] = []
        for b in sorted(differing):
            sub_m, sub_d = self.bisect(
                sides,
                dg.split_bucket(lo, hi, width, b),
                lmap.get(b, dg.Digest()),
                cmap.get(b, dg.Digest()),
            )
            matching += sub_m
            diffs.extend(sub_d)
        return matching, diffs

    def first_pass(
        self, run_id: int, state: _TableState, done: Mapping[int, tuple[Any, ...]]
    ) -> None:
        rep = state.report
        t0 = time.monotonic()
        for no, rng in enumerate(state.ranges):
            if no in done:
                lrows, crows, absent, matching, cands = done[no]
                diffs = [dg.KeyDiff.from_json(c) for c in cands]
            else:
                dl, dc = self.digests(state.sides, rng)
                lrows, crows, absent = dl.rows, dc.rows, dl.absent
                if dl.same(dc):
                    matching, diffs = dl.rows, []
                else:
                    matching, diffs = self.bisect(state.sides, rng, dl, dc)
                self.store_chunk(run_id, rep.table, no, (lrows, crows, absent, matching), diffs)
            rep.legacy_rows += lrows
            rep.commerce_rows += crows
            rep.absent_by_mapping += absent
            state.first_pass_matching += matching
            if diffs:
                rep.chunks_differing += 1
            state.candidates.extend(diffs)
            if self.progress is not None:
                self.progress.advance(rep.table, lrows + absent)
        rep.chunks = len(state.ranges)
        rep.seconds = time.monotonic() - t0

    def store_chunk(
        self,
        run_id: int,
        table: str,
        no: int,
        figures: tuple[int, int, int, int],
        diffs: Sequence[dg.KeyDiff],
    ) -> None:
        q = sql.SQL(
            "INSERT INTO {} (run_id, source_table, chunk_no, legacy_rows, commerce_rows, "
            "absent_rows, matching, candidates) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (run_id, source_table, chunk_no) DO NOTHING"
        ).format(sql.Identifier(self.control_schema, "verify_chunks"))
        payload = json.dumps([d.to_json() for d in diffs], default=str)
        try:
            self.control.execute(q, [run_id, table, no, *figures, payload])
        except psycopg.Error as exc:
            raise _db_error(exc, "target", "storing verify progress") from None

    # -- recheck --------------------------------------------------------------------------------

    def rows_by_keys(
        self,
        conn: Conn,
        side_name: str,
        side: dg.Side,
        sides: dg.TableSides,
        keys: Sequence[dg.Key],
    ) -> dict[dg.Key, dg.FetchedRow]:
        out: dict[dg.Key, dg.FetchedRow] = {}
        n = len(sides.key_types)
        q = dg.rows_by_keys_sql(side, sides.key_types)
        for i in range(0, len(keys), 5_000):
            batch = keys[i : i + 5_000]
            arrays = [[k[j] for k in batch] for j in range(n)]
            for row in _query(conn, side_name, q, arrays):
                fetched = dg.split_row(row, n)
                out[fetched.key] = fetched
        return out

    def tombstones(self, target_table: str, keys: Sequence[dg.Key]) -> dict[dg.Key, int]:
        if not keys or not _table_exists(self.control, "target", self.control_schema, "tombstones"):
            return {}
        texts = {json.dumps(list(k), ensure_ascii=False, default=str): k for k in keys}
        rows = _query(
            self.commerce,
            "target",
            sql.SQL(
                "SELECT row_key, src_lsn FROM {} WHERE target_table = %s AND row_key = ANY(%s)"
            ).format(sql.Identifier(self.control_schema, "tombstones")),
            [target_table, list(texts)],
        )
        return {texts[k]: int(lsn) for k, lsn in rows if k in texts}

    def legacy_snapshot(
        self, sides: dg.TableSides, keys: Sequence[dg.Key]
    ) -> tuple[int, dict[dg.Key, dg.FetchedRow]]:
        """Legacy rows of ``keys`` and the WAL position of the snapshot they were read in."""
        try:
            with self.legacy.transaction():
                self.legacy.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                lsn = current_lsn(self.legacy)
                rows = self.rows_by_keys(self.legacy, "source", sides.legacy, sides, keys)
        except psycopg.Error as exc:
            raise _db_error(exc, "source", "re-reading legacy rows") from None
        return lsn, rows

    def wait_applied(self, domain: str, lsn: int, deadline: float) -> tuple[bool, int | None]:
        """Wait until the domain's consumers applied ``lsn`` (True) or the deadline (False)."""
        while True:
            applied = self.positions.applied(domain)
            if applied is None or applied >= lsn:
                return True, applied
            if time.monotonic() >= deadline:
                return False, applied
            self.sleep(self.options.recheck_poll_s)

    def recheck(self, state: _TableState, deadline: float) -> None:
        rep = state.report
        sides = state.sides
        tracker = dg.RecheckTracker()
        tracker.add(d.key for d in state.candidates)
        while not tracker.done:
            keys = list(tracker.open)
            # (1) legacy rows and the WAL position of their snapshot
            snapshot_lsn, legacy_rows = self.legacy_snapshot(sides, keys)
            # (2) wait until the consumers passed that position (bounded)
            caught_up, _applied = self.wait_applied(sides.table.domain, snapshot_lsn, deadline)
            # (3) commerce rows, and tombstones of deleted ones (their delete's position)
            commerce_rows = self.rows_by_keys(self.commerce, "target", sides.commerce, sides, keys)
            tomb = self.tombstones(sides.table.target_table, keys)
            # (4) verdicts
            for key in keys:
                crow = commerce_rows.get(key)
                diff = dg.classify(sides.columns, legacy_rows.get(key), crow)
                position = crow.position if crow is not None else tomb.get(key)
                verdict = dg.judge(
                    diff, caught_up=caught_up, commerce_position=position, snapshot_lsn=snapshot_lsn
                )
                tracker.record(key, verdict, diff)
            if tracker.done or time.monotonic() >= deadline:
                break
        counts = {"missing": 0, "extra": 0, "different": 0}
        samples: dict[str, list[dict[str, object]]] = {}
        for diff in tracker.confirmed.values():
            kind = "extra" if diff.kind == "deleted_in_source" else diff.kind
            counts[kind] += 1
            self.sample(samples, kind, diff)
        for diff in tracker.unresolved():
            self.sample(samples, "unresolved", diff)
        rep.missing, rep.extra, rep.different = (
            counts["missing"],
            counts["extra"],
            counts["different"],
        )
        rep.unresolved = len(tracker.open)
        rep.transient = len(tracker.matched)
        rep.samples = samples
        rep.recheck = (
            f"{len(state.candidates)} candidate keys rechecked: {len(tracker.confirmed)} "
            f"persistent, {rep.transient} were lag, {rep.unresolved} unresolved at the deadline"
        )

    def sample(
        self, samples: dict[str, list[dict[str, object]]], kind: str, diff: dg.KeyDiff
    ) -> None:
        bucket = samples.setdefault(kind, [])
        if len(bucket) < self.options.sample_keys:
            entry = diff.to_json()
            entry["key"] = [_jsonable(v) for v in diff.key]
            bucket.append(entry)

    def settle(self, state: _TableState, deadline: float) -> None:
        """Turn first-pass candidates into the table's final figures (step 3)."""
        rep = state.report
        extra_first = sum(1 for d in state.candidates if d.kind in ("extra", "deleted_in_source"))
        rep.rows_compared = rep.legacy_rows + extra_first
        if not state.candidates:
            rep.matching = state.first_pass_matching
            return
        if len(state.candidates) > self.options.max_recheck_keys:
            samples: dict[str, list[dict[str, object]]] = {}
            for d in state.candidates:
                kind = "extra" if d.kind == "deleted_in_source" else d.kind
                setattr(rep, kind, getattr(rep, kind) + 1)
                self.sample(samples, kind, d)
            rep.samples = samples
            rep.matching = state.first_pass_matching
            rep.recheck = (
                f"skipped: {len(state.candidates)} differing keys exceed max_recheck_keys "
                f"({self.options.max_recheck_keys}); first-pass figures stand"
            )
            return
        self.recheck(state, deadline)
        rep.matching = state.first_pass_matching + rep.transient

    # -- invariants -----------------------------------------------------------------------------

    def invariants(self, tables: Sequence[TableMapping], deadline: float) -> list[InvariantReport]:
        in_scope = {t.target_table for t in tables}
        schema = self.mapping.target_schema
        reports: list[InvariantReport] = []
        for inv in INVARIANTS:
            if not set(inv.tables) <= in_scope:
                continue
            domain = self.mapping.by_target(inv.tables[0]).domain
            query = inv.build(schema)
            first = _query(self.commerce, "target", query)
            rep = InvariantReport(inv.name, domain, inv.description)
            if first:
                # A violation seen while the consumers were mid-way is re-read after they passed
                # the current source position; only one present both times counts.
                lsn = current_lsn(self.legacy)
                self.wait_applied(domain, lsn, deadline)
                again = _query(self.commerce, "target", query)
                seen = {r[0] for r in first}
                still = [r for r in again if r[0] in seen]
                rep.violations = len(still)
                rep.samples = [
                    {"key": _jsonable(r[0]), "detail": str(r[1])}
                    for r in still[: self.options.sample_keys]
                ]
            reports.append(rep)
        return reports


def _jsonable(value: object) -> object:
    if isinstance(value, int | str | bool) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------
# Scenario invariants (DESIGN §3), on the commerce tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invariant:
    """A check on commerce returning (key, detail) of each violating row."""

    name: str
    description: str
    tables: tuple[str, ...]  # target tables it needs (the first one's domain owns it)
    build: Callable[[str], sql.Composed]


INVOICE_LINK_PREFIX = "https://commerce.example/invoices/"


def _order_total_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT o.order_id, 'total_minor ' || o.total_minor || ', lines sum ' || "
        "COALESCE(l.s, 0) FROM {orders} AS o LEFT JOIN (SELECT order_id, "
        "sum(quantity::numeric * unit_price_minor) AS s FROM {lines} GROUP BY order_id) AS l "
        "ON l.order_id = o.order_id WHERE o.total_minor <> COALESCE(l.s, 0) "
        "ORDER BY o.order_id LIMIT 1000"
    ).format(orders=sql.Identifier(schema, "orders"), lines=sql.Identifier(schema, "order_lines"))


def _settled_payment_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT p.payment_id, 'amount_minor ' || p.amount_minor || ', order ' || p.order_id "
        "|| ' total_minor ' || COALESCE(o.total_minor::text, 'none (no such order)') "
        "FROM {payments} AS p "
        "LEFT JOIN {orders} AS o ON o.order_id = p.order_id "
        "WHERE p.state = 'SETTLED' AND p.amount_minor IS DISTINCT FROM o.total_minor "
        "ORDER BY p.payment_id LIMIT 1000"
    ).format(payments=sql.Identifier(schema, "payments"), orders=sql.Identifier(schema, "orders"))


def _invoice_link_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT invoice_id, link FROM {invoices} WHERE NOT starts_with(link, {prefix}) "
        "ORDER BY invoice_id LIMIT 1000"
    ).format(invoices=sql.Identifier(schema, "invoices"), prefix=sql.Literal(INVOICE_LINK_PREFIX))


INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "order_total",
        "order total_minor = Σ quantity × unit_price_minor of its lines",
        ("orders", "order_lines"),
        _order_total_sql,
    ),
    Invariant(
        "settled_payment_amount",
        "a settled payment's amount_minor = its order's total_minor",
        ("payments", "orders"),
        _settled_payment_sql,
    ),
    Invariant(
        "invoice_link",
        f"every invoice link starts with {INVOICE_LINK_PREFIX}",
        ("invoices",),
        _invoice_link_sql,
    ),
)


# ---------------------------------------------------------------------------------------------
# Runs: create, resume, finish
# ---------------------------------------------------------------------------------------------


def _runs(settings: Settings) -> sql.Identifier:
    return sql.Identifier(settings.target.control_schema, "verify_runs")


def _find_resumable(
    conn: Conn, settings: Settings, resume: int | bool, tables: list[str]
) -> tuple[int, dict[str, list[dg.KeyRange]], int] | None:
    q = sql.SQL(
        "SELECT run_id, tables, plan, source_lsn_start FROM {} WHERE status <> 'finished' "
        "{} ORDER BY run_id DESC LIMIT 1"
    ).format(
        _runs(settings),
        sql.SQL("AND run_id = %s") if not isinstance(resume, bool) else sql.SQL(""),
    )
    params = [] if isinstance(resume, bool) else [resume]
    rows = _query(conn, "target", q, params)
    if not rows:
        if not isinstance(resume, bool):
            raise UsageError(f"verify run {resume} does not exist or is already finished")
        return None
    run_id, run_tables, plan, lsn = rows[0]
    if sorted(run_tables) != sorted(tables):
        raise UsageError(
            f"verify run {run_id} covered tables {', '.join(run_tables)}; resume it with the "
            "same --domain/--table, or start a new run without --resume"
        )
    ranges = {t: [dg.KeyRange.from_json(r) for r in rs] for t, rs in plan.items()}
    return int(run_id), ranges, int(lsn or 0)


def _done_chunks(
    conn: Conn, settings: Settings, run_id: int
) -> dict[str, dict[int, tuple[Any, ...]]]:
    rows = _query(
        conn,
        "target",
        sql.SQL(
            "SELECT source_table, chunk_no, legacy_rows, commerce_rows, absent_rows, matching, "
            "candidates FROM {} WHERE run_id = %s"
        ).format(sql.Identifier(settings.target.control_schema, "verify_chunks")),
        [run_id],
    )
    out: dict[str, dict[int, tuple[Any, ...]]] = {}
    for table, no, lrows, crows, absent, matching, cands in rows:
        out.setdefault(table, {})[int(no)] = (
            int(lrows),
            int(crows),
            int(absent),
            int(matching),
            cands,
        )
    return out


def run_verify(
    settings: Settings,
    mapping: MappingSpec,
    *,
    domain: str | None = None,
    table: str | None = None,
    resume: int | bool = False,
    actor: str = "unknown",
    options: VerifyOptions | None = None,
    progress: VerifyProgress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> VerifyReport:
    """Run verify (steps 1-5 of the module doc) and store the result; never raises on mismatch:
    the caller decides (the command raises :class:`~cutover.errors.VerifyMismatch`)."""
    options = options or VerifyOptions()
    tables, covered = select_tables(mapping, domain, table)
    names = [t.source_table for t in tables]
    started = time.monotonic()
    v = _Verifier(settings, mapping, options, progress, sleep)
    run_id: int | None = None
    try:
        ensure_control_plane(v.control, settings.target.control_schema)
        states = [
            _TableState(v.sides_of(t), [], TableReport(t.source_table, t.target_table, t.domain))
            for t in tables
        ]
        # (1) a run row with the chunk plan, or the run being resumed
        found = _find_resumable(v.control, settings, resume, names) if resume else None
        resumed = found is not None
        done: dict[str, dict[int, tuple[Any, ...]]] = {}
        total = 0
        # The rate counts planning (min/max/count per table) too: it is part of the pass.
        t_first = time.monotonic()
        if found is not None:
            run_id, plan, lsn_start = found
            done = _done_chunks(v.control, settings, run_id)
            for st in states:
                st.ranges = plan[st.report.table]
            total = sum(_plan_total(v, st) for st in states)
            _exec(
                v.control,
                "target",
                sql.SQL("UPDATE {} SET status = 'running' WHERE run_id = %s").format(
                    _runs(settings)
                ),
                [run_id],
            )
        else:
            lsn_start = current_lsn(v.legacy)
            for st in states:
                st.ranges, table_rows = v.plan(st.sides)
                total += table_rows
            plan_json = {st.report.table: [r.to_json() for r in st.ranges] for st in states}
            created = _query(
                v.control,
                "target",
                sql.SQL(
                    "INSERT INTO {} (domain, tables, domains, actor, options, plan, "
                    "source_lsn_start) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING run_id"
                ).format(_runs(settings)),
                [
                    domain,
                    names,
                    covered,
                    actor,
                    json.dumps(options.to_json()),
                    json.dumps(plan_json, default=str),
                    lsn_start,
                ],
            )
            run_id = int(created[0][0])
        log.info("verify.started", run_id=run_id, tables=names, domains=covered, resumed=resumed)
        # (2) first pass
        if progress is not None:
            progress.start(total)
        for st in states:
            v.first_pass(run_id, st, done.get(st.report.table, {}))
        first_pass_s = time.monotonic() - t_first
        # (3) recheck the candidates, lag-aware, within one overall deadline
        if progress is not None and any(st.candidates for st in states):
            progress.phase("rechecking differing keys after the consumers catch up")
        deadline = time.monotonic() + options.recheck_timeout_s
        for st in states:
            v.settle(st, deadline)
        # (4) invariants
        invariants = v.invariants(tables, time.monotonic() + options.recheck_timeout_s)
        applied = {d: v.positions.applied(d) for d in sorted({t.domain for t in tables})}
        lsn_end = current_lsn(v.legacy)
        report = VerifyReport(
            run_id=run_id,
            domains=covered,
            tables=[st.report for st in states],
            invariants=invariants,
            source_lsn_start=lsn_start,
            source_lsn_end=lsn_end,
            applied_lsn=applied,
            first_pass_s=first_pass_s,
            elapsed_s=time.monotonic() - started,
            resumed=resumed,
        )
        # (5) store the result for the gates
        _exec(
            v.control,
            "target",
            sql.SQL(
                "UPDATE {} SET status = 'finished', passed = %s, failed_domains = %s, "
                "figures = %s, source_lsn_end = %s, finished_at = now() WHERE run_id = %s"
            ).format(_runs(settings)),
            [report.passed, report.failed_domains, json.dumps(report.to_json()), lsn_end, run_id],
        )
        log.info(
            "verify.finished",
            run_id=run_id,
            passed=report.passed,
            failed_domains=report.failed_domains,
            rows=report.legacy_rows,
            rows_per_s=round(report.rows_per_s()),
            elapsed_s=round(report.elapsed_s, 3),
        )
        return report
    except BaseException as exc:
        if run_id is not None:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
            with contextlib.suppress(DatabaseError):  # the original error is the one to report
                _exec(
                    v.control,
                    "target",
                    sql.SQL(
                        "UPDATE {} SET status = %s WHERE run_id = %s AND status = 'running'"
                    ).format(_runs(settings)),
                    [status, run_id],
                )
            log.warning("verify.stopped", run_id=run_id, status=status, resume=f"--resume {run_id}")
        raise
    finally:
        v.close()


def _plan_total(v: _Verifier, st: _TableState) -> int:
    rows = _query(
        v.legacy, "source", sql.SQL("SELECT count(*) FROM {}").format(st.sides.legacy.relation)
    )
    return int(rows[0][0])


def latest_runs(conn: Conn, control_schema: str, limit: int = 10) -> list[dict[str, Any]]:
    """The latest finished verify runs, newest first (for status)."""
    rows = _query(
        conn,
        "target",
        sql.SQL(
            "SELECT run_id, domains, failed_domains, passed, finished_at, "
            "EXTRACT(EPOCH FROM now() - finished_at)::float8, source_lsn_start, source_lsn_end "
            "FROM {} WHERE status = 'finished' ORDER BY finished_at DESC LIMIT %s"
        ).format(sql.Identifier(control_schema, "verify_runs")),
        [limit],
    )
    keys = (
        "run_id",
        "domains",
        "failed_domains",
        "passed",
        "finished_at",
        "age_s",
        "lsn_start",
        "lsn_end",
    )
    return [dict(zip(keys, r, strict=True)) for r in rows]


# ---------------------------------------------------------------------------------------------
# Seeding commerce from legacy through the mapping (tests, benchmarks, sandboxes)
# ---------------------------------------------------------------------------------------------


def copy_mapped_rows(
    source_dsn: str,
    target_dsn: str,
    mapping: MappingSpec,
    tables: Sequence[TableMapping] | None = None,
) -> dict[str, int]:
    """Load commerce with the legacy rows mapped by SQL (``source_sql``), bypassing Kafka.

    For sandboxes, tests and benchmarks: one ``COPY (SELECT mapped...) TO STDOUT`` on legacy
    streamed into ``COPY ... FROM STDIN`` on commerce, per table, rows the mapping deletes left
    out, ``_src_lsn`` = the legacy WAL position before the copy and ``_src_seq`` 0. Returns rows
    copied per target table.
    """
    copied: dict[str, int] = {}
    with connect(source_dsn, "source") as src, connect(target_dsn, "target") as dst:
        lsn = current_lsn(src)
        for table in tables or list(mapping.tables.values()):
            types = target_column_types(dst, mapping.target_schema, table.target_table)
            sides = dg.build_sides(
                table,
                source_schema=mapping.source_schema,
                target_schema=mapping.target_schema,
                target_types=types,
            )
            out_q = sql.SQL(
                "COPY (SELECT {vals}, {lsn}, 0 FROM {rel} AS r WHERE NOT {deleted}) TO STDOUT"
            ).format(
                vals=sql.SQL(", ").join(sides.legacy.values),
                lsn=sql.Literal(lsn),
                rel=sides.legacy.relation,
                deleted=sides.legacy.deleted,
            )
            in_q = sql.SQL("COPY {rel} ({cols}) FROM STDIN").format(
                rel=sides.commerce.relation,
                cols=sql.SQL(", ").join(
                    sql.Identifier(c) for c in (*sides.columns, "_src_lsn", "_src_seq")
                ),
            )
            try:
                with dst.transaction(), src.cursor() as scur, dst.cursor() as dcur:
                    with scur.copy(out_q) as out, dcur.copy(in_q) as inp:
                        for block in out:
                            inp.write(block)
                    copied[table.target_table] = dcur.rowcount
                dst.execute(sql.SQL("ANALYZE {}").format(sides.commerce.relation))
            except psycopg.Error as exc:
                raise _db_error(exc, "target", f"copying {table.source_table}") from None
    return copied
