"""The write fence's DDL text (cutover/fence.py fence_ddl): the guard names its own schema."""

from __future__ import annotations

import pytest

from cutover.errors import UsageError
from cutover.fence import fence_ddl


def test_the_guard_reads_its_own_schema_with_static_sql() -> None:
    text = fence_ddl('"Odd ""Schema"""')
    assert '"Odd ""Schema""".write_fence AS f' in text
    assert "@fence_schema@" not in text
    # A dynamic EXECUTE is planned again on every write statement of every application.
    body = text[text.index("$guard$") : text.rindex("$guard$")]
    assert "EXECUTE" not in body and "FOR SHARE" in body


def test_a_schema_name_that_would_end_the_body_is_refused() -> None:
    with pytest.raises(UsageError, match="guard"):
        fence_ddl('"a$guard$b"')
