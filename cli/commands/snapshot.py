"""``cutover snapshot --table T [--where SQL]``: queue a (re-)snapshot for the running producer.

The request goes into ``cutover.snapshot_requests`` in the legacy database; the producer picks
it up within a second and reads the table (or the rows matching ``--where``) in chunks between
low/high watermarks, interleaved with the stream (DBLog), so the snapshot never overwrites a
newer streamed change. Progress is in ``cutover.snapshot_progress`` and in the producer's
``snapshot.chunk_done`` log events.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cli.main import Context


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "snapshot",
        help="queue a snapshot of a table (or of the rows matching --where) for the producer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--table", required=True, help="source table, as named in the mapping")
    parser.add_argument(
        "--where",
        metavar="SQL",
        help='only rows matching this SQL condition on the source table, e.g. "id < 1000"',
    )
    parser.add_argument("--json", action="store_true", help="print the request as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    from cutover.mapping import load_mapping
    from producers.snapshot import queue_request

    settings = context.settings
    mapping = load_mapping(settings.mapping_path)
    request_id = queue_request(
        settings.source.dsn,
        mapping=mapping,
        slot=settings.source.slot,
        table=args.table,
        where_sql=args.where,
        requested_by=getpass.getuser(),
    )
    if args.json:
        print(json.dumps({"request": request_id, "table": args.table, "where": args.where}))
    else:
        where = f" where {args.where}" if args.where else ""
        print(
            f"snapshot request {request_id} queued: {mapping.source_schema}.{args.table}{where}; "
            "the running producer picks it up (progress: cutover.snapshot_progress)"
        )
    return 0
