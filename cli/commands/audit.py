"""``cutover audit``: the audit trail of the cutover (who did what, when, with which gates)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from control.audit import list_entries
from control.state import open_control
from cutover.errors import UsageError

if TYPE_CHECKING:
    from cli.main import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("audit", help="list the cutover audit trail", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print as JSON (gates with evidence)")
    parser.add_argument("--domain", help="only entries of this domain")
    parser.add_argument(
        "--limit", type=int, default=100, metavar="N", help="latest N (default 100)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    if args.limit < 1:
        raise UsageError(f"--limit must be at least 1, not {args.limit}")
    settings = context.settings
    conn = open_control(settings, [])
    try:
        entries = list_entries(
            conn, settings.target.control_schema, domain=args.domain, limit=args.limit
        )
    finally:
        conn.close()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2, default=str))
        return 0
    console = Console()
    if not entries:
        console.print("the audit trail is empty")
        return 0
    table = Table(title=f"cutover audit ({len(entries)})")
    for col in ("id", "at (UTC)", "actor", "command", "domain", "outcome", "states", "gates"):
        table.add_column(col, overflow="fold")
    for e in entries:
        states = f"{e.from_state or '-'} -> {e.to_state or '-'}"
        outcome = escape(e.outcome) + (" [yellow](forced)[/]" if e.forced else "")
        if e.reason:
            outcome += f"\nreason: {escape(e.reason)}"
        table.add_row(
            str(e.audit_id),
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            e.actor,
            e.command,
            e.domain or "-",
            outcome,
            states,
            e.gates_summary(),
        )
    console.print(table)
    return 0
