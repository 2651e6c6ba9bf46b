"""``cutover produce``: run the CDC producer (initial snapshot if needed, then stream).

Thin shell over :func:`producers.producer.run_producer`. The environment is read here and only
here: ``CUTOVER_CRASH_AT`` (fault tests) goes into the frozen :class:`ProducerOptions`. SIGTERM
and SIGINT finish the deliveries in flight, advance the slot and exit 0. A failed delivery, a
slot that moved behind our back, an incompatible schema change or a TRUNCATE of a table whose
``on_truncate`` is "stop" exit 3 (the last names its ``--carry-truncate`` resume); a second
producer on the same slot is refused with exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from cutover import metrics

if TYPE_CHECKING:
    from cli.main import Context

DESCRIPTION = """\
Read every committed change of the captured tables from the logical slot (pgoutput, peek), turn
it into an Avro change event and produce it to the domain topic with key = aggregate id. The
slot is advanced only after Kafka acknowledged every event up to that commit, so a crash loses
nothing (it may repeat events, with the same source position). Tables that were never
snapshotted are loaded first, in chunks interleaved with the stream (DBLog watermarks);
requests from `cutover snapshot` are picked up while running.

With --reverse, the same producer runs the reverse direction of the write cutover: it reads
commerce ([target] dsn) through the [reverse] slot and publication, keeps its state in commerce
([target] control_schema) and produces to <prefix>.reverse.<domain> (no snapshot: legacy already
holds every row). Either direction drops the transactions our appliers wrote (no echo).

Stop with SIGTERM or Ctrl-C: in-flight deliveries finish, the slot is advanced, exit 0.
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "produce",
        help="run the CDC producer (initial snapshot if needed, then stream)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--no-initial-snapshot",
        action="store_true",
        help="do not queue initial snapshots of tables that were never snapshotted",
    )
    parser.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="stop (exit 0) once the slot is drained and no snapshot is left",
    )
    parser.add_argument(
        "--max-runtime", type=float, metavar="SECONDS", help="stop (exit 0) after this long"
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="capture commerce for the reverse direction (commerce -> legacy)",
    )
    parser.add_argument(
        "--carry-truncate",
        action="append",
        default=[],
        metavar="SCHEMA.TABLE@LSN",
        help='carry this one TRUNCATE although the table\'s on_truncate is "stop" (the stop '
        "message prints the exact option); repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report when stopped")
    metrics.add_port_argument(parser)
    parser.set_defaults(handler=run, graceful_stop=True)


class _SnapshotBars:
    """A rich progress bar per snapshot request, with rows/s (only on a terminal)."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("snapshot {task.fields[table]}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.fields[estimate]} rows"),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.tasks: dict[int, TaskID] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        request = int(event["request"])
        estimate = event.get("estimate")
        if request not in self.tasks:
            self.tasks[request] = self.progress.add_task(
                "snapshot",
                total=estimate or None,
                table=event["table"],
                estimate=f"{estimate:,}" if estimate else "?",
                rate="-",
            )
        task_id = self.tasks[request]
        self.progress.update(task_id, completed=event["rows"])
        task = self.progress.tasks[self.tasks[request]]
        speed = task.speed
        self.progress.update(task_id, rate=f"{speed:,.0f}" if speed else "-")
        if event.get("done"):
            self.progress.update(task_id, total=event["rows"], completed=event["rows"])


def run(args: argparse.Namespace, context: Context) -> int:
    from cutover import direction
    from producers.producer import run_producer
    from producers.run_options import options_from_environ
    from producers.truncates import parse_carry

    options = options_from_environ(
        context.environ,
        initial_snapshot=not args.no_initial_snapshot,
        exit_when_idle=args.exit_when_idle,
        max_runtime_s=args.max_runtime,
        carry_truncates=tuple(parse_carry(text) for text in args.carry_truncate),
    )
    settings = context.settings
    way = direction.of(settings, reverse_way=args.reverse)
    metrics.serve_if_asked(args.metrics_port, settings.metrics_port)
    if sys.stderr.isatty():
        bars = _SnapshotBars()
        with bars.progress:
            report = run_producer(
                settings, options, progress=bars, install_signals=True, direction=way
            )
    else:
        # Not a terminal: progress is in the snapshot.chunk_done log events.
        report = run_producer(settings, options, install_signals=True, direction=way)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 0
