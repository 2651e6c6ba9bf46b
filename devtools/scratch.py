"""Throw-away databases for tests and benchmarks: create one (optionally loaded with a DDL file),
yield its DSN, drop it afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql


def _with_dbname(dsn: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]


def scratch_database(admin_dsn: str, ddl_file: Path | None, prefix: str) -> Iterator[str]:
    """Create a uniquely named database (optionally loaded with ``ddl_file``), yield its DSN,
    drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = _with_dbname(admin_dsn, name)
    try:
        if ddl_file is not None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(ddl_file.read_text().encode())
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
