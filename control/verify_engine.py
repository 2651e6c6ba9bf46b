"""The engine of ``cutover verify`` (:mod:`control.verify` runs it): per table, the first pass of
chunk digests bisected down to differing keys (step 2), the lag-aware recheck of those keys
(step 3) and the scenario invariants (step 4); both databases queried in parallel."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from control import digest as dg
from control import verify_explain as ex
from control.positions import PositionReader
from control.verify_io import (
    Conn,
    connect,
    current_lsn,
    run_query,
    table_exists,
    target_column_types,
)
from control.verify_report import (
    InvariantReport,
    TableReport,
    VerifyOptions,
    VerifyProgress,
    jsonable,
)
from cutover import pg
from cutover.config import Settings
from cutover.errors import DatabaseError
from cutover.logging import get_logger
from cutover.mapping import Invariant, MappingSpec, TableMapping

__all__ = ["TableState", "Verifier"]

log = get_logger("control.verify")


@dataclass
class TableState:
    sides: dg.TableSides
    ranges: list[dg.KeyRange]
    report: TableReport
    candidates: list[dg.KeyDiff] = field(default_factory=list)
    first_pass_matching: int = 0
    #: Keys of legacy rows the mapping cannot map (left out of every comparison).
    unmappable: list[dg.Key] = field(default_factory=list)


class Verifier:
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
            run_query, self.commerce, "target", commerce_q, commerce_params
        )
        try:
            left = run_query(self.legacy, "source", legacy_q, legacy_params)
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
        boundaries = [tuple(r) for r in run_query(self.legacy, "source", bq)]
        total = int(run_query(self.legacy, "source", count_q)[0][0])
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
        self, run_id: int, state: TableState, done: Mapping[int, tuple[Any, ...]]
    ) -> None:
        rep = state.report
        t0 = time.monotonic()
        for no, rng in enumerate(state.ranges):
            if no in done:
                lrows, crows, absent, matching, cands = done[no]
                diffs = [dg.KeyDiff.from_json(c) for c in cands]
            else:
                sides, bad, (dl, dc) = self.chunk_digests(state, rng)
                lrows, crows, absent = dl.rows, dc.rows, dl.absent
                if dl.same(dc):
                    matching, diffs = dl.rows, []
                else:
                    matching, diffs = self.bisect(sides, rng, dl, dc)
                if not bad:  # a chunk with unmappable rows is redone on resume: fail closed
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

    def chunk_digests(
        self, state: TableState, rng: dg.KeyRange
    ) -> tuple[dg.TableSides, list[ex.Unmappable], tuple[dg.Digest, dg.Digest]]:
        """The digests of ``rng`` and the sides they were taken with: the table's, or (when
        legacy's mapped values fail to compute) the table's without the rows that cannot map,
        which are reported."""
        try:
            return state.sides, [], self.digests(state.sides, rng)
        except DatabaseError as exc:
            if not ex.is_data_error(exc):
                raise
        bad = ex.find_unmappable(self.legacy, state.sides, rng)
        if not bad:  # the failure came and went (a row changed meanwhile): digest as usual
            return state.sides, [], self.digests(state.sides, rng)
        rep = state.report
        rep.unmappable += len(bad)
        for u in bad:
            state.unmappable.append(u.key)
            if len(rep.unmappable_samples) < self.options.sample_keys:
                rep.unmappable_samples.append(
                    {"key": [jsonable(v) for v in u.key], "columns": list(u.columns)}
                )
        log.warning(
            "verify.unmappable",
            table=rep.table,
            keys=[[jsonable(v) for v in u.key] for u in bad[:20]],
            columns=sorted({c for u in bad for c in u.columns}),
        )
        sides = ex.without_keys(state.sides, [u.key for u in bad])
        return sides, bad, self.digests(sides, rng)

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
            raise pg.translate(exc, "storing verify progress", "target") from None

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
            for row in run_query(conn, side_name, q, arrays):
                fetched = dg.split_row(row, n)
                out[fetched.key] = fetched
        return out

    def tombstones(self, target_table: str, keys: Sequence[dg.Key]) -> dict[dg.Key, int]:
        if not keys or not table_exists(self.control, "target", self.control_schema, "tombstones"):
            return {}
        texts = {json.dumps(list(k), ensure_ascii=False, default=str): k for k in keys}
        rows = run_query(
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
            raise pg.translate(exc, "re-reading legacy rows", "source") from None
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

    def recheck(self, state: TableState, deadline: float) -> None:
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
            entry["key"] = [jsonable(v) for v in diff.key]
            bucket.append(entry)

    def settle(self, state: TableState, deadline: float) -> None:
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

    def invariants(self, states: Sequence[TableState], deadline: float) -> list[InvariantReport]:
        """The scenario's invariants (the mapping file's [invariants.NAME]) over the tables
        compared (a drifted table is not: its invariants could only fail on the schema)."""
        tables = [st.sides.table for st in states]
        scope = {
            "target": {t.target_table for t in tables},
            "source": {t.source_table for t in tables},
        }
        # Commerce invariants are also run over legacy mapped (rows that cannot map left out).
        mapped = {
            st.sides.table.target_table: ex.without_keys(st.sides, st.unmappable) for st in states
        }
        reports: list[InvariantReport] = []
        for inv in self.mapping.invariants:
            if not set(inv.tables) <= scope[inv.side]:
                continue
            rep = InvariantReport(inv.name, inv.domain, inv.description)
            if inv.side == "source":
                # Legacy is the truth and is read in one snapshot: nothing to wait for.
                still = run_query(self.legacy, "source", inv.build(self.mapping.source_schema))
            else:
                query = inv.build(self.mapping.target_schema)
                still = run_query(self.commerce, "target", query)
                if still:
                    # A violation seen while the consumers were mid-way is re-read after they
                    # passed the current source position; only one present both times counts.
                    self.wait_applied(inv.domain, current_lsn(self.legacy), deadline)
                    seen = {r[0] for r in still}
                    still = [r for r in run_query(self.commerce, "target", query) if r[0] in seen]
                still = self.legacy_breaks(rep, inv, mapped, still)
            rep.violations = len(still)
            rep.samples = [
                {"key": jsonable(r[0]), "detail": str(r[1])}
                for r in still[: self.options.sample_keys]
            ]
            reports.append(rep)
        return reports

    def legacy_breaks(
        self,
        rep: InvariantReport,
        inv: Invariant,
        mapped: Mapping[str, dg.TableSides],
        commerce_rows: list[tuple[Any, ...]],
    ) -> list[tuple[Any, ...]]:
        """Record in ``rep`` the violations legacy (mapped) already holds; return commerce's
        violations that are commerce's own (the key does not break the rule on legacy)."""
        on_legacy = run_query(self.legacy, "source", ex.legacy_invariant_query(inv, mapped))
        rep.legacy_violations = len(on_legacy)
        rep.legacy_samples = [
            {"key": jsonable(r[0]), "detail": str(r[1])}
            for r in on_legacy[: self.options.sample_keys]
        ]
        if on_legacy:
            log.warning(
                "verify.legacy_invariant",
                invariant=inv.name,
                violations=len(on_legacy),
                keys=[jsonable(r[0]) for r in on_legacy[:20]],
            )
        legacy_keys = {r[0] for r in on_legacy}
        return [r for r in commerce_rows if r[0] not in legacy_keys]
