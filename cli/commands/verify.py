"""``cutover verify``: mapping-aware consistency check of commerce against legacy.

Thin shell over :func:`control.verify.run_verify`: parse, draw a progress bar (rows/s, ETA) on
a terminal, print the report (rich tables, or ``--json``), exit 1 on a persistent mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from control.audit import default_actor
from control.verify import VerifyOptions, VerifyReport, run_verify
from cutover.errors import UsageError, VerifyMismatch
from cutover.mapping import load_mapping

if TYPE_CHECKING:
    from cli.main import Context

_DEFAULTS = VerifyOptions()

DESCRIPTION = """\
Compare the legacy rows, mapped through the mapping file, with the commerce rows, table by table,
key by key. Chunks of the primary key are compared by digests computed inside both databases;
a differing chunk is bisected down to keys. Differences the consumers have not applied yet are
rechecked once they have (bounded by --recheck-timeout) and are not reported. The scenario
invariants are checked on commerce. The result is stored in the commerce control tables
(cutover.verify_runs): a passing verify of a domain is a gate of `cutover switch-reads`."""

EPILOG = """\
examples:
  cutover verify                       every domain
  cutover verify --domain payment      one domain (what the payment switch gate needs)
  cutover verify --table orders --json one table, machine-readable
  cutover verify --resume              continue the last interrupted run

exit codes: 0 equal, 1 persistent mismatch, 2 bad flags or configuration, 3 database down."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "verify",
        help="mapping-aware consistency check (exit 1 on persistent mismatch)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--domain", help="only the tables of this domain")
    parser.add_argument("--table", help="only this table (source or target name)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=int,
        metavar="RUN_ID",
        help="resume an interrupted run (default: the latest unfinished one with this scope)",
    )
    parser.add_argument("--actor", help="who runs it, for the record (default: the OS user)")
    parser.add_argument(
        "--chunk-rows",
        type=int,
        default=_DEFAULTS.chunk_rows,
        metavar="N",
        help=f"rows per chunk digest (default {_DEFAULTS.chunk_rows})",
    )
    parser.add_argument(
        "--recheck-timeout",
        type=float,
        default=_DEFAULTS.recheck_timeout_s,
        metavar="S",
        help="how long to wait for the consumers to pass a difference before reporting it "
        f"(default {_DEFAULTS.recheck_timeout_s:g} s)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none when stderr is no TTY)"
    )
    parser.set_defaults(handler=run)


class _RateColumn(ProgressColumn):
    """Rows per second of the task."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} rows/s", style="cyan")


class _Bar:
    """VerifyProgress drawn with rich on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task: Any = None

    def start(self, total_rows: int) -> None:
        self.task = self.progress.add_task("verify", total=total_rows)

    def advance(self, table: str, rows: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, advance=rows, description=f"verify {table}")

    def phase(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=text)


def run(args: argparse.Namespace, context: Context) -> int:
    if args.chunk_rows < 1:
        raise UsageError(f"--chunk-rows must be at least 1, not {args.chunk_rows}")
    if not args.recheck_timeout >= 0:
        raise UsageError(f"--recheck-timeout must be >= 0, not {args.recheck_timeout}")
    settings = context.settings
    mapping = load_mapping(settings.mapping_path)
    options = VerifyOptions(chunk_rows=args.chunk_rows, recheck_timeout_s=args.recheck_timeout)
    show = not args.no_progress and sys.stderr.isatty()
    bar = _Bar() if show else None
    kwargs: dict[str, Any] = {
        "domain": args.domain,
        "table": args.table,
        "resume": args.resume,
        "actor": default_actor(args.actor),
        "options": options,
    }
    if bar is not None:
        with bar.progress:
            report = run_verify(settings, mapping, progress=bar, **kwargs)
    else:
        report = run_verify(settings, mapping, **kwargs)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(Console(), report)
    if not report.passed:
        behind = [d for d in report.failed_domains if report.applied_lsn.get(d) == 0]
        if behind:
            # PositionReader reports 0 while a snapshot of the domain is pending or running.
            raise VerifyMismatch(
                f"not caught up yet: a snapshot of {', '.join(behind)} is still running (run "
                f"{report.run_id}); verify again once it is done ({report.mismatch_summary()})"
            )
        raise VerifyMismatch(report.headline())
    return 0


def print_report(console: Console, report: VerifyReport) -> None:
    table = Table(title=f"verify run {report.run_id}" + (" (resumed)" if report.resumed else ""))
    for col in ("table", "legacy", "commerce", "matching", "missing", "extra", "different"):
        table.add_column(col, justify="left" if col == "table" else "right")
    table.add_column("verdict")
    for t in report.tables:
        verdict = "[green]equal[/]" if t.passed else "[red]MISMATCH[/]"
        if t.unresolved:
            verdict += f" [yellow]({t.unresolved} unresolved)[/]"
        table.add_row(
            f"{t.table} -> {t.target}",
            f"{t.legacy_rows:,}"
            + (f" (+{t.absent_by_mapping:,} deleted)" if t.absent_by_mapping else ""),
            f"{t.commerce_rows:,}",
            f"{t.matching:,}",
            str(t.missing),
            str(t.extra),
            str(t.different),
            verdict,
        )
    console.print(table)
    for t in report.tables:
        for kind, samples in t.samples.items():
            for s in samples:
                cols = s.get("columns")
                how = f" columns {', '.join(map(str, cols))}" if isinstance(cols, list) else ""
                note = (
                    " (deleted in legacy by the mapping)"
                    if s.get("kind") == "deleted_in_source"
                    else ""
                )
                console.print(f"  {t.target} {kind} key {json.dumps(s['key'])}{how}{note}")
    for inv in report.invariants:
        mark = "[green]ok[/]" if inv.violations == 0 else f"[red]{inv.violations} violations[/]"
        if inv.legacy_violations:
            mark += f" [yellow](legacy's own: {inv.legacy_violations})[/]"
        console.print(f"invariant {inv.name}: {mark}  ({escape(inv.description)})")
        for s in inv.samples[:5]:
            console.print(escape(f"  key {s['key']}: {s['detail']}"))
    for line in report.explanations():
        console.print(f"[red]{line}[/]")
    verdict = "[green]PASSED[/]" if report.passed else "[red]FAILED[/]"
    console.print(
        f"{verdict}: {report.legacy_rows:,} legacy rows vs {report.commerce_rows:,} commerce rows "
        f"in {report.elapsed_s:.2f} s ({report.rows_per_s():,.0f} rows/s per side)"
    )
