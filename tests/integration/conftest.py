"""Fixtures for tests on the real local stack (Kafka KRaft + two PostgreSQL 15 clusters).

The stack is started by ``make up`` (``make test`` does it); its addresses come from the
``CUTOVER_*`` environment variables or, failing that, from ``.stack/env``. Without a stack the
tests are skipped locally, but under ``CI=true`` a missing service is a failure, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

from cutover.control_store import ControlStore
from devtools import registry_stack
from devtools.scratch import scratch_database
from devtools.stack import read_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "shop"


def skip_or_fail(message: str) -> NoReturn:
    """Skip a test whose service is missing; under ``CI=true`` that is a failure instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _need(env: dict[str, str], key: str) -> str:
    if key not in env:
        skip_or_fail(f"{key} not set and .stack/env missing: run `make up` first")
    return env[key]


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    return read_env(REPO / ".stack", os.environ)


@pytest.fixture(scope="session")
def source_dsn(stack_env: dict[str, str]) -> str:
    """DSN of the legacy cluster's default database (admin use: create scratch databases)."""
    return _need(stack_env, "CUTOVER_SOURCE_DSN")


@pytest.fixture(scope="session")
def target_dsn(stack_env: dict[str, str]) -> str:
    return _need(stack_env, "CUTOVER_TARGET_DSN")


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_env: dict[str, str]) -> str:
    return _need(stack_env, "CUTOVER_KAFKA_BOOTSTRAP")


@pytest.fixture(scope="session")
def registry_url(stack_env: dict[str, str]) -> str:
    """The stack's schema registry (``make up REGISTRY=1``)."""
    url = stack_env.get(registry_stack.ENV_VAR)
    if not url:
        skip_or_fail(f"{registry_stack.ENV_VAR} not set: run `make up REGISTRY=1` first")
    return url


@pytest.fixture
def fresh_legacy(source_dsn: str) -> Iterator[str]:
    """A new database on the legacy cluster holding the empty legacy schema (examples/shop)."""
    yield from scratch_database(source_dsn, EXAMPLES / "legacy.sql", "legacy")


@pytest.fixture
def fresh_commerce(target_dsn: str) -> Iterator[str]:
    """A new database on the commerce cluster holding the empty commerce schema."""
    yield from scratch_database(target_dsn, EXAMPLES / "commerce.sql", "commerce")


@pytest.fixture
def commerce(fresh_commerce: str) -> str:
    """A fresh commerce database with the consumer's control tables (schema cutover)."""
    with psycopg.connect(fresh_commerce, autocommit=True) as conn:
        ControlStore(conn, "cutover").ensure("consumer")
    return fresh_commerce
