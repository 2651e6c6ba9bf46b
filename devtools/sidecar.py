"""What the stack's optional servers (:mod:`devtools.registry_stack`,
:mod:`devtools.prometheus_stack`) share: each keeps its port and pid in a JSON file of the stack
folder, runs as a plain process started in its own session, answers a readiness probe, and is
stopped by pid."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cutover.errors import StackError
from devtools.procs import pid_alive, stop_pids

State = dict[str, int | None]


def load(path: Path) -> State | None:
    """The server's port and pid, or None if this stack never ran one."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def save(path: Path, state: State) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def running_port(path: Path) -> int | None:
    """The port of the server whose state is in ``path`` if its process lives, else None."""
    state = load(path)
    if state and state.get("port") and pid_alive(state.get("pid")):
        return int(state["port"] or 0)
    return None


def stop(path: Path, what: str) -> str | None:
    """Stop the server whose state is in ``path``; what was stopped (None: nothing ran)."""
    state = load(path)
    pid = state.get("pid") if state else None
    if not pid_alive(pid):
        return None
    assert pid is not None
    stop_pids([pid])
    return f"{what} (pid {pid})"


def wait_ready(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, what: str, log: str
) -> None:
    """Poll ``ready`` until it says yes; StackError if the process exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise StackError(f"{what} exited during start-up; see {log}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer within {timeout:.0f} s")
        time.sleep(0.25)


def start(
    path: Path,
    state: State,
    argv: Sequence[str],
    *,
    log: Path,
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start ``argv`` in a session of its own (it survives ``make up`` returning; ``down`` stops
    it by pid), output appended to ``log``; record its pid in ``path`` with ``state``, then wait
    until ``ready``. The pid."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env), start_new_session=True,
        )  # fmt: skip
    state["pid"] = proc.pid
    save(path, state)
    wait_ready(proc, ready, timeout, what, str(log))
    return proc.pid
