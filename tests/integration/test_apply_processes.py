"""`cutover apply` as processes on the real stack: SIGTERM finishes and leaves cleanly (exit 0);
kill -9 mid-stream then restart gives the exact final state; members joining and dying under
load lose and duplicate nothing, with either assignor (cooperative-sticky, the default:
incremental rebalances; range: eager ones; fenced zombies in both), and under range two
members share every domain topic.

The expected final state is computed by the test's own model of the legacy shop
(:class:`ShopModel`), never by the code under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.apply_support import (
    DOMAINS,
    EventFactory,
    Message,
    ShopModel,
    Topics,
    cli_env,
    delete_topics,
    diff,
    fetch_commerce,
    make_topics,
    produce,
    producer,
    publish_schemas,
    start_apply,
    stop_apply,
    total_offsets,
    wait_for,
    write_config,
)
from tests.integration.faults_support import cli_processes

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(kafka_bootstrap: str) -> Iterator[Topics]:
    t = make_topics(kafka_bootstrap, partitions=6)
    try:
        yield t
    finally:
        delete_topics(t)


def _stream(topics: Topics, transactions: int, seed: int) -> tuple[ShopModel, list[Message]]:
    model = ShopModel(EventFactory(topics.prefix, topics.partitions), seed=seed)
    publish_schemas(topics, model.factory)
    return model, [m for _ in range(transactions) for m in model.step()]


def _log_text(*paths: Path) -> str:
    return "\n".join(p.read_text() for p in paths if p.exists())


def test_sigterm_finishes_the_batch_and_exits_0(
    commerce: str, topics: Topics, tmp_path: Path
) -> None:
    model, msgs = _stream(topics, 1500, seed=3)
    produce(topics.bootstrap, msgs)
    group = "sigterm"
    config = write_config(tmp_path, topics, group=group, batch_max_events=500)
    env = cli_env(commerce, topics.bootstrap)
    log = tmp_path / "apply.log"
    proc = start_apply(config, env, log=log)
    try:
        wait_for(lambda: total_offsets(commerce, group) > 0, 60, "a first commit")
    finally:
        code = stop_apply(proc, timeout=30)
    text = log.read_text()
    assert code == 0, text
    assert '"apply.signal"' in text and '"apply.stopped"' in text
    # Restart: it continues from the stored offsets to the exact final state.
    proc = start_apply(config, env, "--exit-when-idle", "3", log=log)
    assert proc.wait(120) == 0, log.read_text()
    assert total_offsets(commerce, group) == len(msgs)
    assert diff(model.expected(), fetch_commerce(commerce)) == []


def test_kill_9_mid_stream_then_restart_gives_the_exact_state(
    commerce: str, topics: Topics, tmp_path: Path
) -> None:
    model, msgs = _stream(topics, 4000, seed=11)
    produce(topics.bootstrap, msgs)
    group = "kill9"
    config = write_config(tmp_path, topics, group=group, batch_max_events=300)
    env = cli_env(commerce, topics.bootstrap)
    logs = []
    with cli_processes() as procs:
        for attempt in range(3):  # killed twice at different points, then left to finish
            log = tmp_path / f"apply-{attempt}.log"
            logs.append(log)
            proc = procs[f"apply-{attempt}"] = start_apply(config, env, log=log)
            if attempt < 2:
                start = total_offsets(commerce, group)
                wait_for(lambda s=start: total_offsets(commerce, group) > s + 500, 90, "progress")  # type: ignore[misc]
                time.sleep(0.05 * (attempt + 1))  # somewhere inside a batch, before/after COMMIT
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            else:
                wait_for(lambda: total_offsets(commerce, group) == len(msgs), 180, "the end")
                assert stop_apply(proc) == 0, _log_text(*logs)
    assert diff(model.expected(), fetch_commerce(commerce)) == []


def _last_assignment(log: Path) -> set[str]:
    """The partitions of the last ``apply.partitions_assigned`` event of an apply log: under
    the eager protocol (range) that is the member's whole assignment."""
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assigned = [e for e in events if e.get("event") == "apply.partitions_assigned"]
    return set(assigned[-1]["partitions"]) if assigned else set()


def _assert_every_topic_shared(topics: Topics, *logs: Path) -> None:
    """Under range, each of the members (the last ones standing) owns an equal share of each
    domain topic: the hot domain is never left to one of them."""
    every = {f"{topics.topic(d)}[{p}]" for d in DOMAINS for p in range(topics.partitions)}
    per_topic = topics.partitions // len(logs)

    def balanced() -> bool:
        owned = [_last_assignment(log) for log in logs]
        return set().union(*owned) == every and all(
            sum(tp.startswith(f"{topics.topic(d)}[") for tp in mine) == per_topic
            for mine in owned
            for d in DOMAINS
        )

    wait_for(balanced, 60, "each member to own a share of every topic")


@pytest.mark.parametrize("assignment", ["cooperative-sticky", "range"])
def test_members_joining_and_dying_under_load_lose_and_duplicate_nothing(
    commerce: str, topics: Topics, tmp_path: Path, assignment: str
) -> None:
    model, msgs = _stream(topics, 9000, seed=23)
    group = "rebalance"
    config = write_config(
        tmp_path,
        topics,
        group=group,
        batch_max_events=400,
        kafka={"apply_assignment": assignment},
    )
    env = cli_env(commerce, topics.bootstrap)
    cli = shutil.which("cutover", path=str(Path(os.sys.executable).parent))  # type: ignore[attr-defined]

    # Load: the stream is produced while the members come and go.
    done = threading.Event()
    # The last tenth of the stream trickles while the members change and its final part waits
    # for the changes, however slow the machine is to start processes and however fast the
    # members apply: a joining member must find events to apply (with the whole bulk applied
    # before it joins, it would never commit), and the changes must happen under load.
    changes_done = threading.Event()
    held_back = len(msgs) - len(msgs) // 10
    reserve = len(msgs) - 100

    def feed() -> None:
        prod = producer(topics.bootstrap)

        def send(chunk: list[Message]) -> None:
            produce(topics.bootstrap, chunk, prod)
            prod.flush(10)

        i = 0
        while i < held_back:  # about 2,000 events/s
            send(msgs[i : min(i + 200, held_back)])
            i = min(i + 200, held_back)
            time.sleep(0.1)
        while i < reserve and not changes_done.is_set():  # ~10 events/s for up to ~80 s
            send(msgs[i : i + 5])
            i += 5
            time.sleep(0.5)
        changes_done.wait(600)
        for j in range(i, len(msgs), 200):
            send(msgs[j : j + 200])
        assert prod.flush(30) == 0
        done.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    # Whatever still runs when the test fails is stopped (cli_processes).
    with cli_processes() as procs:
        logs = []

        def start(name: str) -> None:
            log = tmp_path / f"{name}.log"
            logs.append(log)
            procs[name] = start_apply(config, env, log=log)

        def committed(name: str) -> None:
            log = tmp_path / f"{name}.log"
            wait_for(lambda: '"apply.batch_committed"' in log.read_text(), 60, f"{name} to commit")

        def progressed(by: int) -> None:
            # At most what the feeder may produce so far: on a slow machine the members take
            # long enough to start that the group has applied all of it (the held-back tenth
            # only comes after the changes), and waiting for more would never end.
            base = total_offsets(commerce, group)
            target = min(base + by, len(msgs) if changes_done.is_set() else held_back)
            try:
                wait_for(lambda: total_offsets(commerce, group) >= target, 120, f"{target} offsets")
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc} (from {base}); logs:\n{_log_text(*logs)[-4000:]}"
                ) from None

        start("a")
        progressed(1000)
        start("b")
        start("c")
        committed("b")
        committed("c")
        os.kill(procs["b"].pid, signal.SIGKILL)  # dies: its partitions move after session timeout
        procs["b"].wait(10)
        start("d")
        committed("d")
        progressed(1000)
        assert stop_apply(procs["a"]) == 0, _log_text(*logs)  # leaves cleanly: immediate rebalance
        os.kill(procs["c"].pid, signal.SIGKILL)
        procs["c"].wait(10)
        if cli is not None:  # the console script, as operators run it
            import subprocess

            log = tmp_path / "e.log"
            logs.append(log)
            procs["e"] = subprocess.Popen(
                [cli, "--log-json", "--config", str(config), "apply"],
                env=env,
                stdout=log.open("ab"),
                stderr=subprocess.STDOUT,
            )
        else:
            start("e")
        assert not done.is_set(), "the load ended before the membership changes: slow the feed"
        changes_done.set()
        assert done.wait(180)
        wait_for(lambda: total_offsets(commerce, group) == len(msgs), 240, "all offsets applied")
        if assignment == "range":
            _assert_every_topic_shared(topics, tmp_path / "d.log", tmp_path / "e.log")
        for name in ("d", "e"):
            assert stop_apply(procs[name]) == 0, _log_text(*logs)
        assert diff(model.expected(), fetch_commerce(commerce)) == []
        text = _log_text(*logs)
        assert "apply.partitions_assigned" in text and "apply.partitions_revoked" in text
