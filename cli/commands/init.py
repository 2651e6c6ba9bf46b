"""``cutover init``: preflight checks, then create (idempotently) what the pipeline needs.

Thin shell over :func:`producers.init.run_init`: parse, call, print (a rich table, or JSON with
``--json``). Exit 0 when everything exists or was created, 1 when a preflight check failed
(nothing is changed then), 3 when a server refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from cli.main import Context

DESCRIPTION = """\
Check the source database, then create what is missing, and say what was created and what was
already there. Running it again changes nothing.

Preflight (nothing is changed unless all pass): PostgreSQL >= 15, wal_level = logical, a free
replication slot, the REPLICATION privilege; every mapped table exists, has the mapping's primary
key and a usable replica identity; every column is either read by the mapping or excluded.

Creates: the legacy control tables (schema cutover), a replica-identity index where a table's
aggregate key is not in its primary key (so deletes carry their Kafka key), the publication with
column lists (pgoutput never sends excluded columns; an existing publication with other columns is
altered, and init says so), the pgoutput slot, the Kafka topics (domain topics, dlq, compacted
control and schemas), the commerce control tables, and with --target-ddl the commerce schema;
then the write fence (lowered) on every domain table of legacy and commerce (switch-writes and
rollback-writes raise it).

With --reverse, also prepares the reverse path of the write cutover (commerce -> legacy), before
any fence: preflight of commerce (wal_level = logical, a free slot, the mapped commerce tables'
keys and replica identity), the producer's control tables in commerce, the [reverse]
publication (every mapped commerce table, key and mapped columns) and slot, the topics
<prefix>.reverse.<domain>, and the reverse appliers' control tables in legacy ([reverse]
control_schema). Its entries are prefixed "reverse: ".

With --print-grants, print the least-privilege roles and grants for the configured mapping as
SQL (one part per database, after a "-- @database legacy|commerce" line), connect to nothing
and change nothing. Run each part as an administrator in its database after cutover init;
passwords are not included (set them with psql \\password ROLE). Role names: [roles].
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "init",
        help="preflight checks; create publication, slot, topics, control tables (idempotent)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target-ddl",
        type=Path,
        metavar="FILE",
        help="load this DDL into the commerce database if the target schema is missing "
        "(e.g. examples/shop/commerce.sql)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run the preflight checks and change nothing"
    )
    parser.add_argument(
        "--resnapshot",
        action="store_true",
        help="after a lost or moved slot: accept the slot's position, empty the commerce "
        "tables, and snapshot every table again on the next `cutover produce` (refused while a "
        "domain serves reads from commerce or the consumers still have messages to apply)",
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="also prepare the reverse path (commerce -> legacy) of the write cutover",
    )
    parser.add_argument(
        "--print-grants",
        action="store_true",
        help="print the least-privilege roles and grants ([roles]) as SQL for both databases; "
        "executes nothing",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=run)


def _print_grants(context: Context) -> int:
    from cutover import grants
    from cutover.mapping import load_mapping

    settings = context.settings
    mapping = load_mapping(settings.mapping_path)
    databases = (grants.database_of(settings.source.dsn), grants.database_of(settings.target.dsn))
    print(grants.render(grants.grant_scripts(settings, mapping, databases)), end="")
    return 0


def run(args: argparse.Namespace, context: Context) -> int:
    from control.write_switch import install_fences
    from cutover.mapping import load_mapping
    from producers.init import run_init

    if args.print_grants:
        return _print_grants(context)
    report = run_init(
        context.settings,
        target_ddl=args.target_ddl,
        dry_run=args.dry_run,
        resnapshot_all=args.resnapshot,
    )
    if args.reverse:
        from producers.init_reverse import prepare_reverse

        prepare_reverse(context.settings, report)
    if not args.dry_run:
        # The write fence (lowered) on both sides' domain tables: switch-writes raises it.
        mapping = load_mapping(context.settings.mapping_path)
        for obj, status, detail in install_fences(context.settings, mapping):
            report.action(obj, status, detail)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    console = Console(file=sys.stdout)
    checks = Table(title="preflight", show_lines=False)
    checks.add_column("check")
    checks.add_column("ok")
    checks.add_column("detail", overflow="fold")
    for c in report.checks:
        checks.add_row(c["check"], "yes" if c["ok"] else "NO", escape(c["detail"]))
    console.print(checks)
    actions = Table(title="objects" + (" (dry run)" if report.dry_run else ""))
    actions.add_column("object")
    actions.add_column("status")
    actions.add_column("detail", overflow="fold")
    for a in report.actions:
        actions.add_row(a["object"], a["status"], escape(a.get("detail", "")))
    console.print(actions)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    return 0
