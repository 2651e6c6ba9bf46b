"""The ``cutover`` command line: a thin shell that parses, builds settings once, calls one core
function per command, and maps the exception tree to exit codes.

Exit codes: 0 ok, 1 check failed or gate refused, 2 usage or configuration error, 3 runtime
failure. Each command lives in ``cli/commands/<name>.py`` and exposes ``register(subparsers)``;
the parser it adds sets ``handler`` to a function ``(args, context) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cutover import logging as cutover_logging
from cutover import shutdown
from cutover.config import Settings, environ_snapshot, load_settings
from cutover.errors import CutoverError

# Order here is the order in `cutover --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "init",
    "produce",
    "snapshot",
    "apply",
    "dlq",
    "verify",
    "status",
    "switch_reads",
    "rollback",
    "switch_writes",
    "rollback_writes",
    "complete",
    "audit",
    "monitor",
    "replay",
    "console",
)

# Commands that live outside the product: the dev tools plug ``cutover workload`` in when they
# are importable (a source checkout, which is what ``make`` installs); a wheel built from this
# repository leaves them out, and so does its ``cutover --help``.
PLUGIN_COMMAND_MODULES: tuple[str, ...] = ("devtools.workload_command",)

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


def build_parser() -> argparse.ArgumentParser:
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"cli.commands.{name}").register(sub)
    for module in PLUGIN_COMMAND_MODULES:
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
            continue
        plugin.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
