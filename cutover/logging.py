"""Logging as an interface: structlog, configured once, with stable event names.

Events are named ``noun.verb`` (``slot.advanced``, ``apply.batch_committed``) and carry their data
as keys, so tests assert on them with ``structlog.testing.capture_logs`` and operators filter on
them. Output is JSON lines when stderr is not a terminal (services, CI) and coloured key=value
lines for people at a terminal. Context (domain, consumer id) is bound with contextvars.

A processor masks DSN passwords in every string value (by the DSN's shape, and by the value of
every registered password, see :func:`cutover.errors.register_dsn`): secrets never reach a log
line even if a caller passes a DSN, or an error message quoting a piece of one, by mistake.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from cutover.errors import has_secret, redact_dsn

_SECRET_KEYS = frozenset({"password", "dsn", "secret", "sasl.password", "ssl.key.password"})


def _mask_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event.items()):
        if key in _SECRET_KEYS:
            event[key] = "***" if key != "dsn" else redact_dsn(str(value))
        elif isinstance(value, str) and (
            "password" in value or "://" in value or has_secret(value)
        ):
            event[key] = redact_dsn(value)
    return event


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now: capture tools (pytest, rich) swap it at will."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, level: str = "info", json: bool | None = None) -> None:
    """Configure structlog for the whole process. Call once, at the entry point."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound with ``logger=name``; the event names are the interface, not the text."""
    # Lazy: the logger is built at first use, after configure(), even when this runs at import.
    # (The key is "component": "logger" would collide with structlog.wrap_logger's parameter.)
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
