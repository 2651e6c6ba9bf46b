"""``cutover complete D``: finish domain D: legacy's tables become read-only history.

Gates: D writes_switched for at least ``[gates] min_writes_soak_minutes``; a passing verify of D
no older than the limit; reverse lag 0. Then D's commerce tables leave the reverse publication,
legacy's fence of D stays raised for good, and D is completed. Completing the last domain also
drops the forward slot and publication on legacy (refused while the slot is active: stop
`cutover produce` first).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cli.commands.switch_reads import add_common, run_transition

if TYPE_CHECKING:
    from cli.main import Context

EPILOG = """\
examples:
  cutover complete payment --dry-run
  cutover complete payment --yes --json

exit codes: 0 completed (or already), 1 refused by a gate (or not confirmed), 2 bad flags /
no terminal and no --yes, 3 database or Kafka failure or a step that failed."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "complete",
        help="finish a domain: stop its reverse stream, legacy stays fenced (gated, audited)",
        description=(__doc__ or "").replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    return run_transition(args, context, "complete")
