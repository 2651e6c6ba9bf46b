"""devtools.ports: picked ports stay out of the ephemeral range, are bindable, and no two live
processes (or two picks of one process) get the same one while their servers start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import ports


def test_candidates_lie_below_the_ephemeral_range_or_above_a_low_one() -> None:
    assert ports.candidates(range(32768, 61000)) == range(20000, 32768)
    low = ports.candidates(range(1024, 65000))
    assert low.start == 65000 and low.stop == 65536


def test_the_ephemeral_range_is_read_from_the_kernel_file(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ports.ephemeral_range(f) == range(40000, 50001)
    assert ports.ephemeral_range(tmp_path / "missing") == range(32768, 61000)


def test_one_process_never_gets_a_port_twice(tmp_path: Path) -> None:
    pool = range(30000, 30004)  # four ports: the fifth pick must fail, not repeat one
    got = {ports.free_port(folder=tmp_path, pick=pool) for _ in range(4)}
    assert got == set(pool)
    with pytest.raises(OSError, match="no free port"):
        ports.free_port(folder=tmp_path, pick=pool)


def test_a_port_a_server_listens_on_is_never_picked(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError):
            ports.free_port(folder=tmp_path, pick=range(port, port + 1))


def test_a_live_process_reservation_holds_and_a_dead_ones_is_taken_over(tmp_path: Path) -> None:
    pool = range(30100, 30101)
    # Another live process (our parent) holds the port: refused.
    (tmp_path / "30100").write_text(str(os.getppid()))
    with pytest.raises(OSError):
        ports.free_port(folder=tmp_path, pick=pool)
    # A process that has exited held it: ours now.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / "30100").write_text(dead.stdout.strip())
    assert ports.free_port(folder=tmp_path, pick=pool) == 30100
    assert (tmp_path / "30100").read_text() == str(os.getpid())


def test_default_picks_are_outside_the_ephemeral_range() -> None:
    eph = ports.ephemeral_range()
    for _ in range(5):
        assert ports.free_port() not in eph
