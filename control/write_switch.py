"""The steps of the write transitions (DESIGN §11, docs/CUTOVER.md): what ``switch-writes``,
``rollback-writes`` and ``complete`` do between their intent and their publication.

:func:`control.machine.execute` writes the intent (the domain enters ``switching_writes``,
``rolling_back_writes`` or ``completing``), then calls :meth:`WriteSteps.before_publish`, then
publishes the target state. Each step records itself in the transition's row (``step``,
``step_detail``) when it is done, so ``status`` says where a killed command stopped, and the next
run of the same command does the steps again from the first (every step is idempotent: raising a
raised fence re-reads its LSN, lowering a lowered one is a no-op) or the mirror command undoes
them. **switch-writes D**:

1. ``fence_legacy``: raise legacy's fence of D (its fence table lives in legacy's control schema
   ``cutover``, next to the producer's tables); the fence LSN is past every write legacy took;
2. ``drain_forward``: wait until the forward appliers applied up to the fence LSN
   (:class:`control.positions.PositionReader`), at most ``drain_timeout_s``;
3. ``verify``: the verify ``cutover verify --domain D`` runs; a difference refuses (exit 1);
4. ``reverse_ready``: the reverse slot exists on commerce and its producer's heartbeat is fresh;
   commerce's WAL position is recorded as the reverse start;
5. ``open_commerce``: lower commerce's fence of D; then the machine publishes writes_switched.

A failure before the publication lowers the legacy fence again and abandons the transition: D is
back in ``reads_switched`` (its version unchanged: no reader saw the transition) and the error
names the step. Legacy stays fenced from step 1 until that undo, and commerce is opened only at
step 5, so no moment has both sides writable while any reader follows ``writes_switched``.

**rollback-writes D** mirrors it (fence commerce, drain the reverse stream into legacy, verify,
lower legacy's fence); abandoning an unpublished switch-writes only lowers legacy's fence.
**complete D** keeps legacy's fence raised (read-only history), drops D's commerce tables from the
reverse publication and, for the last domain, the forward slot and publication on legacy.
After the publication :meth:`WriteSteps.after_publish` measures the write-unavailability window
(fence raised → published, in ms) for the audit record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from control.machine import RULES, CrashForTest, StepContext
from control.positions import PositionReader
from control.verify import prepared_verifier, run_verify
from control.verify_engine import Verifier
from cutover import fence, pg
from cutover.config import Settings
from cutover.control_store import (
    COMPLETED,
    LEGACY_SCHEMA,
    READS_SWITCHED,
    ROLLING_BACK_WRITES,
    SWITCHING_WRITES,
    WRITES_SWITCHED,
    Conn,
    ControlStore,
    abandon_transition,
    load_states,
    record_step,
)
from cutover.control_store import producer as producer_state
from cutover.errors import CutoverError, RuntimeFailure, VerifyMismatch
from cutover.logging import get_logger
from cutover.mapping import MappingSpec

__all__ = [
    "DRAIN_TIMEOUT_S",
    "LEGACY_FENCE_SCHEMA",
    "ReversePath",
    "WriteSteps",
    "domain_tables",
    "install_fences",
    "reverse_path",
]

log = get_logger("control.write_switch")
_T = TypeVar("_T")

#: Legacy's fence lives in legacy's control schema (the producer's, fixed ``cutover``): one
#: schema the cutover owns there, whatever ``[reverse] control_schema`` says.
LEGACY_FENCE_SCHEMA = LEGACY_SCHEMA
#: How long step 2 waits for the appliers to pass the fence LSN before it gives up (undoing).
DRAIN_TIMEOUT_S = 60.0
#: How often step 2 re-reads the appliers' positions while the fence is up.
DRAIN_POLL_S = 0.025

Tables = dict[str, list[tuple[str, str]]]


def domain_tables(mapping: MappingSpec) -> tuple[Tables, Tables]:
    """``domain -> [(schema, table)]`` on legacy and on commerce, from the mapping."""
    legacy: Tables = {}
    commerce: Tables = {}
    for domain in mapping.domains:
        for t in mapping.tables_of(domain):
            legacy.setdefault(domain, []).append((mapping.source_schema, t.source_table))
            commerce.setdefault(domain, []).append((mapping.target_schema, t.target_table))
    return legacy, commerce


def install_fences(settings: Settings, mapping: MappingSpec) -> list[tuple[str, str, str]]:
    """``cutover init``: the fence (lowered) on every domain table of legacy and of commerce.

    Idempotent: a fence already raised stays raised. A table that does not exist yet (commerce
    before its DDL is loaded) is skipped and reported: the next init fences it. Returns
    ``(object, status, detail)`` rows for init's report.
    """
    legacy_tables, commerce_tables = domain_tables(mapping)
    # A legacy table that also holds columns commerce never takes (the social profile of
    # shop.users) is fenced for UPDATEs of the mapped columns only: the legacy social app keeps
    # writing its own columns once the domain's writes live in commerce.
    narrowed = {
        (mapping.source_schema, t.source_table): sorted(t.source_columns_used())
        for t in mapping.tables.values()
        if t.exclude
    }
    rows: list[tuple[str, str, str]] = []
    sides = (
        (settings.source.dsn, LEGACY_FENCE_SCHEMA, legacy_tables, "source", "legacy"),
        (
            settings.target.dsn,
            settings.target.control_schema,
            commerce_tables,
            "target",
            "commerce",
        ),
    )
    for dsn, schema, tables, side, name in sides:
        with pg.connect(dsn, side=side, application_name="cutover-init") as conn:
            present = {d: [t for t in ts if _exists(conn, t)] for d, ts in tables.items()}
            fence.install(
                conn,
                schema,
                present,
                side=side,
                update_columns=narrowed if name == "legacy" else None,
            )
        missing = [
            f"{s}.{t}" for d, ts in tables.items() for s, t in ts if (s, t) not in present[d]
        ]
        n = sum(len(t) for t in present.values())
        rows.append((f"write fence on {name}", "ensured", f"{n} tables, {schema}.write_fence"))
        if missing:
            rows.append(
                (
                    f"write fence on {name}",
                    "missing",
                    "not fenced (no such table yet): " + ", ".join(missing),
                )
            )
    return rows


def _exists(conn: Conn, table: tuple[str, str]) -> bool:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL", list(table)
    ).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True, slots=True)
class ReversePath:
    """Whether the reverse path (commerce → legacy) is ready, and why (the gate's evidence)."""

    ready: bool | None = None
    slot_exists: bool | None = None
    why: str = "not checked"
    heartbeat_age_s: float | None = None


def reverse_path(settings: Settings, commerce: Conn) -> ReversePath:
    """The reverse slot exists on commerce and the reverse producer's heartbeat (commerce's
    producer_state, slot ``[reverse] slot``) is younger than ``max_heartbeat_age_s``."""
    slot = settings.reverse.slot
    try:
        row = commerce.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s "
            "AND database = current_database()",
            [slot],
        ).fetchone()
        if row is None:
            why = f"reverse slot {slot} does not exist on commerce: run `cutover init`"
            return ReversePath(False, False, why)
        store = ControlStore(commerce, settings.target.control_schema, "target")
        beat = (
            producer_state.read_heartbeat(store, slot) if store.exists("producer_state") else None
        )
    except (psycopg.Error, CutoverError) as exc:
        return ReversePath(False, None, f"could not check the reverse path: {_first_line(exc)}")
    limit = settings.gates.max_heartbeat_age_s
    hint = "is `cutover produce --reverse` running?"
    if beat is None or beat.age_s is None:
        return ReversePath(
            False, True, f"no heartbeat of the reverse producer (slot {slot}): {hint}"
        )
    if beat.age_s > limit:
        why = f"the reverse producer's heartbeat is {beat.age_s:.0f} s old (limit {limit:g} s)"
        why += f": {hint}"
        return ReversePath(False, True, why, beat.age_s)
    return ReversePath(
        True, True, f"reverse slot {slot} exists, heartbeat {beat.age_s:.1f} s ago", beat.age_s
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _StepFailed(Exception):
    """A step failed: carries the step's name and the error to re-raise after the undo."""

    def __init__(self, step: str, cause: CutoverError) -> None:
        super().__init__(step)
        self.step = step
        self.cause = cause


class WriteSteps:
    """:class:`control.machine.Steps` of the three write actions (the module doc)."""

    def __init__(
        self,
        settings: Settings,
        mapping: MappingSpec,
        *,
        actor: str,
        drain_timeout_s: float | None = None,
        verify: Callable[[str], tuple[bool, int | None]] | None = None,
    ) -> None:
        self.settings = settings
        self.mapping = mapping
        self.actor = actor
        # Read at run time (not as a default argument) so that a test can shorten it.
        self.drain_timeout_s = DRAIN_TIMEOUT_S if drain_timeout_s is None else drain_timeout_s
        self.verify = verify or self._run_verify
        self.detail: dict[str, Any] = {}
        self._sides: dict[int, tuple[str, str]] = {}
        self._verifier: Verifier | None = None

    # -- connections ------------------------------------------------------------------------

    def _legacy(self) -> Conn:
        conn = pg.connect(
            self.settings.source.dsn, side="source", application_name="cutover-write-switch"
        )
        self._sides[id(conn)] = (LEGACY_FENCE_SCHEMA, "source")
        return conn

    def _commerce(self) -> Conn:
        conn = pg.connect(
            self.settings.target.dsn, side="target", application_name="cutover-write-switch"
        )
        self._sides[id(conn)] = (self.settings.target.control_schema, "target")
        return conn

    # -- the protocol -------------------------------------------------------------------------

    def before_publish(self, conn: Conn, ctx: StepContext) -> None:
        self.detail = dict(ctx.current.step_detail) if ctx.resumed else {}
        if ctx.resumed and ctx.current.published:
            return  # every step was done before the publication; routers already follow it
        run = {
            "switch_writes": self._switch_writes,
            "rollback_writes": self._rollback_writes,
            "complete": self._complete,
        }[ctx.action]
        try:
            run(conn, ctx)
        except _StepFailed as failed:
            self._undo(conn, ctx, failed)
            cause = failed.cause
            what = f"{ctx.action.replace('_', '-')} {ctx.domain} failed at step {failed.step}"
            undone = f"undone: {ctx.domain} stays {ctx.from_state}"
            message = f"{what}: {cause.message} ({undone})"
            if isinstance(cause, VerifyMismatch):
                raise VerifyMismatch(message) from None
            raise RuntimeFailure(message) from None

    def after_publish(self, conn: Conn, ctx: StepContext) -> dict[str, Any]:
        """The write-unavailability window: from the fence going up to the publication; the
        fenced side's refusals then name the state reached, not the in-flight one."""
        published = time.time()  # the window ends here: relabelling the fence is not part of it
        fenced_side = self._commerce if ctx.action == "rollback_writes" else self._legacy
        with fenced_side() as side_conn:
            schema, side = self._where(side_conn)
            fence.note_state(side_conn, schema, ctx.domain, state=RULES[ctx.action].to, side=side)
        out = dict(self.detail)
        fenced_at = out.get("fenced_at")
        if isinstance(fenced_at, int | float):
            out["window_ms"] = round((published - fenced_at) * 1000)
            out["steps_ms"] = {**out.get("steps_ms", {}), "published": out["window_ms"]}
        return out

    def _step(
        self, conn: Conn, ctx: StepContext, step: str, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Record that ``step`` is done (and what it found, and when: ``steps_ms``, ms since the
        fence went up, the bench's per-step breakdown of the window); the crash point after it."""
        self.detail.update(detail or {})
        recorded = dict(detail or {})
        fenced_at = self.detail.get("fenced_at")
        if isinstance(fenced_at, int | float):
            # The whole map each time: the row merges step_detail shallowly (jsonb ||).
            steps = dict(self.detail.get("steps_ms") or {})
            steps[step] = _since_ms(fenced_at)
            self.detail["steps_ms"] = recorded["steps_ms"] = steps
        schema = self.settings.target.control_schema
        try:
            with conn.transaction():
                record_step(conn, schema, ctx.transition_id, step, recorded)
        except psycopg.Error as exc:
            raise pg.translate(exc, f"recording step {step} of {ctx.domain}", "target") from None
        log.info("cutover.write_step", domain=ctx.domain, action=ctx.action, step=step)
        if ctx.crash_at is not None and ctx.crash_at == _CRASH_AFTER.get(step):
            raise CrashForTest(ctx.crash_at)

    def _undo(self, conn: Conn, ctx: StepContext, failed: _StepFailed) -> None:
        """Before the publication: lower the fence this transition raised, back to from_state."""
        d, schema = ctx.domain, self.settings.target.control_schema
        if ctx.action == "switch_writes":
            with self._legacy() as legacy:
                self._open(legacy, d, READS_SWITCHED)
        elif ctx.action == "rollback_writes" and ctx.from_state == WRITES_SWITCHED:
            with self._commerce() as commerce:
                self._open(commerce, d, WRITES_SWITCHED)
        why = f"step {failed.step} failed: {failed.cause.message}"
        try:
            with conn.transaction():
                abandon_transition(
                    conn, schema, d, ctx.transition_id, state=ctx.from_state, why=why
                )
        except psycopg.Error as exc:
            raise pg.translate(exc, f"abandoning the transition of {d}", "target") from None
        log.warning("cutover.write_step_failed", domain=d, action=ctx.action, step=failed.step)

    def _where(self, conn: Conn) -> tuple[str, str]:
        """(fence schema, side) of a connection :meth:`_legacy` or :meth:`_commerce` opened."""
        return self._sides[id(conn)]

    def _close(self, conn: Conn, domain: str, state: str, ctx: StepContext) -> int:
        """Raise the fence of ``domain`` on ``conn``'s database; its fence LSN."""
        schema, side = self._where(conn)
        why = f"{ctx.action.replace('_', '-')} {ctx.transition_id}"
        return fence.raise_fence(conn, schema, domain, state=state, reason=why, side=side)

    def _open(self, conn: Conn, domain: str, state: str) -> None:
        """Lower the fence of ``domain`` on ``conn``'s database."""
        schema, side = self._where(conn)
        fence.lower_fence(conn, schema, domain, state=state, side=side)

    # -- switch-writes ------------------------------------------------------------------------

    def _switch_writes(self, conn: Conn, ctx: StepContext) -> None:
        d = ctx.domain
        with (
            self._legacy() as legacy,
            self._commerce() as commerce,
            self._positions(legacy, commerce, d, reverse=False) as reader,
            self._verify_ready(d),
        ):
            lsn = self._guarded(
                "fence_legacy", lambda: self._close(legacy, d, SWITCHING_WRITES, ctx)
            )
            # A resume keeps the first fence time: the window is what writers felt.
            fenced_at = self.detail.get("fenced_at", time.time())
            self._step(conn, ctx, "fence_legacy", {"fence_lsn": lsn, "fenced_at": fenced_at})
            self._guarded("drain_forward", lambda: self._drain(reader, d, lsn))
            self._step(conn, ctx, "drain_forward")
            self._verified(conn, ctx)
            start = self._guarded("reverse_ready", lambda: self._reverse_ready(commerce))
            self._step(conn, ctx, "reverse_ready", {"reverse_start_lsn": start})
            self._guarded("open_commerce", lambda: self._open(commerce, d, WRITES_SWITCHED))
            self._step(conn, ctx, "open_commerce")

    def _reverse_ready(self, commerce: Conn) -> int:
        path = reverse_path(self.settings, commerce)
        if not path.ready:
            raise RuntimeFailure(path.why)
        row = commerce.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
        assert row is not None
        return int(row[0])

    # -- rollback-writes ----------------------------------------------------------------------

    def _rollback_writes(self, conn: Conn, ctx: StepContext) -> None:
        d = ctx.domain
        with self._legacy() as legacy, self._commerce() as commerce:
            if ctx.from_state == READS_SWITCHED:
                # Undoing a switch-writes no reader ever followed: commerce never took D's
                # writes, so unfencing legacy is all there is to do.
                self._guarded("open_legacy", lambda: self._open(legacy, d, READS_SWITCHED))
                self._step(conn, ctx, "open_legacy")
                return
            with (
                self._positions(legacy, commerce, d, reverse=True) as reader,
                self._verify_ready(d),
            ):
                self._rollback_fenced(conn, ctx, legacy, commerce, reader)

    def _rollback_fenced(
        self, conn: Conn, ctx: StepContext, legacy: Conn, commerce: Conn, reader: PositionReader
    ) -> None:
        """rollback-writes from writes_switched: fence commerce, drain the reverse stream into
        legacy, verify, reopen legacy (the module doc)."""
        d = ctx.domain
        lsn = self._guarded(
            "fence_commerce", lambda: self._close(commerce, d, ROLLING_BACK_WRITES, ctx)
        )
        fenced_at = self.detail.get("fenced_at", time.time())
        self._step(conn, ctx, "fence_commerce", {"fence_lsn": lsn, "fenced_at": fenced_at})
        self._guarded("drain_reverse", lambda: self._drain(reader, d, lsn))
        self._step(conn, ctx, "drain_reverse")
        self._verified(conn, ctx)
        self._guarded("open_legacy", lambda: self._open(legacy, d, READS_SWITCHED))
        self._step(conn, ctx, "open_legacy")

    # -- complete -----------------------------------------------------------------------------

    def _complete(self, conn: Conn, ctx: StepContext) -> None:
        d = ctx.domain
        others = [
            s for n, s in load_states(conn, self.settings.target.control_schema).items() if n != d
        ]
        last = all(s.state == COMPLETED for s in others)
        with self._legacy() as legacy, self._commerce() as commerce:
            if last:
                self._guarded("forward_slot_idle", lambda: self._slot_idle(legacy))
            # Legacy's tables of D stay fenced for good; the label says why.
            self._guarded("fence_legacy", lambda: self._close(legacy, d, COMPLETED, ctx))
            self._step(conn, ctx, "fence_legacy")
            dropped = self._guarded("stop_reverse", lambda: self._unpublish(commerce, d))
            self._step(conn, ctx, "stop_reverse", {"unpublished": dropped})
            if last:
                self._guarded("drop_forward", lambda: self._drop_forward(legacy))
                self._step(conn, ctx, "drop_forward", {"dropped_forward": True})

    def _slot_idle(self, legacy: Conn) -> None:
        row = legacy.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
            [self.settings.source.slot],
        ).fetchone()
        if row is not None and row[0]:
            raise RuntimeFailure(
                f"the forward slot {self.settings.source.slot} is active: this is the last "
                "domain, completing it drops the slot; stop `cutover produce` first"
            )

    def _unpublish(self, commerce: Conn, domain: str) -> list[str]:
        """Drop D's commerce tables from the reverse publication (those it still holds)."""
        pub = self.settings.reverse.publication
        rows = commerce.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            [pub],
        ).fetchall()
        published = {(str(s), str(t)) for s, t in rows}
        ours = [x for x in domain_tables(self.mapping)[1].get(domain, []) if x in published]
        if ours:
            commerce.execute(
                sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                    sql.Identifier(pub), sql.SQL(", ").join(sql.Identifier(*x) for x in ours)
                )
            )
        return [f"{s}.{t}" for s, t in ours]

    def _drop_forward(self, legacy: Conn) -> None:
        src = self.settings.source
        legacy.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND database = current_database()",
            [src.slot],
        )
        legacy.execute(
            sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(src.publication))
        )

    # -- shared steps -------------------------------------------------------------------------

    def _guarded(self, step: str, work: Callable[[], _T]) -> _T:
        """Run ``work``; any failure becomes :class:`_StepFailed` naming ``step``."""
        try:
            return work()
        except CutoverError as exc:
            raise _StepFailed(step, exc) from exc
        except psycopg.Error as exc:
            raise _StepFailed(step, pg.translate(exc, f"step {step}", "target")) from exc

    def _verified(self, conn: Conn, ctx: StepContext) -> None:
        passed, run_id = self._guarded("verify", lambda: self.verify(ctx.domain))
        if not passed:
            raise _StepFailed(
                "verify",
                VerifyMismatch(
                    f"the final verify of {ctx.domain} (run {run_id}) found differences: "
                    f"`cutover verify --domain {ctx.domain}` shows them"
                ),
            )
        self._step(conn, ctx, "verify", {"verify_run": run_id})

    @contextmanager
    def _verify_ready(self, domain: str) -> Iterator[None]:
        """Step 3's verifier set up BEFORE the fence (:func:`control.verify.prepared_verifier`:
        connections, Kafka client); the verify itself, every query of it, runs at step 3."""
        if self.verify != self._run_verify:  # a test's own verify: nothing to prepare
            yield
            return
        with prepared_verifier(self.settings, self.mapping, domain) as verifier:
            self._verifier = verifier
            try:
                yield
            finally:
                self._verifier = None

    def _run_verify(self, domain: str) -> tuple[bool, int | None]:
        report = run_verify(
            self.settings, self.mapping, domain=domain, actor=self.actor, verifier=self._verifier
        )
        return report.passed, report.run_id

    @contextmanager
    def _positions(
        self, legacy: Conn, commerce: Conn, domain: str, *, reverse: bool
    ) -> Iterator[PositionReader]:
        """The drain's position reader, made and read once BEFORE the fence: its Kafka consumer
        (connection, metadata) is then warm and the drain's first poll inside the window costs
        a poll, not a client start-up. A failure of this warm-up is the drain's own, found
        again inside the window (the fence goes up either way; the drain decides)."""
        reader = PositionReader(self.settings, self.mapping, legacy, commerce, reverse=reverse)
        try:
            with suppress(CutoverError, psycopg.Error):
                reader.applied(domain)
            yield reader
        finally:
            reader.close()

    def _drain(self, reader: PositionReader, domain: str, lsn: int) -> int:
        """Wait until the appliers of ``domain`` (forward or reverse) applied up to ``lsn``."""
        deadline = time.monotonic() + self.drain_timeout_s
        applied: int | None = None
        while True:
            applied = reader.applied(domain)
            if applied is not None and applied >= lsn:
                return applied
            if time.monotonic() >= deadline:
                break
            # Short: the window waits for this poll, and a poll is a few indexed reads.
            time.sleep(DRAIN_POLL_S)
        reverse = reader.reverse
        which = "reverse" if reverse else "forward"
        run = "cutover apply --reverse" if reverse else "cutover apply"
        raise RuntimeFailure(
            f"the {which} appliers of {domain} did not reach the fence LSN {_lsn(lsn)} within "
            f"{self.drain_timeout_s:g} s (applied: {'none' if applied is None else _lsn(applied)})"
            f": is `{run}` running?"
        )


def _since_ms(started: float) -> int:
    return round((time.time() - started) * 1000)


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


#: The crash point (fault tests) after each recorded step.
_CRASH_AFTER: Mapping[str, str] = {
    "fence_legacy": "after_fence",
    "fence_commerce": "after_fence",
    "drain_forward": "after_drain",
    "drain_reverse": "after_drain",
    "verify": "after_verify",
    "reverse_ready": "after_reverse",
    "open_commerce": "after_open",
    "open_legacy": "after_open",
}
