"""Free TCP ports on 127.0.0.1 for the servers the stacks and tests start.

Asking the kernel for port 0 and closing the socket gives a port that is free *now*, from the
ephemeral range. Two things then go wrong on a busy machine (both seen in CI): the next such
request, in the same process or in another test worker, may return the same port before the
server has bound it (a stack's Kafka and its legacy PostgreSQL were once given one port); and any
outgoing connection may take it as its local port meanwhile. So ports here are picked

* below the ephemeral range (outgoing connections never take them),
* bindable at the time of the pick, and
* reserved until the picking process exits: a file per port under ``$TMPDIR/cutover-ports``,
  created exclusively and holding the picker's pid, so no two live processes get one port while
  their servers are still starting. A reservation whose process is gone is taken over.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Final

from devtools.procs import pid_alive

_LOW: Final = 20000  # below the servers' usual ports' neighbours (PostgreSQL 5432, Kafka 9092)
_TRIES: Final = 200
_RESERVED = Path(tempfile.gettempdir()) / "cutover-ports"


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range:
    """The kernel's range for outgoing connections' local ports (Linux's default if unreadable)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def candidates(ephemeral: range, low: int = _LOW) -> range:
    """Where to pick from: under the ephemeral range, or above it if it starts too low."""
    if ephemeral.start - low >= 1000:
        return range(low, ephemeral.start)
    return range(ephemeral.stop, 65536)


def _reserve(port: int, folder: Path) -> bool:
    """Take ``port`` for this process unless a live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / str(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text() or "0")
            except (OSError, ValueError):
                return False  # being written right now: someone else's
            if holder == os.getpid() or pid_alive(holder):
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a dead process's reservation: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, folder: Path = _RESERVED, pick: range | None = None) -> int:
    """A port no server listens on, outside the ephemeral range, reserved for this process."""
    pool = pick if pick is not None else candidates(ephemeral_range())
    rng = random.SystemRandom()
    for _ in range(_TRIES):
        port = rng.randrange(pool.start, pool.stop)
        if _bindable(port) and _reserve(port, folder):
            return port
    raise OSError(f"no free port found in {pool.start}-{pool.stop - 1} after {_TRIES} tries")
