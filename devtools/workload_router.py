"""The workload writing through the router (``cutover workload --router``).

The same deterministic plan as :mod:`devtools.workload`, but every transaction first asks the
router (:meth:`cutover.routing.ReadRouter.write_database_for`) where its domain's writes go and
runs there:

* **legacy**: the planned statements, as in the plain mode;
* **commerce**: the same transaction expressed on the commerce schema. Each legacy statement has
  a declared effect (:data:`EFFECTS`: table, key or filter, columns it sets); the row it would
  have produced on legacy is rebuilt from the commerce row (the mapping's inverse,
  :func:`~cutover.mapping.engine.map_row_reverse`), changed as the statement says, and written
  back through the forward mapping (:func:`~cutover.mapping.engine.map_row`), so the values are
  exactly the ones the pipeline would have produced. Columns commerce does not hold (the social
  ones) are never written there.

A transaction the write fence refuses (SQLSTATE 25006, :func:`cutover.fence.is_fence_refusal`)
had no effect, by the fence's contract: it is retried after a short backoff, asking the router
again, until it commits somewhere. So every planned transaction is applied exactly once, in plan
order, and a plain run of the same prefix of the plan (same seed, same starting rows) is the
oracle of what the two databases hold together. Due transactions bound for legacy go in one
pipeline, as in the plain mode; a refusal inside it is located from the cursors' statuses (the
ones before it committed, the ones after it never ran and wait behind its retry). A transaction
bound for commerce runs alone (it reads the rows it changes first).

One domain per transaction: every operation of the plan writes the tables of one domain only
(orders with their lines, payments and invoices; a merchant with its listings; a user), so it is
always one transaction on one side. An operation that wrote two domains would be refused
(:class:`~cutover.errors.UsageError`) rather than split silently: an application must do the
same (docs/CUTOVER.md, "Apps during the write switch").
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final, Protocol

import psycopg
from psycopg import sql

from cutover import fence
from cutover.errors import DatabaseError, UsageError
from cutover.logging import get_logger
from cutover.mapping import MappingSpec
from cutover.mapping.engine import is_delete, map_row, map_row_reverse, target_key
from cutover.mapping.model import TableMapping
from devtools import workload as w

__all__ = [
    "EFFECTS",
    "CommerceWriter",
    "Effect",
    "WriteRouter",
    "operation_domain",
    "run_routed_workload",
    "unheld_writes",
]

Conn = psycopg.Connection[Any]
#: ``fn(old value, parameter) -> new value`` of one column an UPDATE sets.
Setter = Callable[[Any, Any], Any]


class WriteRouter(Protocol):
    """What the workload needs of a router (a :class:`cutover.routing.ReadRouter`)."""

    def write_database_for(self, domain: str) -> str: ...


def _param(_old: Any, new: Any) -> Any:
    return new


def _followers(old: Any, delta: Any) -> Any:
    return max(old + delta, 0)


def _reprice(old: Any, percent: Any) -> Any:
    # numeric(14,2) := price * percent / 100: exact in decimal, rounded half away from zero.
    return (Decimal(old) * percent / 100).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class Effect:
    """What one legacy statement does, in terms commerce can replay.

    ``insert``: ``columns`` name the parameters in order. ``update``: ``sets`` are (column,
    setter) consuming the first parameters in order (``None``: a literal value, no parameter),
    then ``where`` names the remaining parameters (equality); ``where_live`` adds the
    ``status = 'live'`` filter. ``delete``: ``where`` names every parameter.
    """

    table: str
    kind: str  # insert | update | delete
    columns: tuple[str, ...] = ()
    sets: tuple[tuple[str, Setter | Any], ...] = ()
    where: tuple[str, ...] = ("id",)
    where_live: bool = False

    def split(self, params: Sequence[Any]) -> tuple[dict[str, Setter], dict[str, Any]]:
        """The setters bound to their parameters, and the WHERE values."""
        bound: dict[str, Setter] = {}
        i = 0
        for column, how in self.sets:
            if callable(how):
                bound[column] = _bind(how, params[i])
                i += 1
            else:
                bound[column] = _bind(_param, how)
        where = dict(zip(self.where, params[i:], strict=True))
        return bound, where


def _bind(fn: Setter, value: Any) -> Setter:
    return lambda old, _unused: fn(old, value)


def _upd(
    table: str,
    *sets: str | tuple[str, Setter | Any],
    where: tuple[str, ...] = ("id",),
    where_live: bool = False,
) -> Effect:
    pairs = tuple((s, _param) if isinstance(s, str) else s for s in sets)
    return Effect(table, "update", sets=pairs, where=where, where_live=where_live)


def _ins(table: str, text: str) -> Effect:
    cols = text.split("(", 1)[1].split(")", 1)[0]
    return Effect(table, "insert", columns=tuple(c.strip() for c in cols.split(",")))


#: The effect of every statement the plan writes (keyed by its constant text).
EFFECTS: Final[Mapping[str, Effect]] = {
    w.INSERT_USER: _ins("users", w.INSERT_USER),
    w.UPDATE_USER_PROFILE: _upd("users", "display_name", "bio", "updated_at"),
    w.UPDATE_USER_FOLLOWERS: _upd("users", ("follower_count", _followers), "updated_at"),
    w.UPDATE_USER_HANDLE: _upd("users", "handle", "updated_at"),
    w.UPDATE_USER_CONTACT: _upd("users", "email", "phone", "updated_at"),
    w.INSERT_MERCHANT: _ins("merchants", w.INSERT_MERCHANT),
    w.UPDATE_MERCHANT_STATUS: _upd("merchants", "status", "updated_at"),
    w.UPDATE_MERCHANT_RATING: _upd("merchants", "rating", "updated_at"),
    w.HIDE_MERCHANT_PRODUCTS: _upd(
        "products", ("status", "hidden"), "updated_at", where=("merchant_id",), where_live=True
    ),
    w.INSERT_PRODUCT: _ins("products", w.INSERT_PRODUCT),
    w.UPDATE_PRODUCT_PRICE: _upd("products", "price_idr", "updated_at"),
    w.UPDATE_PRODUCT_STOCK: _upd("products", "stock", "updated_at"),
    w.UPDATE_PRODUCT_STATUS: _upd("products", "status", "updated_at"),
    w.UPDATE_PRODUCT_TITLE: _upd("products", "title", "updated_at"),
    w.UPDATE_PRODUCT_DESCRIPTION: _upd("products", "description", "updated_at"),
    w.DELETE_PRODUCT: Effect("products", "delete"),
    w.BULK_REPRICE: _upd(
        "products", ("price_idr", _reprice), "updated_at", where=("merchant_id",), where_live=True
    ),
    w.INSERT_ORDER: _ins("orders", w.INSERT_ORDER),
    w.UPDATE_ORDER_STATUS: _upd("orders", "status", "updated_at"),
    w.UPDATE_ORDER_TOTAL: _upd("orders", "total_idr", "updated_at"),
    w.INSERT_ITEM: _ins("order_items", w.INSERT_ITEM),
    w.UPDATE_ITEM_QTY: _upd("order_items", "qty", where=("order_id", "line_no")),
    w.DELETE_ITEM: Effect("order_items", "delete", where=("order_id", "line_no")),
    w.INSERT_PAYMENT: _ins("payments", w.INSERT_PAYMENT),
    w.UPDATE_PAYMENT_AMOUNT: _upd("payments", "amount_idr"),
    w.UPDATE_PAYMENT_STATUS: _upd("payments", "status"),
    w.SETTLE_PAYMENT: _upd("payments", ("status", "settled"), "provider_ref", "paid_at"),
    w.INSERT_INVOICE: _ins("invoices", w.INSERT_INVOICE),
}


def operation_domain(op: w.Operation, mapping: MappingSpec) -> str:
    """The one domain whose tables ``op`` writes (UsageError if it writes two)."""
    domains = {mapping.tables[EFFECTS[text].table].domain for text, _params in op.statements}
    if len(domains) != 1:
        raise UsageError(
            f"workload transaction #{op.seq} ({op.kind}) writes domains {sorted(domains)}: in "
            "router mode a transaction must stay within one domain (split it per domain)"
        )
    return domains.pop()


def unheld_writes(op: w.Operation, mapping: MappingSpec) -> int:
    """How many statements of ``op`` write a column commerce does not hold (social data).

    On commerce that part of the write has nowhere to go: commerce has no such column, and the
    domain's legacy tables are fenced (docs/CUTOVER.md, "Apps during the write switch").
    """
    count = 0
    for text, params in op.statements:
        effect = EFFECTS[text]
        used = mapping.tables[effect.table].source_columns_used()
        if effect.kind == "insert":
            written = [c for c, v in zip(effect.columns, params, strict=True) if v is not None]
        else:
            written = [c for c, _how in effect.sets]
        count += any(c not in used for c in written)
    return count


# ---------------------------------------------------------------------------------------------
# Commerce: a legacy transaction replayed through the mapping
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TableSql:
    select: sql.Composed  # by target key, FOR UPDATE
    select_by: Callable[[str], sql.Composed]  # by one target column, FOR UPDATE
    update: Callable[[Sequence[str]], sql.Composed]
    insert: Callable[[Sequence[str]], sql.Composed]
    delete: sql.Composed


def _table_sql(schema: str, tm: TableMapping) -> _TableSql:
    rel = sql.Identifier(schema, tm.target_table)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in tm.target_columns)
    by_key = sql.SQL(" AND ").join(
        sql.SQL("{} = %s").format(sql.Identifier(c)) for c in tm.target_key
    )

    def select_by(column: str) -> sql.Composed:
        return sql.SQL("SELECT {} FROM {} WHERE {} = %s ORDER BY 1 FOR UPDATE").format(
            cols, rel, sql.Identifier(column)
        )

    def update(names: Sequence[str]) -> sql.Composed:
        sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(n)) for n in names)
        return sql.SQL("UPDATE {} SET {} WHERE {}").format(rel, sets, by_key)

    def insert(names: Sequence[str]) -> sql.Composed:
        # _src_lsn/_src_seq record the source position of the last *replicated* write; a row
        # an application wrote on commerce has none: 0 (older than any replicated change).
        return sql.SQL("INSERT INTO {} ({}, _src_lsn, _src_seq) VALUES ({}, 0, 0)").format(
            rel,
            sql.SQL(", ").join(sql.Identifier(n) for n in names),
            sql.SQL(", ").join(sql.Placeholder() * len(names)),
        )

    return _TableSql(
        select=sql.SQL("SELECT {} FROM {} WHERE {} FOR UPDATE").format(cols, rel, by_key),
        select_by=select_by,
        update=update,
        insert=insert,
        delete=sql.SQL("DELETE FROM {} WHERE {}").format(rel, by_key),
    )


class CommerceWriter:
    """Runs the effect of legacy statements on commerce, inside the caller's transaction."""

    def __init__(self, mapping: MappingSpec) -> None:
        self.mapping = mapping
        self._sql = {
            name: _table_sql(mapping.target_schema, tm) for name, tm in mapping.tables.items()
        }

    def apply(self, conn: Conn, text: str, params: Sequence[Any]) -> None:
        effect = EFFECTS[text]
        tm = self.mapping.tables[effect.table]
        q = self._sql[effect.table]
        if effect.kind == "insert":
            row = dict(zip(effect.columns, params, strict=True))
            if not is_delete(tm, row):
                target = map_row(tm, row)
                conn.execute(q.insert(list(target)), list(target.values()))
            return
        setters, where = effect.split(params)
        for current in self._rows(conn, tm, q, effect, where):
            key = target_key(tm, current)
            if effect.kind == "delete":
                conn.execute(q.delete, key)
                continue
            for column, setter in setters.items():
                if column in current:
                    current[column] = setter(current[column], None)
                elif column in tm.source_columns_used():  # pragma: no cover - mapping bug
                    raise UsageError(f"{tm.source_table}.{column} has no inverse on commerce")
                # else: a column commerce never holds (social data): nothing to write there
            if is_delete(tm, current):
                conn.execute(q.delete, key)
            else:
                target = map_row(tm, current)
                conn.execute(q.update(list(target)), [*target.values(), *key])

    def _rows(
        self, conn: Conn, tm: TableMapping, q: _TableSql, effect: Effect, where: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The legacy rows the statement's WHERE selects, rebuilt from commerce (locked)."""
        names = tm.target_columns
        if tuple(where) == tm.primary_key:
            found = conn.execute(q.select, target_key(tm, where)).fetchall()
        else:
            ((column, value),) = where.items()
            found = conn.execute(q.select_by(_target_of(tm, column)), [value]).fetchall()
        rows = []
        for values in found:
            legacy = map_row_reverse(tm, dict(zip(names, values, strict=True)))
            if effect.where_live and legacy.get("status") != "live":
                continue
            rows.append({**legacy, **{k: v for k, v in where.items() if k not in legacy}})
        return rows


def _target_of(tm: TableMapping, source: str) -> str:
    """The commerce column holding legacy ``source`` unchanged (a copy or rename)."""
    for column in tm.columns:
        if column.kind == "copy" and column.source == source:
            return column.target
    raise UsageError(f"{tm.source_table}.{source} is not copied to commerce as is")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    retries: int = 0
    refused_transactions: int = 0
    max_wait_s: float = 0.0
    refused_seqs: list[int] | None = None
    written: dict[str, dict[str, int]] | None = None
    first_commerce_seq: dict[str, int] | None = None
    unheld_writes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "retries": self.retries,
            "refused_transactions": self.refused_transactions,
            "max_retry_wait_s": round(self.max_wait_s, 3),
            "refused_seqs": self.refused_seqs or [],
            "written": self.written or {},
            "first_commerce_seq": self.first_commerce_seq or {},
            "unheld_column_writes": self.unheld_writes,
        }


class AbortedPipelineNoise(logging.Filter):
    """Drops psycopg's warning "error ignored terminating <Pipeline>: pipeline aborted".

    psycopg logs it when a pipeline is left after a statement in it failed: the statements
    queued after the failure were skipped. After a fence refusal that is the expected outcome
    (the transaction is retried where the router says), and it is counted in the report; on
    stderr it read as a fault. Any other warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            str(record.msg).startswith("error ignored terminating")
            and isinstance(args, tuple)
            and len(args) == 2
            and isinstance(args[1], psycopg.errors.PipelineAborted)
        )


class _Sides:
    """One autocommit connection per side; a transaction per planned operation."""

    def __init__(self, legacy_dsn: str, commerce_dsn: str, mapping: MappingSpec) -> None:
        self.dsn = {"legacy": legacy_dsn, "commerce": commerce_dsn}
        self.conn: dict[str, Conn] = {}
        self.writer = CommerceWriter(mapping)
        psycopg_log = logging.getLogger("psycopg")
        if not any(isinstance(f, AbortedPipelineNoise) for f in psycopg_log.filters):
            psycopg_log.addFilter(AbortedPipelineNoise())

    def connect(self, side: str) -> Conn:
        conn = self.conn.get(side)
        if conn is None or conn.closed:
            if side == "legacy":  # checks the shop schema, says how to fix a missing one
                conn = w._connect(self.dsn[side])
            else:
                try:
                    conn = psycopg.connect(self.dsn[side], autocommit=True, connect_timeout=10)
                except psycopg.OperationalError as exc:
                    raise DatabaseError(
                        f"cannot connect to the commerce database {w._where(self.dsn[side])}",
                        side="target",
                        sqlstate=exc.sqlstate,
                    ) from None
            self.conn[side] = conn
        return conn

    def run(self, side: str, op: w.Operation) -> None:
        """One transaction on ``side``; a planned rollback ends in ROLLBACK.

        Pipeline mode, as the plain workload: BEGIN, the statements and COMMIT go in one round
        trip (on commerce, each read of a row to change is one more). After an error the
        connection is dropped (:meth:`_discard`): the retry runs on a new one.
        """
        conn = self.connect(side)
        try:
            with conn.pipeline():
                cur = conn.cursor()
                cur.execute("BEGIN")
                for text, params in op.statements:
                    if side == "legacy":
                        cur.execute(text, params, prepare=True)
                    else:
                        self.writer.apply(conn, text, params)
                cur.execute("ROLLBACK" if op.rollback else "COMMIT")
        except psycopg.Error:
            self._discard(side)
            raise

    def _discard(self, side: str) -> None:
        """Drop ``side``'s connection after an error inside a pipeline; the next use reconnects.

        Not a ROLLBACK on the same connection: the server skips every command queued after the
        error, PREPAREs included, while psycopg's prepared-statement cache may still count them
        as prepared, so a later batch would run a statement name the server never prepared
        (SQLSTATE 26000, seen after a fence refusal under load). Errors are rare (a fence
        refusal during a switch), so a new connection costs nothing that matters.
        """
        conn = self.conn.pop(side, None)
        if conn is not None:
            conn.close()

    def run_batch(self, ops: Sequence[w.Operation]) -> int:
        """Run ``ops`` on legacy, each its own transaction, in one pipeline (one round trip).

        Returns how many ran: all of them, or the index of the one the write fence refused
        (those before it committed; it and the ones after it had no effect). Any other error
        goes up.
        """
        conn = self.connect("legacy")
        cursors: list[psycopg.Cursor[Any]] = []
        try:
            with conn.pipeline():
                for op in ops:
                    cur = conn.cursor()
                    cursors.append(cur)
                    cur.execute("BEGIN")
                    for text, params in op.statements:
                        cur.execute(text, params, prepare=True)
                    cur.execute("ROLLBACK" if op.rollback else "COMMIT")
        except psycopg.Error as exc:
            self._discard("legacy")
            if not fence.is_fence_refusal(exc):
                raise
            # A transaction that ended has its last status (COMMIT or ROLLBACK) on its cursor;
            # the refused one stopped before, the ones after it were skipped (or not even sent:
            # psycopg may raise while the batch is still being sent).
            for i, op in enumerate(ops):
                ended = i < len(cursors) and cursors[i].statusmessage == (
                    "ROLLBACK" if op.rollback else "COMMIT"
                )
                if not ended:
                    return i
            raise
        return len(ops)

    def close(self) -> None:
        for conn in self.conn.values():
            conn.close()


#: At most this many due transactions bound for legacy go in one pipeline (one round trip).
_BATCH_MAX: Final = 50


def run_routed_workload(
    router: WriteRouter,
    legacy_dsn: str,
    commerce_dsn: str,
    mapping: MappingSpec,
    *,
    rate: float,
    duration: float | None = None,
    seed: int = 1,
    max_transactions: int | None = None,
    bulk_every: int = w.BULK_EVERY,
    backoff_s: float = 0.02,
    give_up_s: float = 60.0,
    stop: Callable[[], bool] | None = None,
    progress: w.ProgressCallback | None = None,
) -> w.WorkloadReport:
    """Run the plan for ``seed`` through ``router``; the report's ``router`` part counts retries.

    Transaction ``i`` is due at ``t0 + i / rate`` (as in :func:`devtools.workload.run_workload`).
    Transactions run in plan order: a refused one blocks the ones behind it, as a real writer's
    would, so the oracle holds. ``stop`` ends the run early between batches. A transaction
    refused for longer than ``give_up_s`` is an error (the switch is stuck).
    """
    if not (rate > 0 and math.isfinite(rate)):
        raise UsageError(f"--rate must be a positive number, not {rate:g}")
    if duration is None and max_transactions is None:
        raise UsageError("give a duration or a number of transactions to run")
    sides = _Sides(legacy_dsn, commerce_dsn, mapping)
    run = _Runner(router, sides, mapping, backoff_s=backoff_s, give_up_s=give_up_s)
    behind = 0.0
    try:
        start = w.read_start_state(sides.connect("legacy"))
        plan = w.plan_operations(seed, start, bulk_every=bulk_every)
        t0 = time.monotonic()
        deadline = t0 + duration if duration is not None else math.inf
        limit = max_transactions if max_transactions is not None else math.inf
        last_progress = t0
        while True:
            now = time.monotonic()
            if run.done >= limit or now >= deadline or (stop is not None and stop()):
                break
            due = min(limit, math.floor((now - t0) * rate) + 1) - run.done
            if due <= 0:
                time.sleep(min(t0 + run.done / rate, deadline) - now)
                continue
            behind = max(behind, now - (t0 + run.done / rate))
            run.step(plan, int(min(due, _BATCH_MAX)))
            if progress is not None and now - last_progress >= 0.2:
                last_progress = now
                progress(w.WorkloadProgress(run.done, max_transactions, now - t0))
        elapsed = time.monotonic() - t0
    except psycopg.Error as exc:
        raise DatabaseError(
            f"workload transaction #{run.done + 1} (router mode) failed: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            side="source",
            sqlstate=exc.sqlstate,
        ) from None
    finally:
        sides.close()
    report = w.WorkloadReport(
        seed=seed,
        rate_asked=rate,
        duration_asked_s=duration,
        max_transactions=max_transactions,
        transactions=run.done,
        committed=run.committed,
        rolled_back=run.rolled_back,
        statements=run.statements,
        elapsed_s=elapsed,
        achieved_rate=run.done / elapsed if elapsed > 0 else 0.0,
        max_behind_s=behind,
        counts={k: v for k, v in run.counts.items() if v},
        start=start.summary(),
        router=run.tally.to_dict(),
    )
    get_logger("devtools.workload").info(
        "workload.finished", transactions=run.done, mode="router", retries=run.tally.retries
    )
    return report


class _Runner:
    """Runs the plan's transactions in order where the router says, and counts what happened."""

    def __init__(
        self,
        router: WriteRouter,
        sides: _Sides,
        mapping: MappingSpec,
        *,
        backoff_s: float,
        give_up_s: float,
    ) -> None:
        self.router = router
        self.sides = sides
        self.mapping = mapping
        self.backoff_s = backoff_s
        self.give_up_s = give_up_s
        self.tally = _Tally(refused_seqs=[], written={}, first_commerce_seq={})
        self.counts: dict[str, int] = dict.fromkeys(w.KINDS, 0)
        self.committed = self.rolled_back = self.statements = self.done = 0
        #: Planned transactions taken from the plan but not run yet (a batch cut short).
        self.pending: deque[tuple[w.Operation, str]] = deque()

    def step(self, plan: Iterator[w.Operation], n: int) -> None:
        """Run up to ``n`` transactions: a pipelined batch of those whose writes go to legacy,
        or one whose writes go to commerce (reads of the rows it changes come first)."""
        batch: list[tuple[w.Operation, str]] = []
        while len(batch) < n:
            if self.pending:
                op, domain = self.pending.popleft()
            else:
                op = next(plan)
                domain = operation_domain(op, self.mapping)
            if self.router.write_database_for(domain) != "legacy":
                if batch:
                    self.pending.appendleft((op, domain))
                    break
                self._record(op, domain, self._run_one(op, domain))
                return
            batch.append((op, domain))
        ran = self.sides.run_batch([op for op, _domain in batch])
        for op, domain in batch[:ran]:
            self._record(op, domain, "legacy")
        if ran < len(batch):
            # Transaction `ran` was refused by the fence; the ones after it never ran (the
            # pipeline skips everything after an error): they wait behind its retry.
            self.pending.extendleft(reversed(batch[ran + 1 :]))
            op, domain = batch[ran]
            self._record(op, domain, self._run_one(op, domain, refused_at=time.monotonic()))

    def _record(self, op: w.Operation, domain: str, side: str) -> None:
        tally = self.tally
        assert tally.written is not None and tally.first_commerce_seq is not None
        tally.written.setdefault(domain, {"legacy": 0, "commerce": 0})[side] += 1
        if side == "commerce":
            tally.first_commerce_seq.setdefault(domain, op.seq)
            if not op.rollback:
                tally.unheld_writes += unheld_writes(op, self.mapping)
        self.counts[op.kind] += 1
        self.statements += len(op.statements)
        self.rolled_back += op.rollback
        self.committed += not op.rollback
        self.done += 1

    def _refused(self, op: w.Operation, first: float | None, now: float) -> float:
        """Count one refusal of ``op``; returns when it was first refused."""
        tally = self.tally
        if first is None:
            tally.refused_transactions += 1
            assert tally.refused_seqs is not None
            tally.refused_seqs.append(op.seq)
            first = now
        tally.retries += 1
        time.sleep(self.backoff_s)
        return first

    def _run_one(self, op: w.Operation, domain: str, *, refused_at: float | None = None) -> str:
        """Run ``op`` where the router says, retrying fence refusals; returns the side."""
        first = None if refused_at is None else self._refused(op, None, refused_at)
        while True:
            side = self.router.write_database_for(domain)
            try:
                self.sides.run(side, op)
            except psycopg.Error as exc:
                if not fence.is_fence_refusal(exc):
                    raise
                # Refused by the fence: the transaction had no effect; ask the router again.
                now = time.monotonic()
                if first is not None and now - first > self.give_up_s:
                    raise
                first = self._refused(op, first, now)
                continue
            if first is not None:
                self.tally.max_wait_s = max(self.tally.max_wait_s, time.monotonic() - first)
            return side
