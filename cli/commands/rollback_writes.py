"""``cutover rollback-writes D``: return the writes of domain D to legacy.

Steps, each recorded: fence commerce for D, wait until the reverse appliers applied everything
up to commerce's fence LSN into legacy, verify D, lower legacy's fence, publish reads_switched.
Audited with the write-unavailability window. From an unfinished switch-writes it undoes the
switch (unfences legacy). Only sanity checks gate it: legacy must answer.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cli.commands.switch_reads import add_common, add_crash_hook, run_transition

if TYPE_CHECKING:
    from cli.main import Context

EPILOG = """\
examples:
  cutover rollback-writes payment --dry-run
  cutover rollback-writes payment --yes --json

exit codes: 0 rolled back (or writes already on legacy), 1 refused, the verify found
differences or not confirmed, 2 bad flags / no terminal and no --yes, 3 database or Kafka failure
or a step that failed (the error names it)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "rollback-writes",
        help="return a domain's writes to legacy (fence commerce, drain reverse; audited)",
        description=(__doc__ or "").replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(parser)
    add_crash_hook(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    return run_transition(args, context, "rollback-writes")
