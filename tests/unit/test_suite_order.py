"""The suite's own scheduling (tests/conftest.py): groups handed out longest first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from devtools.test_durations import module_seconds
from tests.conftest import longest_first


@dataclass
class FakeItem:
    nodeid: str
    group: str

    def get_closest_marker(self, name: str) -> Any:
        assert name == "xdist_group"
        return pytest.mark.xdist_group(self.group).mark


def test_groups_are_handed_out_longest_first_keeping_the_order_inside() -> None:
    items = [
        FakeItem("tests/unit/test_a.py::t1", "tests/unit/test_a.py"),
        FakeItem("tests/integration/test_b.py::t1", "tests/integration/test_b.py"),
        FakeItem("tests/integration/test_c.py::t1", "private"),
        FakeItem("tests/integration/test_big.py::t1", "tests/integration/test_big.py"),
        FakeItem("tests/integration/test_b.py::t2", "tests/integration/test_b.py"),
        FakeItem("tests/integration/test_d.py::t1", "private"),
        FakeItem("tests/integration/test_big.py::t2", "tests/integration/test_big.py"),
    ]
    seconds = {
        "tests/integration/test_big.py": 170.0,
        "tests/integration/test_c.py": 100.0,
        "tests/integration/test_d.py": 90.0,  # with test_c: the group weighs 190 s
    }
    ordered = longest_first(cast(list[pytest.Item], items), seconds)
    assert [i.nodeid for i in ordered] == [
        "tests/integration/test_c.py::t1",
        "tests/integration/test_d.py::t1",
        "tests/integration/test_big.py::t1",
        "tests/integration/test_big.py::t2",
        "tests/integration/test_b.py::t1",  # not listed: a typical integration module (15 s)
        "tests/integration/test_b.py::t2",
        "tests/unit/test_a.py::t1",  # not listed: a typical unit module (1 s)
    ]


def test_module_seconds_add_up_the_cases_of_a_junit_report(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.integration.test_x" name="test_a" time="10.5"/>'
        '<testcase classname="tests.integration.test_x" name="test_b[1]" time="2.0"/>'
        '<testcase classname="tests.unit.test_y.TestThing" name="test_c" time="0.25"/>'
        "</testsuite></testsuites>"
    )
    assert module_seconds(report) == {
        "tests/integration/test_x.py": 12.5,
        "tests/unit/test_y.py": 0.2,  # rounded to a tenth
    }
