"""`cutover replay record` / `cutover replay play`: topic ranges to Avro files and back.

Thin: parses, builds :class:`consumers.replay.Filters`, draws a progress bar on a terminal, calls
:func:`consumers.replay.record`, :func:`consumers.replay.play_to_topic` or
:func:`consumers.replay.play_to_target`, and prints a summary (a table, or ``--json``). Errors map
to exit codes in :mod:`cli.main`: a missing file, an unknown topic or an empty range exit 2,
a damaged file or a server that fails exit 3.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from cli.main import Context
    from consumers.replay import Filters
    from cutover.config import Settings

DESCRIPTION = """\
Testers' tool: record a range of a topic to an Avro object container file (any Avro reader
reads it: each message's topic, partition, offset, timestamp, key, headers and decoded value,
with the writer schemas embedded), and play such a file back into a topic or into a sandbox
commerce database (through the same apply path as `cutover apply`)."""

RECORD_EPILOG = """\
ranges are half-open: --from-* inclusive, --to-* exclusive; without --to-* the range ends at
the topic's end when recording starts (it stops by itself). Times are ISO 8601, UTC unless they
carry an offset.

examples:
  cutover replay record --topic shop.payment --out payment.avro
  cutover replay record --topic shop.payment --from-time 2025-01-31T12:00:00Z \\
      --to-time 2025-01-31T12:05:00Z --table orders --out five-minutes.avro
  cutover replay record --topic shop.data --partition 2 --from-offset 1000 --to-offset 2000 \\
      --key 42 --out user-42.avro

exit codes: 0 recorded, 2 unknown topic, empty range or bad flags, 3 Kafka failure."""

PLAY_EPILOG = """\
examples:
  cutover replay play payment.avro --to-topic sandbox.payment
  cutover replay play payment.avro --to-target postgresql://me@localhost/sandbox --rate 1x
  cutover replay play payment.avro --to-topic sandbox.payment --rate 5000 --table orders

--to-topic keeps partition numbers, keys, headers, value bytes and the order per partition; the
writer schemas go to <prefix>.schemas of the target topic when that topic exists.
--to-target needs a database with the commerce schema and the control tables (`cutover init`);
poison messages land in its cutover.dead_letters (group cutover-replay). Playing one file into
an empty sandbox gives the same tables every time.

--to-target refuses a live database (exit 2): the configured target (compared by the server's
system identifier and the database oid, not by DSN text), or any database that holds consumer
positions (cutover.consumer_offsets) or a cutover state (cutover.domain_state).
--i-know-this-is-live REASON plays anyway and writes REASON to the audit trail of the configured
target (`cutover audit`).

exit codes: 0 played, 2 missing file, unknown topic, bad flags or a live target, 3 damaged file
or server failure."""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "replay",
        help="record a topic range to an Avro file; play it into a topic or a sandbox database",
        description=DESCRIPTION,
    )
    actions = parser.add_subparsers(dest="replay_action", metavar="ACTION")
    actions.required = True

    rec = actions.add_parser(
        "record",
        help="record a topic range to an Avro object container file",
        description="Record a range of a topic to an Avro object container file.",
        epilog=RECORD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rec.add_argument("--topic", required=True, help="the topic to record")
    rec.add_argument("--out", required=True, type=Path, metavar="FILE.avro", help="output file")
    _add_filters(rec)
    rec.add_argument(
        "--schemas-topic",
        metavar="TOPIC",
        help="where the writer schemas are (default: <prefix>.schemas of --topic)",
    )
    _add_output(rec)
    rec.set_defaults(handler=run_record)

    play = actions.add_parser(
        "play",
        help="play a recorded file into a topic or a sandbox commerce database",
        description="Play a file written by `cutover replay record`.",
        epilog=PLAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    play.add_argument("file", type=Path, metavar="FILE.avro", help="a file from replay record")
    where = play.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-topic", metavar="TOPIC", help="re-publish into this topic")
    where.add_argument(
        "--to-target",
        metavar="DSN",
        help="apply into this sandbox commerce database (libpq DSN or URL)",
    )
    play.add_argument(
        "--rate",
        help="max (default: as fast as possible), N events per second, or Nx a multiple of "
        "the recorded real time (1x, 10x, 0.5x)",
    )
    _add_filters(play)
    play.add_argument(
        "--schemas-topic",
        metavar="TOPIC",
        help="--to-topic: publish the writer schemas here (default: <prefix>.schemas of it)",
    )
    play.add_argument(
        "--i-know-this-is-live",
        dest="live_reason",
        metavar="REASON",
        help="--to-target: play into a live database anyway; REASON is audited",
    )
    play.add_argument(
        "--actor", help="--to-target: who, for the audit trail (default: the OS user)"
    )
    play.add_argument(
        "--batch-events",
        type=int,
        metavar="N",
        help="--to-target: events per apply batch (default: [apply] batch_max_events)",
    )
    _add_output(play)
    play.set_defaults(handler=run_play)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("range and filters")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--from-offset", type=int, metavar="N", help="first offset (inclusive)")
    start.add_argument("--from-time", metavar="ISO", help="first message time (inclusive)")
    end = g.add_mutually_exclusive_group()
    end.add_argument("--to-offset", type=int, metavar="N", help="end offset (exclusive)")
    end.add_argument("--to-time", metavar="ISO", help="end time (exclusive)")
    g.add_argument(
        "--partition", type=int, action="append", metavar="P", help="only this partition (repeat)"
    )
    g.add_argument(
        "--key", action="append", metavar="K", help="only messages with this key (repeat)"
    )
    g.add_argument(
        "--table",
        action="append",
        metavar="T",
        help="only change events of this source table, e.g. orders or shop.orders (repeat)",
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def _filters(args: argparse.Namespace) -> Filters:
    from consumers.replay import make_filters

    return make_filters(
        partitions=args.partition,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
        from_time=args.from_time,
        to_time=args.to_time,
        keys=args.key,
        tables=args.table,
    )


@contextmanager
def _progress_bar(enabled: bool | None, what: str) -> Iterator[Callable[[int, int], None] | None]:
    console = Console(stderr=True)
    if enabled is False or (enabled is None and not console.is_terminal):
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def run_record(args: argparse.Namespace, context: Context) -> int:
    from consumers.replay import record

    filters = _filters(args)
    settings = context.settings
    with _progress_bar(args.progress, f"recording {args.topic}") as progress:
        summary = record(
            settings.kafka,
            args.topic,
            args.out,
            filters,
            schemas_topic=args.schemas_topic,
            progress=progress,
        )
    if args.json:
        json.dump(summary.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    table = Table(title=f"recorded {summary.topic} → {summary.out}")
    for col in ("partition", "offsets [from, to)"):
        table.add_column(col)
    for p, (a, b) in sorted(summary.partitions.items()):
        table.add_row(str(p), f"[{a}, {b})")
    console = Console()
    console.print(table)
    console.print(
        f"{summary.events} messages written ({summary.scanned} read, "
        f"{summary.raw_values} kept undecoded, {summary.schemas} writer schemas), "
        f"{summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f}s "
        f"({summary.events_per_s:,.0f} msg/s)"
    )
    return 0


def run_play(args: argparse.Namespace, context: Context) -> int:
    from consumers.replay import parse_rate, play_to_target, play_to_topic
    from cutover.errors import UsageError

    filters = _filters(args)
    rate = parse_rate(args.rate)
    if args.batch_events is not None and args.to_target is None:
        raise UsageError("--batch-events applies to --to-target only")
    if args.live_reason is not None and args.to_target is None:
        raise UsageError("--i-know-this-is-live applies to --to-target only")
    settings = context.settings
    if args.to_target is not None:
        _refuse_live_target(args, settings)
    what = f"playing {args.file.name}"
    with _progress_bar(args.progress, what) as progress:
        if args.to_topic is not None:
            summary = play_to_topic(
                settings.kafka,
                args.file,
                args.to_topic,
                filters,
                rate,
                schemas_topic=args.schemas_topic,
                progress=progress,
            )
        else:
            summary = play_to_target(
                settings,
                args.file,
                args.to_target,
                filters,
                rate,
                batch_events=args.batch_events,
                progress=progress,
            )
    if args.json:
        json.dump(summary.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = Console()
    line = (
        f"played {summary.played} messages of {summary.source} into {summary.destination} "
        f"({summary.rate}) in {summary.seconds:.1f}s ({summary.events_per_s:,.0f} msg/s)"
    )
    if summary.skipped:
        line += f"; {summary.skipped} filtered out"
    if args.to_target is not None:
        line += (
            f"; {summary.upserted} rows upserted, {summary.deleted} deleted, "
            f"{summary.dead_letters} dead letters"
        )
    console.print(escape(line))  # file and database names are the user's: not markup
    if summary.open_units_at_end:
        console.print(
            f"note: the file ends inside a source transaction on {summary.open_units_at_end} "
            "partition(s): what it holds of them was applied"
        )
    return 0


def _refuse_live_target(args: argparse.Namespace, settings: Settings) -> None:
    """Exit 2 when ``--to-target`` names a live database, unless overridden (then audited)."""
    from consumers.replay import check_live_target
    from cutover.errors import UsageError, redact_dsn

    reasons = check_live_target(settings, args.to_target)
    if not reasons:
        return
    reason = (args.live_reason or "").strip()
    if not reason:
        raise UsageError(
            f"refusing to play into {redact_dsn(args.to_target)}: it looks live: "
            + "; ".join(reasons)
            + ". Play into a sandbox, or pass --i-know-this-is-live REASON (audited)"
        )
    _audit_override(args, settings, reasons, reason)


def _audit_override(
    args: argparse.Namespace, settings: Settings, reasons: list[str], reason: str
) -> None:
    """The override goes to the audit trail of the configured target before anything is played:
    no audit entry, no play."""
    import psycopg

    from control.audit import default_actor, record
    from cutover import pg
    from cutover.control_store import ensure_control_plane
    from cutover.errors import redact_dsn

    schema = settings.target.control_schema
    doing = "auditing the override in the configured target"
    try:
        with pg.connect(
            settings.target.dsn,
            side="target",
            connect_timeout=10,
            application_name="cutover replay",
            doing=doing,
        ) as conn:
            ensure_control_plane(conn, schema)
            record(
                conn,
                schema,
                actor=default_actor(args.actor),
                command="replay play",
                outcome="forced",
                forced=True,
                reason=reason,
                detail={
                    "file": str(args.file),
                    "target": redact_dsn(args.to_target),
                    "live_because": reasons,
                },
            )
    except psycopg.Error as exc:
        raise pg.translate(exc, doing, "target") from None
