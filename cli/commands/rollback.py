"""``cutover rollback D``: return the reads of domain D to legacy (``replicating``), audited.

Only sanity checks apply (the domain is known, its state allows it, legacy answers); a rollback
also abandons a switch that did not finish. Asks for confirmation unless ``--yes``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cli.commands.switch_reads import add_common, run_transition

if TYPE_CHECKING:
    from cli.main import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "rollback",
        help="return a domain's reads to legacy (audited)",
        description=(__doc__ or "").replace("``", ""),
        epilog="exit codes: 0 rolled back (or already replicating), 1 refused or not confirmed, "
        "2 bad flags / no terminal and no --yes, 3 database or Kafka failure.",
    )
    add_common(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    return run_transition(args, context, "rollback")
