"""The alert rules checked by the real promtool (Debian's ``prometheus`` package): the file is
valid, and ops/prometheus-alerts.test.yml, which plays each incident's series through the rules
(appliers stop, producer stops, a poison message, ...), passes. No services needed.

Without promtool the tests skip, except under ``CI=true`` (.ci/run installs it), where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[2] / "ops"
RULES = OPS / "prometheus-alerts.yml"
RULE_TESTS = OPS / "prometheus-alerts.test.yml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool missing: apt-get install prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    # cwd=ops/: the test file names its rule file relative to itself.
    return subprocess.run(
        [_promtool(), *args], cwd=OPS, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rules() -> None:
    done = _run("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    done = _run("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE))


def test_every_alert_has_a_test_where_it_fires() -> None:
    # A case that expects alerts has a list under `exp_alerts:` (an empty one reads `[]`).
    fired = re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n", RULE_TESTS.read_text())
    assert len(_alert_names()) == 10
    assert set(fired) == _alert_names()


def test_the_operations_guide_lists_every_alert() -> None:
    guide = (OPS.parent / "docs" / "OPERATIONS.md").read_text()
    listed = set(re.findall(r"`(Cutover\w+)`", guide))
    assert _alert_names() <= listed
