"""Hooks for the whole test suite (unit and integration): how pytest-xdist spreads it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

#: Seconds per module from an earlier run (``make test-durations``); a module not listed counts
#: as a typical one of its kind.
DURATIONS = Path(__file__).with_name("durations.json")
UNLISTED_S = {"integration": 15.0, "unit": 1.0}


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def _group(item: pytest.Item) -> str:
    marker = item.get_closest_marker("xdist_group")
    assert marker is not None
    return str(marker.args[0] if marker.args else marker.kwargs["name"])


def longest_first(items: list[pytest.Item], seconds: dict[str, float]) -> list[pytest.Item]:
    """The items with their groups ordered by duration, longest first (stable inside a group
    and between equals): the longest-processing-time rule, so the run ends on short groups."""
    group_of: dict[str, str] = {}  # module -> the group of its first item
    first_seen: dict[str, int] = {}
    for n, item in enumerate(items):
        group = _group(item)
        group_of.setdefault(_module(item), group)
        first_seen.setdefault(group, n)
    group_weight: dict[str, float] = defaultdict(float)
    for module, group in group_of.items():
        kind = "integration" if "/integration/" in module else "unit"
        group_weight[group] += seconds.get(module, UNLISTED_S[kind])
    return sorted(items, key=lambda i: (-group_weight[_group(i)], first_seen[_group(i)]))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the groups into node id suffixes
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run each test module on one xdist worker, in order, unless it names its own group; and
    hand the groups out longest first.

    ``make test`` runs ``--dist loadgroup --no-loadscope-reorder``. A module split over workers
    would set its module-scoped fixtures (private stacks, shared scenarios) up once per worker,
    and some tests lean on process-wide state an earlier test of their module left (the DSN
    masking registry of tests/unit/test_secrets.py): within a module, the serial order is kept.
    xdist's own reorder hands out groups by number of tests, which puts a long single test
    (the write cutover's lifecycle, ~3 minutes) last, on one worker, while the other idles.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_module(item)))
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    items[:] = longest_first(items, seconds)
