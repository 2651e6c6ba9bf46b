"""Apply benchmark: (a) rate draining a backlog, (b) commit-to-applied latency at a steady rate.

Runs against the local stack (``make up``; addresses from ``CUTOVER_*`` or ``.stack/env``) on a
scratch commerce database and fresh topics (6 partitions per domain), both removed afterwards.

(a) **Backlog**: ``--events`` synthetic but realistic change events of the 7 reference tables
    (orders with lines and payments, payments settling with invoices, cancellations deleting
    lines, product updates with an unchanged TOASTed description, users, merchants) are produced
    to the domain topics FIRST; then one in-process ``ApplyConsumer`` drains them. Only the
    apply side is measured: from its first COMMIT to the COMMIT that stores the last offset
    (the group join before the first COMMIT is reported separately).
(b) **Latency**: a separate producer process writes ``--rate`` events/s for ``--duration``
    seconds with ``source.ts_ms`` = the time it encodes them; latency = COMMIT time in the
    consumer − ``source.ts_ms``, per event, p50/p99 after a ``--warmup``.

(c) **Huge transaction**: one source transaction of ``--big-tx`` order lines (10,000 orders)
    spread over all partitions, applied by a ``cutover apply`` *process* (sub-batches inside
    long database transactions); its peak RSS (``VmHWM``) and the time to apply are reported.
    Budget: 300 MB.

Prints JSON and a Markdown table; writes ``bench/results/apply.json``.

    .venv/bin/python bench/apply_throughput.py                  # full: 1,000,000 events
    .venv/bin/python bench/apply_throughput.py --events 100000 --duration 20   # quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench.latency_stages import postmaster_of, tree_cpu_s  # noqa: E402
from consumers.apply import ApplyConsumer, ApplyOptions, CommitInfo  # noqa: E402
from cutover import logging as cutover_logging  # noqa: E402
from devtools.apply_support import (  # noqa: E402
    EXAMPLES,
    EventFactory,
    Message,
    delete_topics,
    init_control,
    make_topics,
    produce,
    producer,
    publish_schemas,
    settings_for,
)
from devtools.scratch import scratch_database  # noqa: E402
from devtools.stack import read_env  # noqa: E402

T = datetime(2025, 1, 1, tzinfo=UTC)
DESCRIPTION = "Hand-made batik shirt, cotton, fits true to size. " * 50  # ~2.5 kB: TOASTed


class Synthetic:
    """A realistic mix of source transactions over the 7 tables, fast to generate."""

    def __init__(self, factory: EventFactory, seed: int = 1) -> None:
        self.f = factory
        self.rng = random.Random(seed)
        self.lsn = 0x1_0000_0000
        self.users = self.merchants = self.products = self.orders = 0
        self.payments = self.invoices = 0
        self.open_orders: list[tuple[int, int]] = []  # (order id, lines)

    def transaction(self, ts_ms: int | None = None) -> list[Message]:
        rng = self.rng
        self.lsn += rng.randint(0x100, 0x2000)
        kind = rng.random()
        if self.products < 50 or kind < 0.05:
            changes = self._merchant()
        elif kind < 0.45:
            changes = self._order()
        elif kind < 0.65 and self.open_orders:
            changes = self._pay()
        elif kind < 0.70 and self.open_orders:
            changes = self._cancel()
        elif kind < 0.85:
            pid = rng.randint(1, self.products)
            changes = [
                (
                    "products",
                    "u",
                    self._product(pid, pid // 3 + 1, None),
                    {"unchanged": ["description"]},
                )
            ]
        else:
            self.users += 1
            changes = [
                (
                    "users",
                    "c",
                    {
                        "id": self.users,
                        "display_name": f"User {self.users}",
                        "email": f"u{self.users}@example.com",
                        "phone": None,
                        "created_at": T,
                        "updated_at": T,
                    },
                    {},
                )
            ]
        return self.f.transaction(self.lsn, changes, ts_ms=ts_ms)

    def _product(self, pid: int, mid: int, description: str | None) -> dict[str, Any]:
        return {
            "id": pid,
            "merchant_id": mid,
            "title": f"Product {pid}",
            "description": description,
            "price_idr": Decimal(self.rng.randint(100, 10**7)) / 100,
            "stock": self.rng.randint(0, 500),
            "status": "live",
        }

    def _merchant(self) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        self.merchants += 1
        mid = self.merchants
        out: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
            (
                "merchants",
                "c",
                {
                    "id": mid,
                    "owner_user_id": max(self.users, 1),
                    "shop_name": f"Shop {mid}",
                    "status": "active",
                    "rating": Decimal("4.50"),
                    "created_at": T,
                    "updated_at": T,
                },
                {},
            )
        ]
        for _ in range(3):
            self.products += 1
            out.append(("products", "c", self._product(self.products, mid, DESCRIPTION), {}))
        return out

    def _order(self) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        rng = self.rng
        self.orders += 1
        oid = self.orders
        lines = rng.randint(2, 4)
        price = Decimal(rng.randint(1000, 500_000)) / 100
        total = price * 2 * lines
        out: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
            (
                "orders",
                "c",
                {
                    "id": oid,
                    "buyer_id": rng.randint(1, max(self.users, 1)),
                    "merchant_id": rng.randint(1, self.merchants),
                    "status": "created",
                    "total_idr": total,
                    "created_at": T,
                    "updated_at": T,
                },
                {},
            )
        ]
        for n in range(1, lines + 1):
            out.append(
                (
                    "order_items",
                    "c",
                    {
                        "order_id": oid,
                        "line_no": n,
                        "product_id": rng.randint(1, self.products),
                        "qty": 2,
                        "unit_price_idr": price,
                    },
                    {},
                )
            )
        self.payments += 1
        out.append(
            (
                "payments",
                "c",
                {
                    "id": self.payments,
                    "order_id": oid,
                    "method": rng.choice(["card", "ewallet", "cod"]),
                    "amount_idr": total,
                    "status": "pending",
                    "provider_ref": None,
                    "paid_at": None,
                },
                {},
            )
        )
        self.open_orders.append((oid, lines))
        return out

    def _settle(self) -> tuple[int, int]:
        return self.open_orders.pop(self.rng.randrange(len(self.open_orders)))

    def _pay(self) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        oid, _lines = self._settle()
        self.invoices += 1
        return [
            (
                "orders",
                "u",
                {
                    "id": oid,
                    "buyer_id": 1,
                    "merchant_id": 1,
                    "status": "paid",
                    "total_idr": Decimal("10.00"),
                    "created_at": T,
                    "updated_at": T,
                },
                {},
            ),
            (
                "payments",
                "u",
                {
                    "id": oid,
                    "order_id": oid,
                    "method": "card",
                    "amount_idr": Decimal("10.00"),
                    "status": "settled",
                    "provider_ref": f"ref-{oid}",
                    "paid_at": T,
                },
                {},
            ),
            (
                "invoices",
                "c",
                {
                    "id": self.invoices,
                    "order_id": oid,
                    "invoice_no": f"INV-{self.invoices:09d}",
                    "issued_at": T,
                },
                {},
            ),
        ]

    def _cancel(self) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        oid, lines = self._settle()
        out: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
            ("order_items", "d", {"order_id": oid, "line_no": n}, {}) for n in range(2, lines + 1)
        ]
        out.append(
            (
                "orders",
                "u",
                {
                    "id": oid,
                    "buyer_id": 1,
                    "merchant_id": 1,
                    "status": "cancelled",
                    "total_idr": Decimal("1.00"),
                    "created_at": T,
                    "updated_at": T,
                },
                {},
            )
        )
        return out

    def messages(self, n: int) -> Iterator[Message]:
        made = 0
        while made < n:
            for m in self.transaction():
                yield m
                made += 1


# ----------------------------------------------------------------------------- measurements


class Observer:
    """Collects what every COMMIT made visible (called in the consumer's thread)."""

    def __init__(self) -> None:
        self.commits: list[tuple[float, int]] = []  # (monotonic time, events)
        self.latencies_ms: list[int] = []
        self.record_latency_after_ms: int | None = None
        self.events = 0

    def __call__(self, info: CommitInfo) -> None:
        self.events += info.events
        self.commits.append((time.monotonic(), self.events))
        if self.record_latency_after_ms is not None:
            self.latencies_ms.extend(
                info.committed_at_ms - ts
                for ts in info.source_ts_ms
                if ts >= self.record_latency_after_ms
            )


def _run_consumer(settings: Any, observer: Observer, until: Any, timeout: float) -> float:
    stop = threading.Event()
    consumer = ApplyConsumer(settings, options=ApplyOptions(on_commit=observer), stop=stop)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    thread.start()
    deadline = start + timeout
    while not until() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    stop.set()
    thread.join(60)
    if errors:
        raise errors[0]
    if not until():
        raise SystemExit("the consumer did not finish in time")
    return start


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def backlog(env: dict[str, str], dsn: str, events: int, batch: int) -> dict[str, Any]:
    topics = make_topics(env["CUTOVER_KAFKA_BOOTSTRAP"], partitions=6)
    try:
        gen = Synthetic(EventFactory(topics.prefix, topics.partitions))
        publish_schemas(topics, gen.f)
        t0 = time.monotonic()
        produced = produce(topics.bootstrap, gen.messages(events))
        produce_s = time.monotonic() - t0
        print(f"backlog: produced {produced} events in {produce_s:.1f}s", file=sys.stderr)
        settings = settings_for(
            dsn, topics, group="bench-backlog", batch_max_events=batch, consumer={}
        )
        obs = Observer()
        # CPU from the consumer's start to its last COMMIT: this process (the applier's thread
        # and librdkafka's; producing is over) and the commerce cluster (postmaster, backends).
        postmaster = postmaster_of(dsn)
        load_start = os.getloadavg()
        cpu0, db0 = time.process_time(), tree_cpu_s(postmaster)
        start = _run_consumer(settings, obs, lambda: obs.events >= produced, timeout=3600)
        applier_cpu, db_cpu = time.process_time() - cpu0, tree_cpu_s(postmaster) - db0
        (t_first, first_events), (t_last, _n) = obs.commits[0], obs.commits[-1]
        rate = (produced - first_events) / (t_last - t_first)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "SELECT (SELECT count(*) FROM commerce.orders) + "
                "(SELECT count(*) FROM commerce.order_lines) + "
                "(SELECT count(*) FROM commerce.payments) + "
                "(SELECT count(*) FROM commerce.invoices) + "
                "(SELECT count(*) FROM commerce.customers) + "
                "(SELECT count(*) FROM commerce.sellers) + "
                "(SELECT count(*) FROM commerce.listings)"
            ).fetchone()
            dead = conn.execute("SELECT count(*) FROM cutover.dead_letters").fetchone()
        return {
            "events": produced,
            "batch_max_events": batch,
            "partitions_per_domain": topics.partitions,
            "join_to_first_commit_s": round(t_first - start, 2),
            "drain_s": round(t_last - t_first, 2),
            "events_per_s": round(rate),
            "commits": len(obs.commits),
            "commerce_rows": rows[0] if rows else None,
            "dead_letters": dead[0] if dead else None,
            "process_peak_rss_mb": round(_rss_mb()),
            "cpu_us_per_event": {
                "applier": round(applier_cpu / produced * 1e6, 1),
                "postgresql_commerce": round(db_cpu / produced * 1e6, 1),
            },
            "load_average_start_end": [load_start, os.getloadavg()],
            "note": "apply side only: the backlog was produced before the consumer started",
        }
    finally:
        delete_topics(topics)


def _steady_producer(bootstrap: str, prefix: str, rate: int, duration: float) -> None:
    """Child process: ``rate`` events/s for ``duration`` s, source.ts_ms = encode time."""
    factory = EventFactory(prefix, 6)
    gen = Synthetic(factory, seed=2)
    prod = producer(bootstrap, **{"linger.ms": 1})
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < duration:
        due = int(elapsed * rate)
        while sent < due:
            msgs = gen.transaction(ts_ms=int(time.time() * 1000))
            produce(bootstrap, msgs, prod)
            sent += len(msgs)
        prod.poll(0)
        time.sleep(0.002)
    assert prod.flush(30) == 0


def latency(
    env: dict[str, str],
    dsn: str,
    *,
    rate: int,
    duration: float,
    warmup: float,
    batch: int,
    wait_ms: int,
) -> dict[str, Any]:
    topics = make_topics(env["CUTOVER_KAFKA_BOOTSTRAP"], partitions=6)
    try:
        publish_schemas(topics, EventFactory(topics.prefix, topics.partitions))
        settings = settings_for(
            dsn,
            topics,
            group="bench-latency",
            batch_max_events=batch,
            batch_max_wait_ms=wait_ms,
            consumer={},
        )
        obs = Observer()
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(
            target=_steady_producer, args=(topics.bootstrap, topics.prefix, rate, duration)
        )
        holder: dict[str, float] = {}

        def finished() -> bool:
            if "start" not in holder:
                holder["start"] = time.time()
                obs.record_latency_after_ms = int((time.time() + warmup) * 1000)
                child.start()
            return not child.is_alive() and obs.events > 0 and _caught_up(dsn, obs)

        _run_consumer(settings, obs, finished, timeout=duration + 300)
        lat = sorted(obs.latencies_ms)
        if not lat:
            raise SystemExit("no latency samples")
        return {
            "rate_events_per_s": rate,
            "duration_s": duration,
            "warmup_s": warmup,
            "samples": len(lat),
            "batch_max_wait_ms": wait_ms,
            "p50_ms": lat[len(lat) // 2],
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max_ms": lat[-1],
        }
    finally:
        delete_topics(topics)


def big_transaction(env: dict[str, str], dsn: str, lines: int, tmp: Path) -> dict[str, Any]:
    from devtools.apply_support import (
        cli_env,
        start_apply,
        stop_apply,
        total_offsets,
        write_config,
    )

    topics = make_topics(env["CUTOVER_KAFKA_BOOTSTRAP"], partitions=6)
    try:
        factory = EventFactory(topics.prefix, topics.partitions)
        publish_schemas(topics, factory)
        orders = max(lines // 100, 1)
        per_order = lines // orders
        changes: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
        for oid in range(1, orders + 1):
            changes.append(
                (
                    "orders",
                    "c",
                    {
                        "id": oid,
                        "buyer_id": 1,
                        "merchant_id": 1,
                        "status": "paid",
                        "total_idr": Decimal(per_order),
                        "created_at": T,
                        "updated_at": T,
                    },
                    {},
                )
            )
            changes += [
                (
                    "order_items",
                    "c",
                    {
                        "order_id": oid,
                        "line_no": n,
                        "product_id": 1,
                        "qty": 1,
                        "unit_price_idr": Decimal(1),
                    },
                    {},
                )
                for n in range(1, per_order + 1)
            ]
        msgs = factory.transaction(0x2_0000_0000, changes)
        del changes
        produce(topics.bootstrap, msgs)
        count = len(msgs)
        del msgs
        group = "bench-bigtx"
        config = write_config(tmp, topics, group=group, consumer={})
        proc = start_apply(config, cli_env(dsn, topics.bootstrap), log=tmp / "bigtx.log")
        start = time.monotonic()
        peak = 0.0
        try:
            while total_offsets(dsn, group) < count:
                if proc.poll() is not None:
                    raise SystemExit(f"cutover apply exited {proc.returncode}: see {tmp}")
                peak = max(peak, _vm_hwm_mb(proc.pid))
                time.sleep(0.5)
            elapsed = time.monotonic() - start
            peak = max(peak, _vm_hwm_mb(proc.pid))
        finally:
            stop_apply(proc)
        return {
            "source_transaction_events": count,
            "seconds": round(elapsed, 1),
            "events_per_s": round(count / elapsed),
            "consumer_peak_rss_mb": round(peak),
            "budget_mb": 300,
            "note": "separate `cutover apply` process, default batch_max_events (5000)",
        }
    finally:
        delete_topics(topics)


def backlog_processes(
    env: dict[str, str], dsn: str, events: int, processes: int, tmp: Path
) -> dict[str, Any]:
    """(a') the same kind of backlog drained by ``processes`` `cutover apply` processes of one
    group (offsets polled in the database every 0.2 s)."""
    from devtools.apply_support import (
        cli_env,
        start_apply,
        stop_apply,
        total_offsets,
        write_config,
    )

    topics = make_topics(env["CUTOVER_KAFKA_BOOTSTRAP"], partitions=6)
    procs = []
    try:
        gen = Synthetic(EventFactory(topics.prefix, topics.partitions))
        publish_schemas(topics, gen.f)
        produced = produce(topics.bootstrap, gen.messages(events))
        group = "bench-processes"
        config = write_config(tmp, topics, group=group, consumer={})
        env_cli = cli_env(dsn, topics.bootstrap)
        procs = [start_apply(config, env_cli, log=tmp / f"p{i}.log") for i in range(processes)]
        first = None
        while (done := total_offsets(dsn, group)) < produced:
            if first is None and done > 0:
                first = (time.monotonic(), done)
            if any(p.poll() is not None for p in procs):
                raise SystemExit(f"a cutover apply process exited: see {tmp}")
            time.sleep(0.2)
        end = time.monotonic()
        assert first is not None
        return {
            "events": produced,
            "processes": processes,
            "drain_s": round(end - first[0], 2),
            "events_per_s": round((produced - first[1]) / (end - first[0])),
            "note": "apply side only; `cutover apply` processes of one consumer group",
        }
    finally:
        for proc in procs:
            stop_apply(proc)
        delete_topics(topics)


def _vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _caught_up(dsn: str, obs: Observer) -> bool:
    # The child is done: wait until two seconds pass without a new commit.
    return bool(obs.commits) and time.monotonic() - obs.commits[-1][0] > 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--wait-ms", type=int, default=100, help="[apply] batch_max_wait_ms")
    parser.add_argument("--skip-backlog", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--big-tx", type=int, default=1_000_000, help="rows; 0 skips (c)")
    parser.add_argument(
        "--processes", type=int, default=2, help="(a') backlog drained by N processes; 0 skips"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "apply.json")
    args = parser.parse_args()
    cutover_logging.configure(level="warning", json=True)
    env = read_env(REPO / ".stack", os.environ)
    if "CUTOVER_TARGET_DSN" not in env or "CUTOVER_KAFKA_BOOTSTRAP" not in env:
        raise SystemExit("no local stack: run `make up` first")
    result: dict[str, Any] = {
        "benchmark": "apply",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },
        "mapping": str(EXAMPLES / "mapping.toml"),
    }
    if not args.skip_backlog:
        for dsn in scratch_database(env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "bench"):
            init_control(dsn)
            result["backlog"] = backlog(env, dsn, args.events, args.batch)
    if not args.skip_latency:
        for dsn in scratch_database(env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "bench"):
            init_control(dsn)
            result["latency"] = latency(
                env,
                dsn,
                rate=args.rate,
                duration=args.duration,
                warmup=args.warmup,
                batch=args.batch,
                wait_ms=args.wait_ms,
            )
    if args.processes and not args.skip_backlog:
        with tempfile.TemporaryDirectory() as tmp:
            for dsn in scratch_database(
                env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "bench"
            ):
                init_control(dsn)
                result["backlog_processes"] = backlog_processes(
                    env, dsn, args.events, args.processes, Path(tmp)
                )
    if args.big_tx:
        with tempfile.TemporaryDirectory() as tmp:
            for dsn in scratch_database(
                env["CUTOVER_TARGET_DSN"], EXAMPLES / "commerce.sql", "bench"
            ):
                init_control(dsn)
                result["big_transaction"] = big_transaction(env, dsn, args.big_tx, Path(tmp))
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = ["| measure | value | target |", "|---|---|---|"]
    if "backlog" in result:
        b = result["backlog"]
        lines.append(
            f"| apply rate, {b['events']:,}-event backlog (apply side only) | "
            f"{b['events_per_s']:,} events/s | >= 20,000 events/s |"
        )
        cpu = b["cpu_us_per_event"]
        lines.append(
            f"| CPU per event: applier, PostgreSQL commerce | {cpu['applier']} µs, "
            f"{cpu['postgresql_commerce']} µs | - |"
        )
        lines.append(
            f"| bench process peak RSS (producing, then draining) | "
            f"{b['process_peak_rss_mb']} MB | - |"
        )
    if "backlog_processes" in result:
        bp = result["backlog_processes"]
        lines.append(
            f"| apply rate, same backlog, {bp['processes']} `cutover apply` processes | "
            f"{bp['events_per_s']:,} events/s | - |"
        )
    if "latency" in result:
        lat = result["latency"]
        lines.append(
            f"| commit-to-applied latency p50 at {lat['rate_events_per_s']:,} events/s "
            f"| {lat['p50_ms']} ms | - |"
        )
        lines.append(
            f"| commit-to-applied latency p99 at {lat['rate_events_per_s']:,} events/s "
            f"| {lat['p99_ms']} ms | <= 1000 ms |"
        )
    if "big_transaction" in result:
        big = result["big_transaction"]
        lines.append(
            f"| consumer peak RSS, one {big['source_transaction_events']:,}-event source "
            f"transaction | {big['consumer_peak_rss_mb']} MB | < 300 MB |"
        )
        lines.append(
            f"| time to apply it | {big['seconds']} s ({big['events_per_s']:,} events/s) | - |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
