"""A SIGTERM that arrives while the process is still starting (cutover/shutdown.py): remembered
and handed to a long-running command's own handler (a clean stop), or delivered with the
default action to any other command once it is released."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from cutover import shutdown
    shutdown.remember()
    os.kill(os.getpid(), signal.SIGTERM)   # the stop arrives "during the imports"
    time.sleep(0.2)
    print("still alive", flush=True)
    if sys.argv[1] == "adopt":
        seen = []
        shutdown.adopt(lambda signum, frame: seen.append(signum))
        print("handler saw", seen, flush=True)
        sys.exit(0 if seen == [signal.SIGTERM] else 5)
    shutdown.release()
    time.sleep(5)
    print("not stopped", flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", SCRIPT, mode]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_a_long_running_command_gets_the_early_stop() -> None:
    done = _run("adopt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "still alive" in done.stdout  # the early SIGTERM did not kill the process


def test_any_other_command_is_stopped_once_released() -> None:
    done = _run("release")
    assert "still alive" in done.stdout
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr
    assert "not stopped" not in done.stdout


def test_without_the_entry_point_release_changes_nothing() -> None:
    # cli.main called in-process (tests, embedding): no remembering handler, nothing to release.
    from cutover import shutdown

    before = signal.getsignal(signal.SIGTERM)
    shutdown.release()
    assert signal.getsignal(signal.SIGTERM) is before
