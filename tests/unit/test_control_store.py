"""The control store's schema file: one file creating every table the store's modules name,
idempotent and unqualified (the store sets search_path to the schema it is told)."""

from __future__ import annotations

import re

from cutover.control_store import (
    COMMAND_TABLES,
    CONSUMER_TABLES,
    PRODUCER_TABLES,
    REVERSE_TABLES,
    ROLE_TABLES,
    ddl,
)


def _created(text: str) -> list[str]:
    return re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \(", text)


def test_schema_file_creates_exactly_the_tables_of_every_role() -> None:
    assert sorted(_created(ddl())) == sorted(
        {*CONSUMER_TABLES, *COMMAND_TABLES, *PRODUCER_TABLES, *REVERSE_TABLES}
    )
    for role, tables in ROLE_TABLES.items():
        assert _created(ddl(role)) == list(tables), role


def test_schema_file_names_no_schema() -> None:
    statements = [line for line in ddl().splitlines() if not line.startswith("--")]
    assert not any("cutover." in line for line in statements)
    assert all("IF NOT EXISTS" in line for line in statements if line.startswith("CREATE "))
