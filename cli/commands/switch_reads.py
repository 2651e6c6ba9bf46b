"""``cutover switch-reads D``: switch the reads of domain D to commerce, gated and audited.

The gates (``cutover status`` shows them): a passing verify of D younger than
``[gates] verify_max_age_minutes``; apply lag of D at most ``max_apply_lag_events``; no open
dead letters of D; a fresh producer heartbeat; a healthy replication slot. ``--dry-run``
evaluates them and changes nothing. A refusal names each failing gate with its evidence.
``--force --reason TEXT`` overrides the non-critical gates (a lost or missing slot and a verify
that found differences are critical). Every attempt is recorded in the audit trail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, get_args

from rich.console import Console
from rich.markup import escape
from rich.prompt import Confirm

from control.audit import default_actor
from control.machine import CrashPoint
from control.state import (
    CommandOutcome,
    CrashForTest,
    complete,
    rollback,
    rollback_writes,
    switch_reads,
    switch_writes,
)
from cutover.errors import GateRefused, UsageError
from cutover.mapping import load_mapping

if TYPE_CHECKING:
    from cli.main import Context

EPILOG = """\
examples:
  cutover switch-reads payment --dry-run
  cutover switch-reads payment --yes
  cutover switch-reads data --force --reason "INC-1234: DLQ entries are known test rows" --yes

exit codes: 0 switched (or already switched, or a dry run that would go ahead), 1 refused by a
gate (or a dry run that would be refused, or not confirmed), 2 bad flags / no terminal and no
--yes, 3 database or Kafka failure (a half-done switch is completed by re-running)."""


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", help="the domain (payment, data, merchant, ...)")
    parser.add_argument("--dry-run", action="store_true", help="evaluate, change nothing")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--force", action="store_true", help="override non-critical gates")
    parser.add_argument("--reason", metavar="TEXT", help="why (required with --force; audited)")
    parser.add_argument("--actor", help="who, for the audit trail (default: the OS user)")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")


def add_crash_hook(parser: argparse.ArgumentParser) -> None:
    """Fault tests only, hidden from --help: ``--crash-at POINT`` makes the process SIGKILL
    itself right after the named step of a write transition was recorded, so a test can kill -9
    the real command at a deterministic step (polling for the step from outside races with it).
    An option rather than an environment variable: nothing below the entry point reads one."""
    points = get_args(get_args(CrashPoint)[0])
    parser.add_argument("--crash-at", choices=points, help=argparse.SUPPRESS)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "switch-reads",
        help="switch a domain's reads to commerce (gated, audited)",
        description=(__doc__ or "").replace("``", ""),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(parser)
    parser.set_defaults(handler=run)


def confirmation(args: argparse.Namespace, command: str) -> Callable[[str], bool] | None:
    """None with --yes or --dry-run; a prompt on a terminal; a usage error (exit 2) otherwise."""
    if args.yes or args.dry_run:
        return None
    if not sys.stdin.isatty():
        raise UsageError(
            f"{command} asks for confirmation and there is no terminal: pass --yes to confirm "
            "non-interactively (or --dry-run to only evaluate)"
        )
    return lambda prompt: Confirm.ask(prompt, default=False, console=Console(stderr=True))


#: The core of each transition command (control.state).
CORES = {
    "switch-reads": switch_reads,
    "rollback": rollback,
    "switch-writes": switch_writes,
    "rollback-writes": rollback_writes,
    "complete": complete,
}


def run_transition(args: argparse.Namespace, context: Context, command: str) -> int:
    if args.force and not (args.reason and args.reason.strip()):
        raise UsageError("--force needs --reason TEXT: the override is audited with it")
    confirm = confirmation(args, command)
    settings = context.settings
    mapping = load_mapping(settings.mapping_path)
    core = CORES[command]
    try:
        outcome = core(
            settings,
            list(mapping.domains),
            args.domain,
            actor=default_actor(args.actor),
            dry_run=args.dry_run,
            force=args.force,
            reason=args.reason,
            confirm=confirm,
            crash_at=getattr(args, "crash_at", None),
        )
    except CrashForTest:
        os.kill(os.getpid(), signal.SIGKILL)  # --crash-at: die as kill -9 would, no clean-up
        raise
    except GateRefused as exc:
        if args.json:
            print(
                json.dumps(
                    {
                        "command": command,
                        "domain": args.domain,
                        "outcome": "refused",
                        "message": exc.message,
                        "failing": exc.failing,
                    },
                    indent=2,
                )
            )
        raise
    if args.json:
        print(json.dumps(outcome.to_json(), indent=2, default=str))
    else:
        print_outcome(Console(), outcome)
    return outcome.exit_code


def print_outcome(console: Console, outcome: CommandOutcome) -> None:
    for g in outcome.gates:
        mark = (
            "[green]pass[/]"
            if g.passed
            else ("[red]FAIL (critical)[/]" if g.critical else "[red]FAIL[/]")
        )
        console.print(f"  {g.name}: {mark}  {escape(g.why)}")
    if outcome.overridden:
        console.print(f"[yellow]forced past: {', '.join(outcome.overridden)}[/]")
    console.print(escape(outcome.message))
    window = outcome.detail.get("window_ms")
    if window is not None:
        console.print(f"write-unavailability window: {window} ms")


def run(args: argparse.Namespace, context: Context) -> int:
    return run_transition(args, context, "switch-reads")
