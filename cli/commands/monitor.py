"""`cutover monitor`: a live terminal view of the pipeline, or one reading as JSON for scripts.

Thin: takes readings with :class:`control.monitor.Monitor` every ``--interval`` seconds and
renders them with rich (``rich.live``); ``--once`` prints one reading (two readings
``--interval`` apart, so that the apply rate is known) as tables or ``--json``. Exit codes:
0, or 3 when ``--once`` could not read a source (the JSON still says what it could read, and
``errors`` why not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cutover.errors import UsageError

if TYPE_CHECKING:
    from cli.main import Context
    from control.monitor import MonitorReport

DESCRIPTION = """\
Platform engineers' view: per domain topic its partitions, end offsets, the apply group's
committed offsets and lag (as kafka-consumer-groups computes it) and the offsets applied in the
commerce database; apply rate and commit-to-applied latency (p50/p99, coarse: see
docs/OPERATIONS.md); the replication slot (confirmed position, lag in bytes, wal_status,
safe_wal_size); open dead letters and the dead-letter topic; the producer's heartbeat age.
Refreshed every second until Ctrl-C; --once --json for scripts."""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "monitor",
        help="live view: topics, partitions, group lag, apply rate/latency, slot, dead letters",
        description=DESCRIPTION,
    )
    parser.add_argument("--once", action="store_true", help="one reading, then exit")
    parser.add_argument("--json", action="store_true", help="with --once: JSON for machines")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="refresh period (default 1); --once takes two readings this far apart for the rate",
    )
    parser.add_argument(
        "--partitions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show every partition (default) or only the per-domain totals",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    from control.monitor import Monitor

    if args.json and not args.once:
        raise UsageError("--json needs --once (the live view is for people)")
    if not args.interval > 0:
        raise UsageError("--interval must be positive")
    monitor = Monitor(context.settings)
    try:
        if args.once:
            monitor.sample()
            time.sleep(args.interval)
            report = monitor.sample()
            if args.json:
                json.dump(report.as_json(), sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                Console().print(render(report, partitions=args.partitions))
            return 3 if report.errors else 0
        try:
            with Live(console=Console(), auto_refresh=False, screen=False) as live:
                while True:
                    report = monitor.sample()
                    live.update(render(report, partitions=args.partitions), refresh=True)
                    time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
    finally:
        monitor.close()


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "kB", "MB"):
        if abs(size) < 1024:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


def render(report: MonitorReport, *, partitions: bool = True) -> Group:
    """The report as rich renderables (also used by tests)."""
    parts: list[Any] = [_domains_table(report)]
    if partitions:
        parts.append(_partitions_table(report))
    parts.append(_source_grid(report))
    return Group(*parts)


def _domains_table(report: MonitorReport) -> Table:
    domains = Table(title=f"apply group {report.group_id}", title_justify="left")
    for col in ("domain", "topic", "end", "lag", "applied lag", "msg/s", "p50", "p99",
                "DLQ open", "heartbeat"):  # fmt: skip
        domains.add_column(col, justify="left" if col in ("domain", "topic") else "right")
    for t in report.topics:
        if t.error:
            domains.add_row(t.domain, t.topic, *["-"] * 8)
            continue
        lag_style = "yellow" if (t.lag or 0) > 0 else ""
        domains.add_row(
            t.domain,
            t.topic,
            _num(t.end_offset),
            Text(_num(t.lag), style=lag_style),
            _num(t.applied_lag),
            "-" if t.apply_rate is None else f"{t.apply_rate:,.0f}",
            _secs(t.latency_p50_s),
            _secs(t.latency_p99_s),
            Text(str(t.dead_letters_open), style="red" if t.dead_letters_open else ""),
            _secs(t.heartbeat_applied_age_s),
        )
    return domains


def _partitions_table(report: MonitorReport) -> Table:
    table = Table(title="partitions", title_justify="left")
    for col in ("topic [partition]", "end offset", "committed (kafka)", "lag",
                "applied (db)", "applied lag"):  # fmt: skip
        table.add_column(col, justify="left" if col.startswith("topic") else "right")
    for t in report.topics:
        for p in t.partitions:
            table.add_row(
                f"{t.topic} [{p.partition}]",
                _num(p.end_offset),
                _num(p.committed_offset),
                _num(p.lag),
                _num(p.applied_offset),
                _num(p.applied_lag),
            )
    return table


def _source_grid(report: MonitorReport) -> Table:
    source = Table.grid(padding=(0, 2))
    source.add_column(style="bold")
    source.add_column()
    slot = report.slot
    if slot is None:
        source.add_row("slot", "-")
    elif not slot.exists:
        source.add_row("slot", Text(f"{slot.name}: does not exist", style="red"))
    else:
        status_style = "red" if slot.wal_status in ("unreserved", "lost") else ""
        source.add_row(
            "slot",
            Text.assemble(
                f"{slot.name} {'active' if slot.active else 'inactive'}, confirmed "
                f"{slot.confirmed_flush_lsn}, lag {_bytes(slot.lag_bytes)}, wal_status ",
                (str(slot.wal_status), status_style),
                f", safe_wal_size {_bytes(slot.safe_wal_size)}",
            ),
        )
    source.add_row("producer heartbeat", _secs(report.producer_heartbeat_age_s) + " ago"
                   if report.producer_heartbeat_age_s is not None else "-")  # fmt: skip
    dl = report.dead_letters
    source.add_row(
        "dead letters",
        f"{dl.open_total} open; {dl.dlq_topic} end offset {_num(dl.dlq_end_offset)}",
    )
    if report.truncates:
        source.add_row(
            Text("truncates", style="yellow"),
            ", ".join(f"{t} ×{n}" for t, n in sorted(report.truncates.items()))
            + " carried (see `cutover audit`)",
        )
    for blocked, cause in report.capture_blocks:
        source.add_row(
            Text("CAPTURE BLOCKED", style="bold red"),
            escape(f"{blocked}: {cause}; its changes are withheld (see `cutover status`)"),
        )
    for error in [*(t.error for t in report.topics if t.error), *report.errors]:
        source.add_row(Text("error", style="red"), escape(error))  # may name [kafka] etc.
    source.add_row("taken at", report.taken_at.strftime("%Y-%m-%d %H:%M:%S UTC"))
    return source
