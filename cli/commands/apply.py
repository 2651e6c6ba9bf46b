"""`cutover apply`: run one apply consumer (run several processes for a consumer group).

Thin: builds the settings, installs SIGTERM/SIGINT handlers that ask the loop to stop after the
current batch (commit, leave the group cleanly, exit 0; a second signal stops at once), and
calls :class:`consumers.apply.ApplyConsumer`. Errors map to exit codes in :mod:`cli.main`
(a poison message under ``dlq_policy = "halt"`` or an unreachable database: exit 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
from types import FrameType
from typing import Any, Literal

from structlog.typing import FilteringBoundLogger

from consumers.apply import ApplyConsumer, ApplyOptions
from cutover import direction, metrics, shutdown
from cutover.errors import UsageError
from cutover.logging import get_logger


def log() -> FilteringBoundLogger:
    # Looked up at each use, not at import: a logger bound before cutover.logging.configure()
    # runs would keep structlog's defaults (console renderer on stdout).
    return get_logger(__name__)


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "apply",
        help="run one apply consumer (run several for a consumer group)",
        description=(
            "Consume the domain topics as a member of the [apply] group_id consumer group, map "
            "each change with the mapping file and apply it to the commerce database together "
            "with the consumed offsets (exactly-once effect). Poison messages go to the "
            'dead-letter topic, or stop the consumer with dlq_policy = "halt" (exit 3). '
            "SIGTERM/SIGINT finish the current batch and exit 0. With --reverse: consume "
            "<prefix>.reverse.<domain> as the [reverse] group_id group and write legacy "
            "through the inverse mapping (positions in legacy's [reverse] control_schema)."
        ),
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="apply the reverse direction (commerce -> legacy) of the write cutover",
    )
    parser.add_argument(
        "--group-id",
        help="consumer group (default: [apply] group_id, or [reverse] group_id with --reverse); "
        "a new group replays from offset 0",
    )
    parser.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="exit 0 once no message arrived for SECONDS and nothing is pending",
    )
    parser.add_argument(
        "--db-retry",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="keep reconnecting to an unavailable commerce database this long (default 60)",
    )
    metrics.add_port_argument(parser)
    parser.set_defaults(handler=run, graceful_stop=True)


def _crash_point(
    environ: dict[str, str],
) -> Literal["apply_before_commit", "apply_after_commit"] | None:
    """``CUTOVER_CRASH_AT`` for fault tests (read here, at the entry point, only)."""
    value = environ.get("CUTOVER_CRASH_AT")
    if value == "apply_before_commit":
        return "apply_before_commit"
    if value == "apply_after_commit":
        return "apply_after_commit"
    return None


def run(args: argparse.Namespace, context: Any) -> int:
    settings = context.settings
    if args.group_id:
        settings = dataclasses.replace(
            settings,
            apply=dataclasses.replace(settings.apply, group_id=args.group_id),
            reverse=dataclasses.replace(settings.reverse, group_id=args.group_id),
        )
    way = direction.of(settings, reverse_way=args.reverse)
    if args.exit_when_idle is not None and args.exit_when_idle <= 0:
        raise UsageError("--exit-when-idle must be positive")
    metrics.serve_if_asked(args.metrics_port, settings.metrics_port)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # second signal: stop now
        log().info("apply.signal", signal=signal.Signals(signum).name)
        stop.set()

    previous = shutdown.adopt(on_signal)
    try:
        consumer = ApplyConsumer(
            settings,
            options=ApplyOptions(
                exit_when_idle_s=args.exit_when_idle,
                db_retry_s=args.db_retry,
                crash_at=_crash_point(context.environ),
            ),
            stop=stop,
            direction=way,
        )
        consumer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
