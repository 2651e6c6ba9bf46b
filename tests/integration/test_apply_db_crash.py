"""The commerce database crashes mid-batch (``pg_ctl -m immediate stop`` of the stack's
commerce cluster) and comes back: `cutover apply` either rides it out (reconnects, re-seeks from
the stored offsets) or stops with a clear error and exit 3; after a restart the final state is
exact. The cluster is always restarted, whatever happens.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.apply_support import (
    REPO,
    EventFactory,
    ShopModel,
    Topics,
    cli_env,
    delete_topics,
    diff,
    fetch_commerce,
    init_control,
    make_topics,
    produce,
    publish_schemas,
    start_apply,
    stop_apply,
    total_offsets,
    wait_for,
    write_config,
)
from tests.integration.conftest import skip_or_fail

# serial: the commerce cluster it stops is the one every other test uses (make test, Makefile).
pytestmark = [pytest.mark.integration, pytest.mark.serial]

PG_CTL = "/usr/lib/postgresql/15/bin/pg_ctl"
DATA = REPO / ".stack" / "pg" / "commerce"
LOG = REPO / ".stack" / "pg" / "commerce.log"


def _pg_ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", PG_CTL, "-D", str(DATA), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=3)
    try:
        yield t
    finally:
        delete_topics(t)


@pytest.fixture
def commerce(fresh_commerce: str) -> str:
    if not DATA.exists():
        skip_or_fail("needs the local stack's commerce cluster (make up)")
    init_control(fresh_commerce)
    return fresh_commerce


def _up(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def test_commerce_db_crash_mid_batch(commerce: str, topics: Topics, tmp_path: Path) -> None:
    model = ShopModel(EventFactory(topics.prefix, topics.partitions), seed=5)
    publish_schemas(topics, model.factory)
    msgs = [m for _ in range(6000) for m in model.step()]
    produce(topics.bootstrap, msgs)
    group = "dbcrash"
    config = write_config(tmp_path, topics, group=group, batch_max_events=200)
    env = cli_env(commerce, topics.bootstrap)
    log = tmp_path / "apply.log"
    proc = start_apply(config, env, "--db-retry", "60", log=log)
    try:
        wait_for(lambda: total_offsets(commerce, group) > 2000, 90, "progress")
        stopped = _pg_ctl("-m", "immediate", "stop")
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(3)
    finally:
        started = _pg_ctl("-l", str(LOG), "-w", "-t", "60", "start")
        if started.returncode != 0 and not _up(commerce):
            raise AssertionError(f"could not restart the commerce cluster: {started.stderr}")
    wait_for(lambda: _up(commerce), 60, "the commerce cluster")
    # Either it rode the outage out, or it stopped with exit 3 and a clear error: restart it.
    try:
        wait_for(
            lambda: proc.poll() is not None or total_offsets(commerce, group) == len(msgs),
            180,
            "the consumer to finish or stop",
        )
        if proc.poll() is not None:
            assert proc.returncode == 3, log.read_text()
            assert "commerce database unavailable" in log.read_text()
            proc = start_apply(config, env, log=log)
            wait_for(lambda: total_offsets(commerce, group) == len(msgs), 180, "the end")
    finally:
        code = stop_apply(proc)
    text = log.read_text()
    assert code == 0, text
    assert '"apply.db_retry"' in text
    assert diff(model.expected(), fetch_commerce(commerce)) == []


def test_sigterm_during_an_outage_stops_at_once(
    commerce: str, topics: Topics, tmp_path: Path
) -> None:
    """A stop asked while the consumer waits for the database (up to --db-retry) ends the wait:
    exit 0, nothing half-applied, and the next run finishes the work exactly."""
    model = ShopModel(EventFactory(topics.prefix, topics.partitions), seed=6)
    publish_schemas(topics, model.factory)
    msgs = [m for _ in range(6000) for m in model.step()]
    produce(topics.bootstrap, msgs)
    group = "dbcrash-stop"
    config = write_config(tmp_path, topics, group=group, batch_max_events=200)
    env = cli_env(commerce, topics.bootstrap)
    log = tmp_path / "apply.log"
    proc = start_apply(config, env, "--db-retry", "600", log=log)
    try:
        wait_for(lambda: total_offsets(commerce, group) > 1000, 90, "progress")
        stopped = _pg_ctl("-m", "immediate", "stop")
        assert stopped.returncode == 0, stopped.stderr
        wait_for(lambda: '"apply.db_retry"' in log.read_text(), 60, "the consumer to wait")
        t0 = time.monotonic()
        code = stop_apply(proc, timeout=30)
        assert code == 0, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 20
        assert '"apply.db_retry_stopped"' in log.read_text()
    finally:
        started = _pg_ctl("-l", str(LOG), "-w", "-t", "60", "start")
        if started.returncode != 0 and not _up(commerce):
            raise AssertionError(f"could not restart the commerce cluster: {started.stderr}")
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: _up(commerce), 60, "the commerce cluster")
    proc = start_apply(config, env, log=log)
    try:
        wait_for(lambda: total_offsets(commerce, group) == len(msgs), 180, "the end")
    finally:
        assert stop_apply(proc) == 0
    assert diff(model.expected(), fetch_commerce(commerce)) == []
