"""No password in any output, whatever it contains; no raw librdkafka lines on a dead broker.

Passwords full of URL metacharacters (``%``, ``@``, spaces, ``:/?#``) make libpq and psycopg echo
the token they could not parse; every command must mask them, whether the DSN comes from the
environment, the config file or ``replay play --to-target``. A Kafka that does not answer makes
librdkafka log the same connection failure several times a second: it must come out as
rate-limited ``kafka.client_log`` events, never as raw ``%3|...|FAIL|`` lines.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from consumers.replay import ReplayWriter
from devtools.apply_support import cli_env

REPO = Path(__file__).resolve().parents[2]
MAPPING = REPO / "examples" / "shop" / "mapping.toml"

# Each one trips a different parse or connect error; the fragments are what libpq echoes.
PASSWORDS = ("SEK%RIT5", "SEK@RIT6", "SEK RIT7", "SEK:/?#RITA", "SEK'RI\"T@9%zz")
FRAGMENT = re.compile(r"[\s@%:/?#'\"]+")


def _secrets() -> set[str]:
    out: set[str] = set()
    for password in PASSWORDS:
        out.add(password)
        out.update(f for f in FRAGMENT.split(password) if len(f) >= 3 and f != "SEK")
    return out


def _url(host: str, port: int, password: str, db: str) -> str:
    return f"postgresql://cutover:{password}@{host}:{port}/{db}"


def _keyword(host: str, port: int, password: str, db: str) -> str:
    # Unquoted on purpose: a space in it makes libpq echo the rest ("missing = after ...").
    return f"host={host} port={port} user=cutover dbname={db} password={password}"


def _commands(replay_file: Path, target: str) -> list[list[str]]:
    return [
        ["status"],
        ["status", "--json"],
        ["verify", "--no-progress"],
        ["init", "--dry-run"],
        ["monitor", "--once"],
        ["snapshot", "--table", "payments"],
        ["audit"],
        ["dlq", "list"],
        ["switch-reads", "payment", "--dry-run"],
        ["rollback", "payment", "--dry-run"],
        ["replay", "play", str(replay_file), "--to-target", target],
    ]


def _run(config: Path, env: dict[str, str], args: Sequence[str]) -> tuple[str, int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "cli.entry", "--config", str(config), "--log-json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    return " ".join(args), done.returncode, done.stdout + done.stderr


def test_no_password_reaches_any_output(
    target_dsn: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    parts = urlsplit(target_dsn)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    replay_file = tmp_path / "empty.avro"
    ReplayWriter(replay_file).finish({"topic": "secrets.payment", "partitions": {}})
    kafka_table = f'[kafka]\ntopic_prefix = "secrets"\n[mapping]\nfile = "{MAPPING}"\n'
    env_config = tmp_path / "env.toml"
    env_config.write_text(kafka_table)

    # Every command once (each run costs seconds of interpreter start on a shared machine); the
    # passwords, the DSN shapes (URL / key=value) and where the DSN comes from (environment /
    # config file) rotate over the commands. tests/unit/test_secrets.py feeds every password
    # through every shape.
    runs: list[tuple[Path, dict[str, str], list[str]]] = []
    for i in range(len(_commands(replay_file, ""))):
        password = PASSWORDS[i % len(PASSWORDS)]
        shape = _url if i % 2 == 0 else _keyword
        source = shape(host, port, password, "legacy")
        target = shape(host, port, PASSWORDS[(i + 1) % len(PASSWORDS)], "commerce")
        args = _commands(replay_file, target)[i]
        if i % 3 != 2:  # from the environment
            runs.append((env_config, cli_env(target, kafka_bootstrap, source), args))
            continue
        # From the config file (TOML basic strings accept JSON's escapes).
        config = tmp_path / f"file{i}.toml"
        config.write_text(
            f"[source]\ndsn = {json.dumps(source)}\n[target]\ndsn = {json.dumps(target)}\n"
            + kafka_table
        )
        env = cli_env("", kafka_bootstrap, "")
        for key in ("CUTOVER_SOURCE_DSN", "CUTOVER_TARGET_DSN"):
            env.pop(key)
        runs.append((config, env, args))

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda r: _run(*r), runs))
    leaks = [
        f"`cutover {cmd}` (exit {rc}) printed {secret!r}:\n{out}"
        for cmd, rc, out in results
        for secret in _secrets()
        if secret in out
    ]
    assert not leaks, leaks[0]
    # The commands did fail on the DSNs (the scan is not vacuous) and said so masked.
    assert all(rc != 0 for cmd, rc, _ in results if not cmd.startswith(("status", "monitor")))
    assert any("***" in out for _, _, out in results)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [["monitor", "--once", "--json"], ["replay", "record"]])
def test_a_dead_kafka_logs_rate_limited_events_not_raw_lines(
    command: list[str], commerce: str, source_dsn: str, tmp_path: Path
) -> None:
    config = tmp_path / "cutover.toml"
    config.write_text(f'[kafka]\ntopic_prefix = "dead"\n[mapping]\nfile = "{MAPPING}"\n')
    env = cli_env(commerce, f"127.0.0.1:{_closed_port()}", source_dsn)
    if command[0] == "replay":
        command = [*command, "dead.payment", "--out", str(tmp_path / "x.avro")]
    _cmd, _rc, out = _run(config, env, command)
    assert "%3|" not in out and "|FAIL|" not in out, out
    events = [json.loads(line) for line in out.splitlines() if '"kafka.client_log"' in line]
    # Seconds of reconnect attempts: each distinct message at most once per 30 s.
    assert len(events) <= 10, events
