"""`make up; make up; make down` on a stack of its own: reuse, readiness, nothing left behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from devtools import stack

REPO = Path(__file__).resolve().parents[2]

# One worker runs the private stacks one after the other: two at once overload 2 cores.
pytestmark = pytest.mark.xdist_group("private_stack")


def _stack(action: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtools.stack", action, "--dir", str(root),
         "--cache", str(REPO / ".stack-cache")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture
def root() -> Iterator[Path]:
    """A stack folder the ``postgres`` user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cutover-stack-test-"))
    path.chmod(0o755)
    try:
        yield path / "stack"
    finally:
        _stack("down", path / "stack")
        shutil.rmtree(path, ignore_errors=True)


def _env(root: Path) -> dict[str, str]:
    lines = (root / "env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line)


@pytest.mark.integration
def test_up_up_down_leaves_no_process(root: Path) -> None:
    first = _stack("up", root)
    assert first.returncode == 0, first.stderr
    env = _env(root)
    assert set(env) == {"CUTOVER_SOURCE_DSN", "CUTOVER_TARGET_DSN", "CUTOVER_KAFKA_BOOTSTRAP"}
    pids_first = stack.running_pids(root)
    assert len(pids_first) >= 3  # kafka + two postmasters

    # The servers really answer: SQL on both clusters, a metadata request to Kafka.
    with psycopg.connect(env["CUTOVER_SOURCE_DSN"]) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
        assert row == ("logical",)
        version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None and str(version[0]).startswith("15")
    with psycopg.connect(env["CUTOVER_TARGET_DSN"]) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("commerce",)
    meta = AdminClient({"bootstrap.servers": env["CUTOVER_KAFKA_BOOTSTRAP"]}).list_topics(
        timeout=10
    )
    assert len(meta.brokers) == 1

    second = _stack("up", root)
    assert second.returncode == 0, second.stderr
    assert "already running" in second.stderr
    assert _env(root) == env
    assert sorted(stack.running_pids(root)) == sorted(pids_first)

    third = _stack("down", root)
    assert third.returncode == 0, third.stderr
    assert stack.running_pids(root) == []
    assert not (root / "env").exists()


@pytest.mark.integration
def test_secrets_stay_out_of_stack_output(root: Path) -> None:
    result = _stack("up", root)
    assert result.returncode == 0, result.stderr
    password = stack.load_state(root).password  # type: ignore[union-attr]
    assert password not in result.stderr + result.stdout
    assert oct((root / "env").stat().st_mode & 0o777) == "0o600"
