"""``cutover workload``: realistic shop traffic on the legacy database, or a fast prefill.

Thin shell over :mod:`devtools.workload`: parse, check flags, call one core function, show a
progress bar on stderr while it runs, print the report (rich table, or JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from cutover.errors import UsageError
from devtools import workload

if TYPE_CHECKING:
    from collections.abc import Callable

    from cli.main import Context

DEFAULT_RATE = 200.0
DEFAULT_DURATION = 10.0

DESCRIPTION = """\
Write realistic shop traffic into the legacy database (schema shop) at a steady rate, to drive
the CDC pipeline end to end. Every transaction is one of:

  users      signups, profile edits (display name, bio), follower counts, handle and contact
             changes (handle, bio and follower_count are social data that must never leave
             the old database)
  merchants  shops opening, suspended, reinstated and closed (closing hides the shop's
             listings in the same transaction), rating changes
  listings   created (40 % with a 2-8 kB description: TOASTed), repriced, restocked, hidden,
             shown again, soft-deleted (status 'deleted'), hard-deleted (a real DELETE),
             retitled, given a new description; most updates leave the description untouched
             (unchanged TOAST values)
  orders     created with 1-5 lines and a pending payment, edited while unpaid, paid (payment
             settled for the total, invoice at https://shop.legacy.example/invoice/<no>), failed
             payment attempts, cancelled, shipped, completed, refunded; all changes of one
             order are one transaction, and total_idr = sum(qty x unit_price_idr) always
  bulk       every 2,000th transaction reprices every live listing of one of the biggest
             merchants in ONE UPDATE (thousands of rows after a default prefill)
  rollbacks  about 2 % write rows with ids from 8,000,000,000,000,000,000 up and the text
             ROLLBACK-MARKER, then ROLLBACK: they must never appear downstream

Transactions are paced against a monotonic clock (transaction i is due at start + i/rate; a
late run catches up, so the rate does not drift) over one connection in pipeline mode, or with
--workers N over N processes and connections: worker k sends transactions k, k+N, ... of the
same schedule, from its own sub-plan over its own rows (users and merchants whose id mod N is
k, and those merchants' listings and orders), so the workers never wait on each other and the
same --seed and --max-transactions still give the same tables.

Determinism: the same --seed on the same starting data writes the same statements in the same
order. Ids continue after the largest ids already in the tables (read once at start), and
timestamps are a fixed base time (2024-01-01 UTC, or just after the newest row) plus 10 ms per
transaction, never now(). With --max-transactions N exactly the first N transactions run;
with --duration, a prefix whose length depends on the machine.

--prefill loads a large consistent starting data set with COPY instead (one transaction):
users, merchants (listings per merchant follow a 1/rank law), products, and --orders orders
with their lines, payments and invoices.

--router writes through the cutover router instead of straight into legacy: each transaction
goes to the database holding its domain's writes now (commerce once the domain's writes are
switched: the same change, mapped as the pipeline maps it; the social columns stay in legacy).
A transaction the write fence refuses had no effect; it is retried after a short backoff,
asking the router again. The report counts the retries and the writes per domain and side.
Every transaction of the plan writes one domain only, so it is one transaction on one side."""

EPILOG = """\
examples:
  cutover workload --rate 500 --duration 60 --seed 7
  cutover workload --prefill --orders 100000 && cutover workload --rate 1000 --duration 30
  cutover workload --max-transactions 5000 --rate 2000 --json --no-progress
  cutover workload --rate 2000 --duration 60 --workers 2   # two connections side by side
  cutover workload --router --rate 500 --duration 600        # across switch-writes/rollback

exit codes: 0 done, 2 bad flags or configuration, 3 database unreachable or schema missing."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "workload",
        help="generate realistic shop traffic on the old database",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    traffic = parser.add_argument_group("traffic")
    traffic.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        metavar="N",
        help=f"transactions per second to hold (default {DEFAULT_RATE:g})",
    )
    traffic.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds to run (default {DEFAULT_DURATION:g} unless --max-transactions is given)",
    )
    traffic.add_argument(
        "--max-transactions",
        type=int,
        default=None,
        metavar="N",
        help="stop after exactly N transactions (a reproducible prefix of the plan)",
    )
    traffic.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes writing side by side, each on its own connection and rows (default 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, metavar="K", help="seed of the plan (default 1)"
    )
    fill = parser.add_argument_group("prefill")
    fill.add_argument(
        "--prefill",
        action="store_true",
        help="load a starting data set with COPY instead of running traffic",
    )
    fill.add_argument(
        "--orders",
        type=int,
        default=100_000,
        metavar="N",
        help="orders to prefill, with their lines, payments, invoices (default 100000)",
    )
    fill.add_argument(
        "--users", type=int, default=None, metavar="N", help="users (default orders/5)"
    )
    fill.add_argument(
        "--merchants", type=int, default=None, metavar="N", help="merchants (default orders/200)"
    )
    fill.add_argument(
        "--products", type=int, default=None, metavar="N", help="products (default orders/4)"
    )
    routed = parser.add_argument_group("router mode")
    routed.add_argument(
        "--router",
        action="store_true",
        help="write each transaction where the router says its domain's writes go, retrying "
        "write-fence refusals (needs the config's [target] and [kafka])",
    )
    routed.add_argument(
        "--router-mode",
        choices=("topic", "table"),
        default="topic",
        help="how the router follows the state: the control topic (default) or the table",
    )
    parser.add_argument(
        "--dsn",
        default=None,
        help="legacy database to write to (default: [source] dsn of the configuration)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none when stderr is no TTY)"
    )
    parser.set_defaults(handler=run)


def _check_flags(args: argparse.Namespace) -> None:
    """Bad flags are usage errors (exit 2) before anything connects."""
    if not args.rate > 0 or args.rate == float("inf"):
        raise UsageError(
            f"--rate must be a positive number of transactions per second, not {args.rate:g}"
        )
    if args.duration is not None and not args.duration > 0:
        raise UsageError(f"--duration must be a positive number of seconds, not {args.duration:g}")
    if args.max_transactions is not None and args.max_transactions < 1:
        raise UsageError(f"--max-transactions must be at least 1, not {args.max_transactions}")
    if args.router and args.prefill:
        raise UsageError("--router writes traffic; it does not go with --prefill")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {args.workers}")
    if args.workers > 1 and args.router:
        raise UsageError("--workers is for direct writes; --router runs one connection")
    for flag in ("orders", "users", "merchants", "products"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be at least 1, not {value}")


def run(args: argparse.Namespace, context: Context) -> int:
    _check_flags(args)
    dsn: str = args.dsn or context.settings.source.dsn
    show = not args.no_progress and sys.stderr.isatty()
    out = Console()
    if args.prefill:
        with _prefill_progress(show) as on_table:
            prefill_report = workload.prefill(
                dsn,
                orders=args.orders,
                users=args.users,
                merchants=args.merchants,
                products=args.products,
                seed=args.seed,
                progress=on_table,
            )
        if args.json:
            print(json.dumps(prefill_report.to_dict(), indent=2))
        else:
            out.print(_prefill_table(prefill_report))
        return 0
    duration = args.duration
    if duration is None and args.max_transactions is None:
        duration = DEFAULT_DURATION
    with _workload_progress(show) as on_tick:
        if args.router:
            report = _run_routed(args, context, dsn, duration, on_tick)
        else:
            report = workload.run_workload(
                dsn,
                rate=args.rate,
                duration=duration,
                seed=args.seed,
                max_transactions=args.max_transactions,
                progress=on_tick,
                workers=args.workers,
            )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        out.print(_workload_table(report))
        out.print(_counts_table(report))
    return 0


def _run_routed(
    args: argparse.Namespace,
    context: Context,
    dsn: str,
    duration: float | None,
    on_tick: Callable[[workload.WorkloadProgress], None] | None,
) -> workload.WorkloadReport:
    from cutover.mapping import load_mapping
    from cutover.routing import ReadRouter
    from devtools.workload_router import run_routed_workload

    settings = context.settings
    mapping = load_mapping(settings.mapping_path)
    with ReadRouter(settings, list(mapping.domains), mode=args.router_mode) as router:
        return run_routed_workload(
            router,
            dsn,
            settings.target.dsn,
            mapping,
            rate=args.rate,
            duration=duration,
            seed=args.seed,
            max_transactions=args.max_transactions,
            progress=on_tick,
        )


# -- progress bars (stderr) ----------------------------------------------------------------


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


@contextmanager
def _workload_progress(
    show: bool,
) -> Iterator[Callable[[workload.WorkloadProgress], None] | None]:
    if not show:
        yield None
        return
    with _progress() as bar:
        task = bar.add_task("workload", total=None, note="")

        def tick(p: workload.WorkloadProgress) -> None:
            rate = p.transactions / p.elapsed_s if p.elapsed_s > 0 else 0.0
            bar.update(task, completed=p.transactions, total=p.expected, note=f"{rate:,.0f} tx/s")

        yield tick


@contextmanager
def _prefill_progress(show: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    if not show:
        yield None
        return
    with _progress() as bar:
        tasks: dict[str, Any] = {}

        def on_table(table: str, done: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=total, note="rows")
            bar.update(tasks[table], completed=done)

        yield on_table


# -- reports (stdout) ----------------------------------------------------------------------


def _workload_table(report: workload.WorkloadReport) -> Table:
    table = Table(title=f"workload (seed {report.seed})", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    verdict = "ok" if report.achieved_rate >= 0.98 * report.rate_asked else "BELOW ASKED"
    table.add_row("rate asked", f"{report.rate_asked:,.0f} tx/s")
    table.add_row("rate achieved", f"{report.achieved_rate:,.1f} tx/s ({verdict})")
    table.add_row("duration", f"{report.elapsed_s:.2f} s")
    table.add_row("transactions", f"{report.transactions:,}")
    table.add_row("committed", f"{report.committed:,}")
    table.add_row("rolled back (must never appear downstream)", f"{report.rolled_back:,}")
    table.add_row("statements", f"{report.statements:,}")
    table.add_row("worst lateness behind schedule", f"{report.max_behind_s:.3f} s")
    if report.router:
        table.add_row(
            "refused by a write fence (retried)", f"{report.router['refused_transactions']:,}"
        )
        table.add_row("retries", f"{report.router['retries']:,}")
        table.add_row(
            "longest wait for a refused one", f"{report.router['max_retry_wait_s']:.3f} s"
        )
        table.add_row(
            "social columns not written (commerce lacks them)",
            f"{report.router['unheld_column_writes']:,}",
        )
        for domain, sides in sorted(report.router["written"].items()):
            table.add_row(
                f"{domain}: legacy / commerce", f"{sides['legacy']:,} / {sides['commerce']:,}"
            )
    return table


def _counts_table(report: workload.WorkloadReport) -> Table:
    table = Table(title="transactions by kind")
    table.add_column("kind")
    table.add_column("count", justify="right")
    for kind, count in sorted(report.counts.items()):
        table.add_row(kind, f"{count:,}")
    return table


def _prefill_table(report: workload.PrefillReport) -> Table:
    table = Table(title=f"prefill (seed {report.seed}) in {report.elapsed_s:.2f} s")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in report.rows.items():
        table.add_row(f"shop.{name}", f"{rows:,}")
    per_s = report.total_rows / report.elapsed_s if report.elapsed_s > 0 else 0.0
    table.add_row("total", f"{report.total_rows:,} ({per_s:,.0f} rows/s)")
    return table
