"""``cutover workload --workers N``: the workload from N processes, one connection each.

Why processes: one connection sends one transaction after the other, so on a busy machine its
rate is bounded by round trips that each wait for a CPU; N connections (N backends) progress
side by side and write concurrently, as an application's pool does. Each worker runs its own
sub-plan over disjoint rows (:func:`devtools.workload.plan_operations` with ``worker``/
``workers``, :func:`~devtools.workload.split_start`, :func:`~devtools.workload.worker_seed`),
so they never wait on one another's row locks and the result does not depend on how they
interleave: with ``max_transactions`` M, worker k runs the global transactions k, k+N, ... below
M, and the tables end up the same every time.

The schedule is the single worker's, shared: the parent reads the starting state once, starts
the workers, waits until each is connected, then sets one start time ``t0`` on the monotonic
clock (the same clock in every process); worker k's i-th transaction is due at
``t0 + (i·N + k) / rate``. Progress is a shared array of per-worker counts. The first error of
any worker ends the run (the others are terminated) and is raised as the worker saw it.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cutover.errors import CutoverError, DatabaseError, RuntimeFailure
from devtools.workload import (
    StartState,
    Tally,
    _connect,
    pace,
    plan_operations,
    split_start,
    worker_seed,
)
from devtools.workload_send import PipelineSender

__all__ = ["run_workers", "worker_limit"]

#: How long a worker may take to start and connect.
_READY_TIMEOUT_S: Final = 60.0
#: The start time is set this far ahead, so every worker is waiting when it comes.
_START_AHEAD_S: Final = 0.05
_PROGRESS_EVERY_S: Final = 0.2


def worker_limit(limit: float, worker: int, workers: int) -> float:
    """How many of the first ``limit`` global transactions are worker k's (k, k+n, ...)."""
    if math.isinf(limit):
        return limit
    return len(range(worker, int(limit), workers))


@dataclass(frozen=True, slots=True)
class _Job:
    dsn: str
    seed: int
    start: StartState
    bulk_every: int
    worker: int
    workers: int
    rate: float
    duration: float | None
    limit: float


def _worker(job: _Job, out: Any, go: Any, shared_t0: Any, counts: Any) -> None:
    """One worker process: connect, report ready, wait for ``t0``, pace its sub-plan."""
    k, n = job.worker, job.workers
    try:
        with _connect(job.dsn) as conn:
            plan = plan_operations(
                worker_seed(job.seed, k, n), job.start, bulk_every=job.bulk_every,
                worker=k, workers=n,
            )  # fmt: skip
            sender = PipelineSender(conn)
            out.put(("ready", k))
            go.wait()
            t0 = shared_t0.value
            deadline = t0 + job.duration if job.duration is not None else math.inf

            def tick(done: int, _elapsed: float) -> None:
                counts[k] = done

            # Worker k's i-th transaction is the global (i·n + k)-th: rate/n, shifted by k/rate.
            tally = pace(
                plan, sender, job.dsn, rate=job.rate / n, t0=t0 + k / job.rate,
                deadline=deadline, limit=job.limit, tick=tick,
            )  # fmt: skip
            counts[k] = tally.done
        out.put(("done", k, tally, time.monotonic()))
    except CutoverError as exc:
        out.put(("error", k, exc.message, getattr(exc, "sqlstate", None)))


def run_workers(
    dsn: str,
    start: StartState,
    *,
    rate: float,
    duration: float | None,
    seed: int,
    limit: float,
    bulk_every: int,
    workers: int,
    tick: Callable[[int, float], None],
) -> tuple[Tally, float]:
    """Run ``workers`` processes (module doc); the summed tally and the elapsed seconds."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold threads
    out = ctx.Queue()
    go = ctx.Event()
    shared_t0 = ctx.Value("d", 0.0)
    counts = ctx.Array("q", workers)

    def _job(k: int) -> _Job:
        sub = split_start(start, k, workers)
        return _Job(dsn, seed, sub, bulk_every, k, workers, rate, duration,
                    worker_limit(limit, k, workers))  # fmt: skip

    procs = [
        ctx.Process(
            target=_worker,
            args=(_job(k), out, go, shared_t0, counts),
            name=f"cutover-workload-{k}",
            daemon=True,
        )
        for k in range(workers)
    ]
    for proc in procs:
        proc.start()
    try:
        ready = 0
        while ready < workers:
            _check(_get(out, _READY_TIMEOUT_S, procs))
            ready += 1
        t0 = time.monotonic() + _START_AHEAD_S
        shared_t0.value = t0
        go.set()
        total, ends, finished = Tally(), [t0], 0
        while finished < workers:
            try:
                msg = out.get(timeout=_PROGRESS_EVERY_S)
            except queue.Empty:
                _check_alive(procs)
                tick(sum(counts[:]), time.monotonic() - t0)
                continue
            _check(msg)
            total.add(msg[2])
            ends.append(msg[3])
            finished += 1
        for proc in procs:
            proc.join(10)
        return total, max(ends) - t0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


def _get(out: Any, timeout: float, procs: list[Any]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return out.get(timeout=_PROGRESS_EVERY_S)
        except queue.Empty:
            _check_alive(procs)
            if time.monotonic() > deadline:
                raise RuntimeFailure("a workload worker did not start in time") from None


def _check(msg: Any) -> None:
    if msg[0] == "error":
        raise DatabaseError(msg[2], side="source", sqlstate=msg[3])


def _check_alive(procs: list[Any]) -> None:
    for proc in procs:
        if proc.exitcode not in (None, 0):
            raise RuntimeFailure(f"workload worker {proc.name} died (exit code {proc.exitcode})")
