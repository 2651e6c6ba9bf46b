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
4. The scenario invariants the mapping file declares (``[invariants.NAME]``) are checked, those
   on commerce re-read once after a catch-up wait, so a transient state never counts.
5. The result is stored in ``verify_runs`` (passed, figures per table, the LSNs it holds for);
   the switch-reads gate reads it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from control import digest as dg
from control.verify_engine import TableState, Verifier
from control.verify_explain import schema_drift
from control.verify_io import (
    Conn,
    connect,
    copy_mapped_rows,
    current_lsn,
    run_exec,
    run_query,
    target_column_types,
)
from control.verify_report import (
    InvariantReport,
    TableReport,
    VerifyOptions,
    VerifyProgress,
    VerifyReport,
)
from cutover.config import Settings
from cutover.control_store import ensure_control_plane
from cutover.errors import CutoverError, DatabaseError, UsageError
from cutover.logging import get_logger
from cutover.mapping import MappingSpec, TableMapping

__all__ = [
    "InvariantReport",
    "TableReport",
    "VerifyOptions",
    "VerifyProgress",
    "VerifyReport",
    "connect",
    "copy_mapped_rows",
    "current_lsn",
    "latest_runs",
    "prepared_verifier",
    "run_verify",
    "select_tables",
    "target_column_types",
]

log = get_logger("control.verify")


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
    rows = run_query(conn, "target", q, params)
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
    rows = run_query(
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


@dataclass(slots=True)
class _Run:
    """The run row being worked on: created, or found to resume (step 1)."""

    run_id: int
    lsn_start: int
    resumed: bool
    total_rows: int
    done: dict[str, dict[int, tuple[Any, ...]]]


def _open_run(
    v: Verifier,
    states: Sequence[TableState],
    *,
    domain: str | None,
    covered: list[str],
    actor: str,
    resume: int | bool,
) -> _Run:
    """Step 1: a run row with the chunk plan, or the run being resumed (plan, chunks done)."""
    settings, names = v.settings, [st.report.table for st in states]
    found = _find_resumable(v.control, settings, resume, names) if resume else None
    if found is not None:
        run_id, plan, lsn_start = found
        for st in states:
            st.ranges = plan[st.report.table]
        total = sum(_plan_total(v, st) for st in states)
        run_exec(
            v.control,
            "target",
            sql.SQL("UPDATE {} SET status = 'running' WHERE run_id = %s").format(_runs(settings)),
            [run_id],
        )
        return _Run(run_id, lsn_start, True, total, _done_chunks(v.control, settings, run_id))
    lsn_start = current_lsn(v.legacy)
    total = 0
    for st in states:
        st.ranges, table_rows = v.plan(st.sides)
        total += table_rows
    plan_json = {st.report.table: [r.to_json() for r in st.ranges] for st in states}
    created = run_query(
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
            json.dumps(v.options.to_json()),
            json.dumps(plan_json, default=str),
            lsn_start,
        ],
    )
    return _Run(int(created[0][0]), lsn_start, False, total, {})


def _compare(
    v: Verifier, run: _Run, states: Sequence[TableState]
) -> tuple[float, list[InvariantReport]]:
    """Steps 2-4: the first pass, the lag-aware recheck of its candidates (one overall
    deadline), the invariants. Returns the first pass's duration and the invariant reports."""
    progress, options = v.progress, v.options
    t_first = time.monotonic()
    if progress is not None:
        progress.start(run.total_rows)
    for st in states:
        v.first_pass(run.run_id, st, run.done.get(st.report.table, {}))
    first_pass_s = time.monotonic() - t_first
    if progress is not None and any(st.candidates for st in states):
        progress.phase("rechecking differing keys after the consumers catch up")
    deadline = time.monotonic() + options.recheck_timeout_s
    for st in states:
        v.settle(st, deadline)
    return first_pass_s, v.invariants(states, time.monotonic() + options.recheck_timeout_s)


def _finish_run(v: Verifier, report: VerifyReport) -> None:
    """Step 5: the result stored for the gates."""
    run_exec(
        v.control,
        "target",
        sql.SQL(
            "UPDATE {} SET status = 'finished', passed = %s, failed_domains = %s, "
            "figures = %s, source_lsn_end = %s, finished_at = now() WHERE run_id = %s"
        ).format(_runs(v.settings)),
        [
            report.passed,
            report.failed_domains,
            json.dumps(report.to_json()),
            report.source_lsn_end,
            report.run_id,
        ],
    )
    log.info(
        "verify.finished",
        run_id=report.run_id,
        passed=report.passed,
        failed_domains=report.failed_domains,
        rows=report.legacy_rows,
        rows_per_s=round(report.rows_per_s()),
        elapsed_s=round(report.elapsed_s, 3),
    )


def _mark_stopped(v: Verifier, run_id: int, exc: BaseException) -> None:
    """A run that did not finish says so (and how to resume it)."""
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
    with contextlib.suppress(DatabaseError):  # the original error is the one to report
        run_exec(
            v.control,
            "target",
            sql.SQL("UPDATE {} SET status = %s WHERE run_id = %s AND status = 'running'").format(
                _runs(v.settings)
            ),
            [status, run_id],
        )
    log.warning("verify.stopped", run_id=run_id, status=status, resume=f"--resume {run_id}")


@contextlib.contextmanager
def prepared_verifier(
    settings: Settings, mapping: MappingSpec, domain: str | None = None
) -> Iterator[Verifier]:
    """A :class:`Verifier` set up ahead of its run (``run_verify(..., verifier=...)``): its three
    connections open and its position reader's Kafka client started and asked once for the
    domain's topic. None of that is part of the proof (every query of the run still runs when
    the run runs); it is the fixed cost of a run, about a second on a loaded machine, which the
    write switch pays before its fence instead of inside the write window."""
    v = Verifier(settings, mapping, VerifyOptions(), None, time.sleep)
    try:
        tables, _covered = select_tables(mapping, domain, None)
        for d in sorted({t.domain for t in tables}):
            with contextlib.suppress(CutoverError, psycopg.Error):  # the run reads it again
                v.positions.applied(d)
        yield v
    finally:
        v.close()


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
    verifier: Verifier | None = None,
) -> VerifyReport:
    """Run verify (steps 1-5 of the module doc) and store the result; never raises on mismatch:
    the caller decides (the command raises :class:`~cutover.errors.VerifyMismatch`).

    ``verifier``: one from :func:`prepared_verifier` (default options), used for this run and
    left open for its owner to close."""
    options = options or VerifyOptions()
    tables, covered = select_tables(mapping, domain, table)
    started = time.monotonic()
    own = verifier is None
    v = Verifier(settings, mapping, options, progress, sleep) if verifier is None else verifier
    run: _Run | None = None
    try:
        ensure_control_plane(v.control, settings.target.control_schema)
        # Step 0: a table whose schema drifted from the mapping is reported, not digested.
        drifted: list[TableReport] = []
        states: list[TableState] = []
        for t in tables:
            rep = TableReport(t.source_table, t.target_table, t.domain)
            drift = schema_drift(v.legacy, v.commerce, mapping, t)
            if drift:
                rep.drift = [{**d.to_json(), "text": str(d)} for d in drift]
                log.warning("verify.drift", table=t.source_table, drift=[str(d) for d in drift])
                drifted.append(rep)
            else:
                states.append(TableState(v.sides_of(t), [], rep))
        # The rate counts planning (min/max/count per table) too: it is part of the pass.
        t_plan = time.monotonic()
        run = _open_run(v, states, domain=domain, covered=covered, actor=actor, resume=resume)
        log.info(
            "verify.started",
            run_id=run.run_id,
            tables=[t.source_table for t in tables],
            domains=covered,
            resumed=run.resumed,
        )
        planning_s = time.monotonic() - t_plan
        first_pass_s, invariants = _compare(v, run, states)
        applied = {d: v.positions.applied(d) for d in sorted({t.domain for t in tables})}
        report = VerifyReport(
            run_id=run.run_id,
            domains=covered,
            tables=[st.report for st in states] + drifted,
            invariants=invariants,
            source_lsn_start=run.lsn_start,
            source_lsn_end=current_lsn(v.legacy),
            applied_lsn=applied,
            first_pass_s=planning_s + first_pass_s,
            elapsed_s=time.monotonic() - started,
            resumed=run.resumed,
        )
        _finish_run(v, report)
        return report
    except BaseException as exc:
        if run is not None:
            _mark_stopped(v, run.run_id, exc)
        raise
    finally:
        if own:
            v.close()


def _plan_total(v: Verifier, st: TableState) -> int:
    rows = run_query(
        v.legacy, "source", sql.SQL("SELECT count(*) FROM {}").format(st.sides.legacy.relation)
    )
    return int(rows[0][0])


def latest_runs(conn: Conn, control_schema: str, limit: int = 10) -> list[dict[str, Any]]:
    """The latest finished verify runs, newest first (for status)."""
    rows = run_query(
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
