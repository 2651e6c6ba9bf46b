"""`cutover init` type-checks the mapping against both databases' column types (exit 2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools import harness
from devtools.harness import Scenario, open_scenario

GOOD = (
    'visible = { from = "status", equals = "live", reverse = { true = "live", false = "hidden" } }'
)


def _scenario_with(
    tmp_path: Path, legacy: str, commerce: str, bootstrap: str, *, old: str, new: str
) -> Iterator[tuple[Scenario, Path, int]]:
    text = harness.MAPPING.read_text(encoding="utf-8")
    assert old in text
    text = text.replace(old, new)
    path = tmp_path / "mapping.toml"
    path.write_text(text, encoding="utf-8")
    line = text.splitlines().index(new) + 1
    with open_scenario(legacy, commerce, bootstrap, tmp_path, mapping=path) as s:
        yield s, path, line


@pytest.fixture
def text_minor_units(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[Scenario, Path, int]]:
    bad = 'visible = { from = "status", minor_units = 2 }'
    yield from _scenario_with(
        tmp_path, fresh_legacy, fresh_commerce, kafka_bootstrap, old=GOOD, new=bad
    )


@pytest.fixture
def numeric_into_bigint(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[Scenario, Path, int]]:
    old = 'price_minor = { from = "price_idr", minor_units = 2 }'
    yield from _scenario_with(
        tmp_path,
        fresh_legacy,
        fresh_commerce,
        kafka_bootstrap,
        old=old,
        new='price_minor = "price_idr"',
    )


@pytest.fixture
def no_visible_reverse(
    fresh_legacy: str, fresh_commerce: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[Scenario, Path, int]]:
    yield from _scenario_with(
        tmp_path,
        fresh_legacy,
        fresh_commerce,
        kafka_bootstrap,
        old=GOOD,
        new='visible = { from = "status", equals = "live" }',
    )


def _nothing_created(scenario: Scenario) -> None:
    with psycopg.connect(scenario.source_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_publication WHERE pubname = %s", (scenario.publication,)
        ).fetchone() == (0,)


def test_minor_units_on_a_text_column_is_refused_by_init(
    text_minor_units: tuple[Scenario, Path, int],
) -> None:
    scenario, path, line = text_minor_units
    for args in (("init", "--dry-run"), ("init",)):
        result = scenario.cli(*args)
        assert result.returncode == 2, result.stderr
        assert f"{path}:{line}: tables.products.columns.visible:" in result.stderr
        assert "source column shop.products.status is text" in result.stderr
        assert "point `from` at a numeric column" in result.stderr
    _nothing_created(scenario)


def test_a_value_the_target_column_cannot_hold_is_refused_by_init(
    numeric_into_bigint: tuple[Scenario, Path, int],
) -> None:
    scenario, path, line = numeric_into_bigint
    result = scenario.cli("init")
    assert result.returncode == 2, result.stderr
    assert f"{path}:{line}: tables.products.columns.price_minor:" in result.stderr
    assert "target column commerce.listings.price_minor is bigint" in result.stderr
    assert "minor_units = N" in result.stderr
    _nothing_created(scenario)


def test_a_column_without_its_reverse_is_refused_by_init(
    no_visible_reverse: tuple[Scenario, Path, int],
) -> None:
    scenario, path, line = no_visible_reverse
    result = scenario.cli("init")
    assert result.returncode == 2, result.stderr
    assert f"{path}:{line}: tables.products.columns.visible:" in result.stderr
    assert "shop.products → commerce.listings.visible: no reverse" in result.stderr
    assert 'reverse = { true = "live"' in result.stderr
    _nothing_created(scenario)
