"""``cutover switch-writes D``: move the writes of domain D to commerce behind a write fence.

Gates: D reads_switched for at least ``[gates] min_reads_soak_minutes``; a passing verify of D
younger than ``verify_max_age_minutes``; forward lag 0; no open dead letters of D; the write fence
installed on legacy and commerce; the reverse path ready (reverse slot on commerce, fresh reverse
producer heartbeat). Steps, each recorded: fence legacy, wait for the forward appliers to pass
the fence LSN, final verify of D, check the reverse path and record its start, open commerce and
publish writes_switched. A failure before the publication lowers the fence again (D stays
reads_switched) and names the step. The audit record and --json carry the measured
write-unavailability window (window_ms). Re-running after a crash resumes;
``cutover rollback-writes D`` undoes an unfinished switch.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cli.commands.switch_reads import add_common, add_crash_hook, run_transition

if TYPE_CHECKING:
    from cli.main import Context

EPILOG = """\
examples:
  cutover switch-writes payment --dry-run
  cutover switch-writes payment --yes --json

exit codes: 0 switched (or already, or a dry run that would go ahead), 1 refused by a gate or
the final verify found differences (or not confirmed), 2 bad flags / no terminal and no --yes, 3
database or Kafka failure or a step that failed (the error names it)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "switch-writes",
        help="move a domain's writes to commerce behind the write fence (gated, audited)",
        description=(__doc__ or "").replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(parser)
    add_crash_hook(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, context: Context) -> int:
    return run_transition(args, context, "switch-writes")
