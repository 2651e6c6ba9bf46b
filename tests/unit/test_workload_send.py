"""The workload's wire (devtools.workload_send): the pure part, placeholder numbering, for every
statement the plan can send. The wire itself is covered by tests/integration/test_workload.py."""

from __future__ import annotations

import re
from itertools import islice

import pytest

from devtools.workload import plan_operations
from devtools.workload_send import numbered


def test_placeholders_are_numbered_in_order() -> None:
    text = "UPDATE t SET a = %s, b = %s WHERE id = %s"
    assert numbered(text) == b"UPDATE t SET a = $1, b = $2 WHERE id = $3"
    assert numbered("SELECT 1") == b"SELECT 1"


def test_a_literal_percent_is_refused() -> None:
    with pytest.raises(ValueError, match="only %s placeholders"):
        numbered("SELECT %s WHERE a LIKE 'x%'")


def test_every_planned_statement_gets_one_placeholder_per_parameter() -> None:
    texts = {
        text: len(params)
        for op in islice(plan_operations(3, bulk_every=50), 3_000)
        for text, params in op.statements
    }
    assert len(texts) > 20
    for text, count in texts.items():
        found = [int(n) for n in re.findall(rb"\$(\d+)", numbered(text))]
        assert found == list(range(1, count + 1)), text
