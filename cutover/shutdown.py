"""A stop asked for while the process is still starting is remembered, not fatal.

Importing the command line (the Kafka and PostgreSQL clients, Avro) takes a second or more, and
longer on a busy host. A supervisor that stops ``cutover produce`` or ``cutover apply`` in that
window (systemd, a rollout, a test) used to kill it by SIGTERM's default action (exit -15)
instead of the clean stop those commands promise. :func:`remember` is the first thing the entry
point (:mod:`cli.entry`) does; a long-running command then :func:`adopt`\\ s the signal with its own
handler (called at once if the stop was already asked), and every other command
:func:`release`\\ s it (the default action again, delivered now if the stop was already asked).

Standard library only, so that importing it costs nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeAlias

Handler: TypeAlias = Callable[[int, FrameType | None], Any]
#: What ``signal.signal`` returns and takes back.
Previous: TypeAlias = Handler | int | signal.Handlers | None

#: Set once SIGTERM arrived while only :func:`remember`'s handler was in place.
REQUESTED = threading.Event()


def _remember(_signum: int, _frame: FrameType | None) -> None:
    REQUESTED.set()


def remember() -> None:
    """From now on a SIGTERM sets :data:`REQUESTED` instead of ending the process."""
    signal.signal(signal.SIGTERM, _remember)


def _remembering() -> bool:
    return signal.getsignal(signal.SIGTERM) is _remember


def adopt(handler: Handler) -> dict[signal.Signals, Previous]:
    """Install ``handler`` for SIGTERM and SIGINT; call it now if a SIGTERM came during start.

    Returns the previous handlers (to restore them when the command ends).
    """
    pending = _remembering() and REQUESTED.is_set()
    previous: dict[signal.Signals, Previous] = {
        s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)
    }
    if pending:
        handler(signal.SIGTERM, None)
    return previous


def release() -> None:
    """Back to SIGTERM's default action; a stop asked during start takes effect now."""
    if not _remembering():
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if REQUESTED.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
