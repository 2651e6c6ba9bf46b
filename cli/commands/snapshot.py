"""``cutover snapshot``: queue, list or cancel snapshots run by the producer.

``cutover snapshot --table T [--where FILTER]`` queues a (re-)snapshot: the request goes into
``cutover.snapshot_requests`` in the legacy database; the producer picks it up within a second
and reads the table (or the rows matching FILTER) in chunks between low/high watermarks,
interleaved with the stream (DBLog), so the snapshot never overwrites a newer streamed change.

FILTER is a restricted expression, not SQL: published columns of T, literals ('text', 42, 1.5,
TRUE, FALSE, NULL), = <> != < <= > >=, IS [NOT] NULL, [NOT] IN (...), [NOT] BETWEEN .. AND ..,
[NOT] LIKE / ILIKE, AND, OR, NOT, parentheses, casts (::date, ::timestamptz, ...) and a few
functions (lower, upper, length, coalesce, abs, ...). Anything else is refused (exit 2).

``cutover snapshot --list [--json]`` lists the requests with their status and progress;
``cutover snapshot --cancel ID`` cancels a pending or running request (the producer stops it
after the chunk in flight). A request whose filter or query fails is marked failed with the
reason. Progress is also in the producer's ``snapshot.chunk_done`` log events.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import TYPE_CHECKING, Any

from cutover.errors import UsageError

if TYPE_CHECKING:
    from cli.main import Context


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "snapshot",
        help="queue, list or cancel snapshots of tables (run by the producer)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--table", help="queue a snapshot of this source table (mapping name)")
    action.add_argument("--list", action="store_true", help="list the snapshot requests")
    action.add_argument("--cancel", type=int, metavar="ID", help="cancel an open request")
    parser.add_argument(
        "--where",
        metavar="FILTER",
        help="with --table: only rows matching FILTER, e.g. \"id < 1000 AND status = 'paid'\"",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    if args.where is not None and args.table is None:
        raise UsageError("--where goes with --table")
    if args.list:
        return _list(args, context)
    if args.cancel is not None:
        return _cancel(args, context)
    return _queue(args, context)


def _queue(args: argparse.Namespace, context: Context) -> int:
    from cutover.mapping import load_mapping
    from producers.snapshot import queue_request

    settings = context.settings
    mapping = load_mapping(settings.mapping_path)
    request_id = queue_request(
        settings.source.dsn,
        mapping=mapping,
        slot=settings.source.slot,
        publication=settings.source.publication,
        table=args.table,
        where=args.where,
        requested_by=getpass.getuser(),
    )
    if args.json:
        print(json.dumps({"request": request_id, "table": args.table, "where": args.where}))
    else:
        where = f" where {args.where}" if args.where else ""
        print(
            f"snapshot request {request_id} queued: {mapping.source_schema}.{args.table}{where}; "
            "the running producer picks it up (cutover snapshot --list shows its progress)"
        )
    return 0


def _list(args: argparse.Namespace, context: Context) -> int:
    from producers.snapshot import list_requests

    settings = context.settings
    requests = list_requests(settings.source.dsn, settings.source.slot)
    if args.json:
        print(json.dumps(requests, default=str))
        return 0
    if not requests:
        print(f"no snapshot requests on slot {settings.source.slot}")
    for r in requests:
        where = f" where {r['where']}" if r["where"] else ""
        error = f": {r['error']}" if r["error"] else ""
        print(
            f"{r['id']:>5}  {r['status']:<8} {r['kind']:<8} {r['table']}{where}  "
            f"{r['rows']} rows in {r['chunks']} chunks{error}"
        )
    return 0


def _cancel(args: argparse.Namespace, context: Context) -> int:
    from producers.snapshot import cancel_request

    settings = context.settings
    table = cancel_request(
        settings.source.dsn, settings.source.slot, args.cancel, by=getpass.getuser()
    )
    if args.json:
        print(json.dumps({"request": args.cancel, "table": table, "status": "failed"}))
    else:
        print(
            f"snapshot request {args.cancel} ({table}) cancelled; a running producer stops it "
            "after the chunk in flight"
        )
    return 0
