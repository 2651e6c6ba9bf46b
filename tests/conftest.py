"""Hooks for the whole test suite (unit and integration): how pytest-xdist spreads it."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the groups into node id suffixes
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run each test module on one xdist worker, in order, unless it names its own group.

    ``make test`` runs ``--dist loadgroup``. A module split over workers would set its
    module-scoped fixtures (private stacks, shared scenarios) up once per worker, and some
    tests lean on process-wide state an earlier test of their module left (the DSN masking
    registry of tests/unit/test_secrets.py): within a module, the serial order is kept.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
