"""The store itself: one database, one schema, one side; the schema file and error translation.

A :class:`ControlStore` is told where its tables are (a connection, the schema name) and which
side of the pipeline that database is ("source" or "target", for error messages), so the same
code keeps the forward direction's producer positions in legacy and its consumer positions in
commerce, and the reverse direction the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Literal, TypeAlias

import psycopg
from psycopg import sql

from cutover import pg
from cutover.errors import DatabaseError

Conn = psycopg.Connection[Any]
Side = Literal["source", "target"]
Params: TypeAlias = Sequence[Any] | Mapping[str, Any] | None

#: The roles, one section of ``schema.sql`` each: a role creates its own tables where it runs.
Role = Literal["consumer", "commands", "producer", "reverse"]

#: The tables of each role.
CONSUMER_TABLES: Final = ("consumer_offsets", "tombstones", "truncates", "dead_letters")
COMMAND_TABLES: Final = ("verify_runs", "verify_chunks", "domain_state", "transitions", "audit")
PRODUCER_TABLES: Final = (
    "producer_state",
    "table_schemas",
    "snapshot_requests",
    "producer_dead_letters",
    "snapshot_progress",
)

#: The reverse appliers' row positions in legacy (legacy tables have no bookkeeping columns).
REVERSE_TABLES: Final = ("row_positions",)

ROLE_TABLES: Final[Mapping[Role, tuple[str, ...]]] = {
    "consumer": CONSUMER_TABLES,
    "commands": COMMAND_TABLES,
    "producer": PRODUCER_TABLES,
    "reverse": REVERSE_TABLES,
}

#: The schema of the producer's tables in the legacy database (not configurable).
LEGACY_SCHEMA: Final = "cutover"

# Advisory lock key for creating the control tables ("cutc" as an integer).
_DDL_LOCK: Final = 0x63757463


_SECTION = re.compile(r"^-- @section (\w+)\n", re.MULTILINE)


def ddl(*roles: Role) -> str:
    """The text of ``cutover/control_store/schema.sql`` (unqualified names, see its header):
    the sections of ``roles``, or the whole file without any."""
    text = resources.files("cutover.control_store").joinpath("schema.sql").read_text("utf-8")
    if not roles:
        return text
    parts = _SECTION.split(text)  # header, name, body, name, body, ...
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    return "".join(sections[role] for role in roles)


def qualified(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table)


def db_error(exc: psycopg.Error, doing: str, side: Side = "target") -> DatabaseError:
    """A psycopg error as the project's DatabaseError, naming what was being done (the one
    translation, :func:`cutover.pg.translate`)."""
    return pg.translate(exc, doing, side)


@dataclass(frozen=True, slots=True)
class ControlStore:
    """The control tables in one database: ``conn`` reaches it, ``schema`` holds them."""

    conn: Conn
    schema: str
    side: Side = "target"

    def table(self, name: str) -> sql.Identifier:
        """``schema.name``, quoted."""
        return sql.Identifier(self.schema, name)

    def error(self, exc: psycopg.Error, doing: str) -> DatabaseError:
        return db_error(exc, doing, self.side)

    def execute(
        self, query: sql.SQL | sql.Composed, params: Params = None, *, doing: str
    ) -> psycopg.Cursor[Any]:
        """Run one statement; a psycopg error becomes DatabaseError saying ``doing``."""
        try:
            return self.conn.execute(query, params)
        except psycopg.Error as exc:
            raise self.error(exc, doing) from None

    def ensure(self, *roles: Role) -> None:
        """Create the schema and the tables of ``roles`` (all without any) if missing; idempotent
        and safe concurrently.

        Runs under a transaction-level advisory lock: two commands starting at once on a fresh
        database would otherwise race on CREATE TABLE IF NOT EXISTS (a catalog unique violation).
        """
        try:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [_DDL_LOCK])
                # Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database
                # even when the schema exists, which a least-privilege role lacks (cutover.grants).
                found = self.conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", [self.schema]
                ).fetchone()
                if found is None:
                    self.conn.execute(
                        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                            sql.Identifier(self.schema)
                        )
                    )
                self.conn.execute(
                    sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema))
                )
                self.conn.execute(ddl(*roles).encode())
        except psycopg.Error as exc:
            raise self.error(exc, f"creating the control tables in schema {self.schema}") from None

    def missing(self, tables: Sequence[str]) -> list[str]:
        """Those of ``tables`` that do not exist yet in the schema (all on a fresh database)."""
        rows = self.execute(
            sql.SQL(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relkind = 'r' AND c.relname = ANY(%s)"
            ),
            (self.schema, list(tables)),
            doing="reading the control tables",
        ).fetchall()
        present = {r[0] for r in rows}
        return [t for t in tables if t not in present]

    def exists(self, table: str) -> bool:
        return not self.missing([table])


def ensure_control_plane(conn: Conn, schema: str) -> None:
    """Create the cutover commands' tables in ``schema`` of the target database."""
    ControlStore(conn, schema, "target").ensure("commands")
