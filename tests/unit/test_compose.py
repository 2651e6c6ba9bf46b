"""docker-compose.yml cannot run here (no Docker engine): check it agrees with the local stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from devtools import stack

REPO = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def _pg_settings(service: dict[str, Any]) -> dict[str, str]:
    command = service["command"]
    assert command[0] == "postgres"
    pairs = [arg for arg in command[1:] if arg != "-c"]
    return dict(pair.split("=", 1) for pair in pairs)


def test_services_are_the_local_stack_topology() -> None:
    services = _compose()["services"]
    assert set(services) == {"kafka", "legacy", "commerce"}
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["legacy"]["image"] == services["commerce"]["image"] == "postgres:15"


def test_kafka_version_matches_the_jars_we_fetch() -> None:
    pom = (REPO / "stack" / "pom.xml").read_text()
    version = _compose()["services"]["kafka"]["image"].split(":")[1]
    assert f"<kafka.version>{version}</kafka.version>" in pom


def test_kafka_settings_match_server_properties() -> None:
    state = stack.StackState(1, 2, 3, 4, "x")
    local = dict(
        line.split("=", 1)
        for line in stack._kafka_properties(state, Path("/data")).splitlines()
        if line
    )
    env = _compose()["services"]["kafka"]["environment"]
    from_compose = {
        key.removeprefix("KAFKA_").lower().replace("_", "."): value
        for key, value in env.items()
        if key != "KAFKA_HEAP_OPTS"
    }
    # Addresses differ by nature (container names vs free loopback ports); all else must agree.
    address_keys = {"listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs"}
    assert {k: v for k, v in local.items() if k not in address_keys} == {
        k: v for k, v in from_compose.items() if k not in address_keys
    }
    assert from_compose["advertised.listeners"].startswith("PLAINTEXT://127.0.0.1:")
    assert env["KAFKA_HEAP_OPTS"] == stack.KAFKA_HEAP


def test_postgres_settings_match_the_clusters() -> None:
    services = _compose()["services"]
    for name in ("legacy", "commerce"):
        settings = _pg_settings(services[name])
        for key, value in stack._LOGICAL_SETTINGS.items():
            assert settings[key] == value, (name, key)
        for key in ("max_connections", "shared_buffers"):
            assert settings[key] == stack._PG_SETTINGS[key], (name, key)


def test_environment_variables_match_stack_env() -> None:
    services = _compose()["services"]
    state = stack.StackState(9092, 9093, 5433, 5434, "cutover")
    env = state.env()
    for name, var in (("legacy", "CUTOVER_SOURCE_DSN"), ("commerce", "CUTOVER_TARGET_DSN")):
        e = services[name]["environment"]
        port = services[name]["ports"][0].split(":")[1]
        expected = (
            f"postgresql://{e['POSTGRES_USER']}:{e['POSTGRES_PASSWORD']}@127.0.0.1:{port}/"
            f"{e['POSTGRES_DB']}"
        )
        assert env[var] == expected
    compose_text = (REPO / "docker-compose.yml").read_text()
    for var, value in env.items():
        assert f"export {var}={value}" in compose_text, var
