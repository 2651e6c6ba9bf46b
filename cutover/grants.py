"""Least-privilege database roles: the SQL ``cutover init --print-grants`` prints.

Pure: built from the settings and the mapping, composed with :mod:`psycopg.sql`, never executed
here. One script per database (legacy = ``[source]``, commerce = ``[target]``), each opened by a
``-- @database NAME`` line, run by an administrator AFTER ``cutover init`` (and ``init
--reverse``), which creates the objects granted on. Re-running it changes nothing. Roles
(``[roles]``, :class:`cutover.config.RoleSettings`):

* producer: LOGIN REPLICATION (logical slots); SELECT on the PUBLISHED columns only, as
  column-level grants, so even a snapshot cannot read an excluded (social) column; its control
  tables (legacy schema ``cutover``). On commerce the same for the reverse producer (the mapped
  commerce columns, its control tables in ``[target] control_schema``);
* applier: writes the commerce tables of the mapping and the commerce control tables, may use
  replication origins (it marks its transactions); nothing on legacy but CONNECT;
* reverse applier: writes the mapped columns of legacy's tables (and a legacy-only column a
  ``reverse`` rule rebuilds on purpose, the invoice url; never a social one) and its control
  tables there;
* SRE (verify, status, switches): reads both sides through the mapping (the published legacy
  columns, the commerce tables) and the producers' and appliers' positions and heartbeats (the
  write switches' gates and drains), writes the commerce control schema (member of the NOLOGIN
  control owner, since the commands create and migrate those tables on first use) and raises or
  lowers the write fences; ``complete`` alters the reverse publication and, with the last
  domain, drops the forward slot and publication: the control owner owns both publications
  (in each database) and the SRE has REPLICATION on legacy (dropping a slot needs it).

Passwords are never part of it: the script says how to set them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from cutover.config import Settings
from cutover.control_store import (
    COMMAND_TABLES,
    CONSUMER_TABLES,
    LEGACY_SCHEMA,
    PRODUCER_TABLES,
    REVERSE_TABLES,
)
from cutover.mapping import MappingSpec, TableMapping

#: The line that opens each database's script (the part to run in that database).
DATABASE_MARKER: Final = "-- @database "
FENCE_TABLE: Final = "write_fence"
FENCE_LOG_TABLE: Final = "write_fence_log"
#: What an applier needs to mark its transactions with a replication origin (cutover.origin).
ORIGIN_FUNCTIONS: Final = (
    "pg_replication_origin_create(text)",
    "pg_replication_origin_oid(text)",
    "pg_replication_origin_session_setup(text)",
    # cutover.origin checks it before setting one up (PUBLIC no longer has it: _fence).
    "pg_replication_origin_session_is_setup()",
)
#: The write fence's guard calls it in every writer's session, as the guard's owner (fence.sql).
ORIGIN_IS_SETUP: Final = "pg_replication_origin_session_is_setup()"

_PASSWORDS = (
    "-- Passwords are not part of this script: set each login role's own, from your secret\n"
    "-- store, e.g. in psql: \\password {role} (or ALTER ROLE ... PASSWORD, managed services).\n"
    "-- Managed PostgreSQL (RDS, Cloud SQL) refuses the REPLICATION attribute: grant its\n"
    "-- replication role instead (RDS: GRANT rds_replication TO {role}; Cloud SQL: ALTER ROLE\n"
    "-- {role} WITH REPLICATION as cloudsqlsuperuser)."
)


@dataclass(frozen=True, slots=True)
class Script:
    """The statements to run in one database, with a comment saying what they are for."""

    database: str
    comment: str
    statements: tuple[sql.Composable, ...]

    def render(self) -> str:
        lines = [f"{DATABASE_MARKER}{self.database}", *_comment(self.comment)]
        lines += [f"{s.as_string(None)};" for s in self.statements]
        return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    return [line if line.startswith("--") else f"-- {line}" for line in text.splitlines()]


def published_columns(tm: TableMapping) -> tuple[str, ...]:
    """The columns of ``tm``'s source table the publication lists (init's preflight refuses a
    column neither read by the mapping nor excluded, so what it reads IS the published set)."""
    return tuple(sorted(tm.source_columns_used() - tm.exclude))


def _ids(names: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def _role(name: str, attributes: str) -> list[sql.Composable]:
    """Create the role if it does not exist (roles are cluster-wide), then set its attributes."""
    create = sql.SQL(
        "DO $role$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {name}) THEN "
        "CREATE ROLE {role}; END IF; END $role$"
    ).format(name=sql.Literal(name), role=sql.Identifier(name))
    return [create, sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(name), sql.SQL(attributes))]


def _logins(settings: Settings) -> list[sql.Composable]:
    """Every login role, in each database's cluster (the two may be different clusters)."""
    r = settings.roles
    return [
        *_role(r.producer, "LOGIN REPLICATION"),
        *_role(r.applier, "LOGIN"),
        *_role(r.reverse_applier, "LOGIN"),
        *_role(r.sre, "LOGIN"),
    ]


def _if_table(schema: str, table: str, statement: sql.Composable) -> sql.Composable:
    """``statement`` when ``schema.table`` exists: control tables come with init (--reverse)."""
    return sql.SQL(
        "DO $grant$ BEGIN IF to_regclass({name}) IS NOT NULL THEN {statement}; END IF; END $grant$"
    ).format(name=sql.Literal(sql.Identifier(schema, table).as_string(None)), statement=statement)


def _table_grant(
    privileges: str, schema: str, tables: Sequence[str], roles: Sequence[str]
) -> list[sql.Composable]:
    """``privileges`` on each existing control table, and its sequences (bigserial ids)."""
    out: list[sql.Composable] = []
    for table in tables:
        grant = sql.SQL("GRANT {} ON TABLE {} TO {}").format(
            sql.SQL(privileges), sql.Identifier(schema, table), _ids(roles)
        )
        out.append(_if_table(schema, table, grant))
    out.append(
        sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
            sql.Identifier(schema), _ids(roles)
        )
    )
    return out


def _connect(database: str, roles: Sequence[str]) -> sql.Composable:
    # TEMPORARY: the appliers stage a batch in temporary tables (consumers.sql).
    return sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
        sql.Identifier(database), _ids(roles)
    )


def _usage(schemas: Iterable[str], roles: Sequence[str]) -> list[sql.Composable]:
    return [
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(s), _ids(roles))
        for s in dict.fromkeys(schemas)
    ]


def _execute(functions: Sequence[str], roles: Sequence[str]) -> list[sql.Composable]:
    # Function signatures are fixed text from this module, never input.
    return [
        sql.SQL("GRANT EXECUTE ON FUNCTION pg_catalog.{} TO {}").format(sql.SQL(f), _ids(roles))
        for f in functions
    ]


def _fence(schema: str, sre: str, producer: str) -> list[sql.Composable]:
    """Raising/lowering a fence updates its row and logs it; the producer reading the database
    reads the log at start. The guard runs with its owner's rights (SECURITY DEFINER, in
    fence.sql): the SRE installs it, so the SRE needs what it calls; writers need nothing."""
    fence = sql.SQL("GRANT SELECT, UPDATE ON TABLE {} TO {}").format(
        sql.Identifier(schema, FENCE_TABLE), sql.Identifier(sre)
    )
    log = sql.SQL("GRANT SELECT, INSERT ON TABLE {} TO {}").format(
        sql.Identifier(schema, FENCE_LOG_TABLE), sql.Identifier(sre)
    )
    read = sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(
        sql.Identifier(schema, FENCE_LOG_TABLE), sql.Identifier(producer)
    )
    guard = sql.SQL("GRANT EXECUTE ON FUNCTION pg_catalog.{} TO {}").format(
        sql.SQL(ORIGIN_IS_SETUP), sql.Identifier(sre)
    )
    return [
        _if_table(schema, FENCE_TABLE, fence),
        _if_table(schema, FENCE_LOG_TABLE, log),
        _if_table(schema, FENCE_LOG_TABLE, read),
        guard,
    ]


def _owner(role: str, sre: str) -> list[sql.Composable]:
    """The NOLOGIN owner role and the SRE its member (acting as it without SET ROLE)."""
    return [
        *_role(role, "NOLOGIN"),
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(sre)),
    ]


def _publication_owner(publication: str, owner: str) -> sql.Composable:
    """``complete`` alters (the reverse one) or drops (the forward one, with the last domain)
    the publication init created: only its owner may; init's administrator stays able to."""
    return sql.SQL(
        "DO $owner$ BEGIN IF EXISTS (SELECT FROM pg_publication WHERE pubname = {name}) THEN "
        "ALTER PUBLICATION {publication} OWNER TO {owner}; END IF; END $owner$"
    ).format(
        name=sql.Literal(publication),
        publication=sql.Identifier(publication),
        owner=sql.Identifier(owner),
    )


def legacy_script(settings: Settings, mapping: MappingSpec, database: str) -> Script:
    """What runs in legacy: the producer reads, the reverse applier writes, the SRE reads."""
    r = settings.roles
    src = mapping.source_schema
    rev_schema = settings.reverse.control_schema
    out: list[sql.Composable] = [
        *_logins(settings),
        _connect(database, [r.producer, r.reverse_applier, r.sre]),
        *_usage([src, LEGACY_SCHEMA, rev_schema], [r.producer, r.reverse_applier, r.sre]),
    ]
    reverse_applier = sql.Identifier(r.reverse_applier)
    for tm in sorted(mapping.tables.values(), key=lambda t: t.source_table):
        table = sql.Identifier(src, tm.source_table)
        cols = _ids(published_columns(tm))
        updated = sorted(set(published_columns(tm)) | tm.reverse_columns())
        written = _ids(dict.fromkeys([*updated, *(c for c, _ in tm.reverse_insert)]))
        out += [
            sql.SQL("GRANT SELECT ({}) ON TABLE {} TO {}").format(
                cols, table, _ids([r.producer, r.sre])
            ),
            sql.SQL(
                "GRANT SELECT ({cols}), UPDATE ({updated}), INSERT ({written}), DELETE ON TABLE "
                "{table} TO {role}"
            ).format(
                cols=cols, updated=_ids(updated), written=written, table=table, role=reverse_applier
            ),
        ]
    out += _table_grant(
        "SELECT, INSERT, UPDATE, DELETE", LEGACY_SCHEMA, PRODUCER_TABLES, [r.producer]
    )
    out += _table_grant(
        "SELECT, INSERT, UPDATE, DELETE",
        rev_schema,
        (*CONSUMER_TABLES, *REVERSE_TABLES),
        [r.reverse_applier],
    )
    out += _table_grant("SELECT", LEGACY_SCHEMA, PRODUCER_TABLES, [r.sre])
    out += _table_grant("SELECT", rev_schema, (*CONSUMER_TABLES, *REVERSE_TABLES), [r.sre])
    out += _execute(ORIGIN_FUNCTIONS, [r.reverse_applier])
    out += _fence(LEGACY_SCHEMA, r.sre, r.producer)
    # complete, with the last domain, drops the forward slot (REPLICATION: PostgreSQL has no
    # finer right to drop a slot) and the forward publication (its owner's right).
    out += [
        sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(r.sre)),
        *_owner(r.control_owner, r.sre),
        _publication_owner(settings.source.publication, r.control_owner),
    ]
    comment = (
        f"legacy database {database} ([source] dsn), as an administrator, after cutover init.\n"
        f"{r.producer}: replication slots, SELECT on the published columns of {src} only, its "
        f"control tables ({LEGACY_SCHEMA}).\n{r.reverse_applier}: writes the mapped columns of "
        f"{src} (reverse path) and its control tables ({rev_schema}).\n{r.sre}: reads the "
        f"published columns and the control tables, raises and lowers legacy's write fence; drops "
        f"the forward slot and publication when the last domain completes (REPLICATION, member "
        f"of {r.control_owner}, which owns the publication).\n"
        f"{r.applier} may not even connect here (it writes commerce only).\n"
        + _PASSWORDS.format(role=r.producer)
    )
    return Script("legacy", comment, tuple(out))


def commerce_script(settings: Settings, mapping: MappingSpec, database: str) -> Script:
    """What runs in commerce: the applier writes, the reverse producer reads, the SRE reads and
    keeps the control tables."""
    r = settings.roles
    tgt = mapping.target_schema
    ctl = settings.target.control_schema
    out: list[sql.Composable] = [
        *_logins(settings),
        *_owner(r.control_owner, r.sre),
        _connect(database, [r.producer, r.applier, r.sre]),
        *_usage([tgt, ctl], [r.producer, r.applier, r.sre]),
        # USAGE too: the owner's rights are checked for what runs as it (the foreign keys
        # between control tables, e.g. verify_chunks -> verify_runs).
        sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(
            sql.Identifier(ctl), sql.Identifier(r.control_owner)
        ),
    ]
    for tm in sorted(mapping.tables.values(), key=lambda t: t.target_table):
        table = sql.Identifier(tgt, tm.target_table)
        reverse_cols = dict.fromkeys((*tm.target_key, *tm.target_columns))
        out += [
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {} TO {}").format(
                table, sql.Identifier(r.applier)
            ),
            sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(table, sql.Identifier(r.sre)),
            sql.SQL("GRANT SELECT ({}) ON TABLE {} TO {}").format(
                _ids(reverse_cols), table, sql.Identifier(r.producer)
            ),
        ]
    owned = (*CONSUMER_TABLES, *COMMAND_TABLES)
    out += [
        _if_table(
            ctl,
            t,
            sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                sql.Identifier(ctl, t), sql.Identifier(r.control_owner)
            ),
        )
        for t in owned
    ]
    out += _table_grant("SELECT, INSERT, UPDATE, DELETE", ctl, owned, [r.applier])
    out += _table_grant("SELECT, INSERT, UPDATE, DELETE", ctl, PRODUCER_TABLES, [r.producer])
    # switch-writes' gate and step: the reverse producer's heartbeat (reverse_path).
    out += _table_grant("SELECT", ctl, PRODUCER_TABLES, [r.sre])
    out += _execute(ORIGIN_FUNCTIONS, [r.applier])
    out += _fence(ctl, r.sre, r.producer)
    out.append(_publication_owner(settings.reverse.publication, r.control_owner))
    comment = (
        f"commerce database {database} ([target] dsn), as an administrator, after cutover "
        f"init.\n{r.applier}: writes the mapped tables of {tgt} and the control tables ({ctl}), "
        "uses replication origins.\n"
        f"{r.producer}: the reverse producer: replication slots, SELECT on the mapped columns, "
        f"its control tables.\n{r.sre}: reads {tgt}; member of {r.control_owner}, which owns "
        f"the control tables of {ctl} (the commands create them on first use) and the reverse "
        "publication (complete takes a domain's tables out of it); raises and lowers "
        "commerce's write fence.\n" + _PASSWORDS.format(role=r.producer)
    )
    return Script("commerce", comment, tuple(out))


def database_of(dsn: str) -> str:
    """The database a DSN (URL or key=value) names; the user's name when it names none."""
    info = conninfo_to_dict(dsn)
    return str(info.get("dbname") or info.get("user") or "postgres")


def grant_scripts(
    settings: Settings, mapping: MappingSpec, databases: tuple[str, str]
) -> tuple[Script, Script]:
    """The legacy and commerce scripts; ``databases`` = (legacy name, commerce name)."""
    return (
        legacy_script(settings, mapping, databases[0]),
        commerce_script(settings, mapping, databases[1]),
    )


def render(scripts: Iterable[Script]) -> str:
    """The whole output of ``--print-grants``: each database's script after its marker."""
    return "\n".join(s.render() for s in scripts)


def split(text: str) -> dict[str, str]:
    """``render``'s output back into {database: script} (what an operator runs where)."""
    parts: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines(keepends=True):
        if line.startswith(DATABASE_MARKER):
            current = line[len(DATABASE_MARKER) :].strip()
            parts[current] = ""
        elif current is not None:
            parts[current] += line
    return parts
