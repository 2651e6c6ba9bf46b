"""Processes the dev tools start: is one alive, and stopping a group of them.

Its own module so that ``ports`` (which the stack imports) and the stack's side servers can
use it without importing the stack.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path


def pid_alive(pid: int | None) -> bool:
    """True while ``pid`` runs (a zombie, ended but not reaped, counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): look at its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: Sequence[int], timeout: float = 30.0) -> None:
    """SIGTERM their process groups all at once (the nodes of a cluster shut down together: one
    by one, the last would wait for a quorum that is gone), SIGKILL what is left after
    ``timeout``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.2)
