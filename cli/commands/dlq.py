"""`cutover dlq list` / `cutover dlq retry`: inspect and re-drive dead letters.

``list`` reads ``cutover.dead_letters`` (``--json`` for machines, a table for people);
``retry`` re-decodes the stored payloads with the current schemas and mapping and applies them
through the apply path's sink (position guards included), marking each 'retried' on success and
keeping it 'open' with the new error otherwise. Exit 1 when a retried letter failed again.
``--reverse``: the reverse appliers' letters (commerce → legacy), kept in legacy's
``[reverse] control_schema``, retried through the legacy sink.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consumers.dlq import list_dead_letters, retry_dead_letters
from cutover import direction
from cutover.errors import UsageError

STATUSES = ("open", "retried", "resolved", "all")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "dlq",
        help="inspect and re-drive dead letters",
        description="Inspect (list) and re-drive (retry) poison messages recorded by the apply "
        "consumers in cutover.dead_letters (also on the <prefix>.dlq topic).",
    )
    actions = parser.add_subparsers(dest="dlq_action", metavar="ACTION")
    actions.required = True
    lister = actions.add_parser("list", help="list dead letters (oldest first)")
    lister.add_argument("--json", action="store_true", help="JSON for machines")
    lister.add_argument(
        "--status", choices=STATUSES, default="all", help="only letters in this status"
    )
    _add_reverse(lister)
    lister.set_defaults(handler=run_list)
    retry = actions.add_parser(
        "retry", help="re-apply open dead letters with the current mapping and data"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, help="the dead letter to retry")
    which.add_argument("--all", action="store_true", help="every open dead letter")
    retry.add_argument("--json", action="store_true", help="JSON for machines")
    _add_reverse(retry)
    retry.set_defaults(handler=run_retry)
    parser.set_defaults(handler=run_list, json=False, status="all", reverse=False)


def _add_reverse(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="the reverse appliers' letters (commerce -> legacy; in legacy's [reverse] "
        "control_schema)",
    )


def run_list(args: argparse.Namespace, context: Any) -> int:
    status = None if args.status == "all" else args.status
    way = direction.of(context.settings, reverse_way=args.reverse)
    letters = list_dead_letters(context.settings, status, way)
    if args.json:
        json.dump([letter.as_json() for letter in letters], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = Console()
    if not letters:
        console.print("no dead letters" + (f" with status {status}" if status else ""))
        return 0
    table = Table(title=f"dead letters ({len(letters)})")
    for col in ("id", "status", "topic [partition] @offset", "table", "error"):
        table.add_column(col, overflow="fold")
    for letter in letters:
        where = escape(f"{letter.topic} [{letter.partition}] @{letter.offset}")
        table.add_row(
            letter.label,
            letter.status,
            f"{letter.topic} (withheld by the producer)" if letter.origin == "producer" else where,
            letter.source_table or "-",
            escape(f"{letter.error_class}: {letter.error_message}"),
        )
    console.print(table)
    return 0


def run_retry(args: argparse.Namespace, context: Any) -> int:
    if args.id is not None and args.id <= 0:
        raise UsageError("--id takes a dead letter id from `cutover dlq list`")
    way = direction.of(context.settings, reverse_way=args.reverse)
    report = retry_dead_letters(context.settings, None if args.all else args.id, way)
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        console = Console()
        if not report.retried and not report.failed:
            target = "open dead letters" if args.all else f"an open dead letter with id {args.id}"
            console.print(f"no {target}")
        for lid in report.retried:
            console.print(f"dead letter {lid}: retried, applied")
        for lid, cls, message in report.failed:
            console.print(
                escape(f"dead letter {lid}: still failing, stays open ({cls}: {message})")
            )
    return 1 if report.failed else 0
