"""The ``cutover`` command line: a thin shell that parses, builds settings once, calls one core
function per command, and maps the exception tree to exit codes.

Exit codes: 0 ok, 1 check failed or gate refused, 2 usage or configuration error, 3 runtime
failure. Each command lives in ``cli/commands/<name>.py`` and exposes ``register(subparsers)``;
the parser it adds sets ``handler`` to a function ``(args, context) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cutover import logging as cutover_logging
from cutover import shutdown
from cutover.config import Settings, environ_snapshot, load_settings
from cutover.errors import CutoverError


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, the module that registers it, its line in ``cutover --help``."""

    name: str
    module: str
    help: str


# Order here is the order in `cutover --help`. The help line is repeated here (each module's
# parser has it too; a unit test keeps them equal) so that ``cutover X`` imports X's module only:
# the modules pull in Kafka, Avro, the console's web stack..., about 0.5 s of imports for all,
# paid by every process a script or a test starts.
COMMANDS: tuple[Command, ...] = tuple(
    Command(name, f"cli.commands.{name.replace('-', '_')}", line)
    for name, line in (
        ("init", "preflight checks; create publication, slot, topics, control tables (idempotent)"),
        ("produce", "run the CDC producer (initial snapshot if needed, then stream)"),
        ("snapshot", "queue, list or cancel snapshots of tables (run by the producer)"),
        ("apply", "run one apply consumer (run several for a consumer group)"),
        ("dlq", "inspect and re-drive dead letters"),
        ("verify", "mapping-aware consistency check (exit 1 on persistent mismatch)"),
        ("status", "per domain: cutover state, gates, lag, last verify; weighted progress"),
        ("switch-reads", "switch a domain's reads to commerce (gated, audited)"),
        ("rollback", "return a domain's reads to legacy (audited)"),
        (
            "switch-writes",
            "move a domain's writes to commerce behind the write fence (gated, audited)",
        ),
        (
            "rollback-writes",
            "return a domain's writes to legacy (fence commerce, drain reverse; audited)",
        ),
        (
            "complete",
            "finish a domain: stop its reverse stream, legacy stays fenced (gated, audited)",
        ),
        ("audit", "list the cutover audit trail"),
        (
            "monitor",
            "live view: topics, partitions, group lag, apply rate/latency, slot, dead letters",
        ),
        (
            "replay",
            "record a topic range to an Avro file; play it into a topic or a sandbox database",
        ),
        (
            "console",
            "serve the web console (overview, actions, audit, dead letters) behind a login",
        ),
    )
)

# Commands that live outside the product: the dev tools plug ``cutover workload`` in when they
# are importable (a source checkout, which is what ``make`` installs); a wheel built from this
# repository leaves them out, and so does its ``cutover --help``.
PLUGIN_COMMANDS: tuple[Command, ...] = (
    Command(
        "workload",
        "devtools.workload_command",
        "generate realistic shop traffic on the old database",
    ),
)

Handler = Callable[[argparse.Namespace, "Context"], int]


@dataclass
class Context:
    """What every command gets: the settings (loaded on first use) and the environment snapshot."""

    config_path: Path | None
    environ: dict[str, str]
    _settings: Settings | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path, self.environ)
        return self._settings


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line hint, as the contract says."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


class _Unparsable(Exception):
    """The pre-parse could not tell the command: every command's module is loaded instead."""


class _PreParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Unparsable(message)


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="config file (TOML); default ./cutover.toml")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON log lines (default: JSON when stderr is not a terminal)",
    )


def command_named(argv: Sequence[str] | None) -> str | None:
    """The command ``argv`` names, read with the global options' own rules (abbreviations and
    ``--opt=value`` included), or None when that cannot be told."""
    pre = _PreParser(add_help=False)
    _global_options(pre)
    pre.add_argument("command", nargs="?")
    try:
        known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    except _Unparsable:
        return None
    return known.command if isinstance(known.command, str) else None


def _plugins() -> list[Command]:
    found = []
    for command in PLUGIN_COMMANDS:
        try:
            spec = importlib.util.find_spec(command.module)
        except ModuleNotFoundError:  # its package is not installed
            spec = None
        if spec is not None:
            found.append(command)
    return found


def build_parser(argv: Sequence[str] | None = None, *, every: bool = False) -> _Parser:
    """The parser: the command ``argv`` names is registered by its module (its arguments, its
    handler), every other one by its help line only; ``every`` loads all modules."""
    parser = _Parser(
        prog="cutover",
        description=(
            "Move a live shop off its legacy PostgreSQL database onto the commerce system "
            "through Kafka: capture changes (produce), apply them mapped (apply), prove the two "
            "agree (verify), then switch reads per domain with gates, audit and rollback."
        ),
        epilog=(
            "Configuration: --config FILE (default $CUTOVER_CONFIG or ./cutover.toml); "
            "CUTOVER_SOURCE_DSN, CUTOVER_TARGET_DSN, CUTOVER_KAFKA_BOOTSTRAP and "
            "CUTOVER_TOPIC_PREFIX override the file. Exit codes: 0 ok, 1 check failed or "
            "refused, 2 usage or configuration error, 3 runtime failure."
        ),
    )
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    named = None if every else command_named(argv)
    for command in (*COMMANDS, *_plugins()):
        if every or command.name == named:
            importlib.import_module(command.module).register(sub)
        else:
            sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    if not hasattr(args, "handler"):  # the pre-parse named another command: load them all
        args = build_parser(argv, every=True).parse_args(argv)
    cutover_logging.configure(level=args.log_level, json=args.log_json)
    context = Context(config_path=args.config, environ=environ_snapshot())
    handler: Handler = args.handler
    if not getattr(args, "graceful_stop", False):
        shutdown.release()  # only produce and apply turn a SIGTERM into a clean stop
    try:
        return handler(args, context)
    except CutoverError as exc:
        print(f"cutover {args.command}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cutover {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
