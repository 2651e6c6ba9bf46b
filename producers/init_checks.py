"""``cutover init``, preflight: what the catalog says, and whether it is fit for capture.

Nothing is changed here; every problem is a failed check naming the table or setting and the fix
(the list is in :mod:`producers.init`'s docstring). :class:`InitReport` collects the checks and
the creation steps' actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from cutover import kafka, pg
from cutover.config import KafkaSettings, Settings
from cutover.errors import ConfigError
from cutover.mapping import MappingSpec, TableMapping

MIN_SERVER_VERSION: Final = 150000

Conn = psycopg.Connection[Any]


@dataclass
class InitReport:
    """What init found and did; ``to_dict`` is the ``--json`` output."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": ok, "detail": detail})

    def action(self, obj: str, status: str, detail: str = "") -> None:
        entry = {"object": obj, "status": status}
        if detail:
            entry["detail"] = detail
        self.actions.append(entry)

    @property
    def problems(self) -> list[str]:
        return [c["detail"] for c in self.checks if not c["ok"]]

    def to_dict(self) -> dict[str, Any]:
        by_status: dict[str, list[str]] = {}
        for a in self.actions:
            by_status.setdefault(a["status"], []).append(a["object"])
        return {
            "dry_run": self.dry_run,
            "checks": self.checks,
            "actions": self.actions,
            "created": by_status.get("created", []),
            "existing": by_status.get("exists", []),
            "altered": by_status.get("altered", []),
            "warnings": self.warnings,
        }


@dataclass(frozen=True, slots=True)
class TableInfo:
    """What the catalog says about one captured table."""

    name: str
    oid: int
    replica_identity: str  # relreplident: d, n, f, i
    columns: tuple[str, ...]  # attnum order, generated columns left out
    generated: frozenset[str]
    not_null: frozenset[str]
    primary_key: tuple[str, ...]
    identity_index: str | None
    identity_columns: tuple[str, ...]
    identity_index_valid: bool


def published_columns(info: TableInfo, tm: TableMapping) -> tuple[str, ...]:
    """The publication column list of a table: its columns minus ``exclude``, in column order."""
    return tuple(c for c in info.columns if c not in tm.exclude)


def ri_index_name(table: str) -> str:
    return f"cutover_ri_{table}"[:63]


# ---------------------------------------------------------------------------------------------
# catalog
# ---------------------------------------------------------------------------------------------


def read_tables(conn: Conn, schema: str, tables: list[str]) -> dict[str, TableInfo]:
    """Catalog facts of the named tables of ``schema`` that exist (plain or partitioned)."""
    rows = conn.execute(
        "SELECT c.oid, c.relname, c.relreplident FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')",
        (schema, tables),
    ).fetchall()
    out: dict[str, TableInfo] = {}
    for oid, name, ident in rows:
        cols = conn.execute(
            "SELECT attname, attnum, attgenerated <> '', attnotnull FROM pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (oid,),
        ).fetchall()
        by_num = {int(num): str(n) for n, num, _, _ in cols}
        pk_row = conn.execute(
            "SELECT conkey FROM pg_constraint WHERE conrelid = %s AND contype = 'p'", (oid,)
        ).fetchone()
        ri_row = conn.execute(
            "SELECT i.indexrelid::regclass::text, i.indkey::int2[], i.indisvalid"
            " FROM pg_index i WHERE i.indrelid = %s AND i.indisreplident",
            (oid,),
        ).fetchone()
        out[name] = TableInfo(
            name=name,
            oid=int(oid),
            replica_identity=str(ident),
            columns=tuple(n for n, _, gen, _ in cols if not gen),
            generated=frozenset(n for n, _, gen, _ in cols if gen),
            not_null=frozenset(n for n, _, _, nn in cols if nn),
            primary_key=tuple(by_num[k] for k in pk_row[0]) if pk_row else (),
            identity_index=ri_row[0] if ri_row else None,
            identity_columns=tuple(by_num[k] for k in ri_row[1]) if ri_row else (),
            identity_index_valid=bool(ri_row[2]) if ri_row else False,
        )
    return out


def identity_columns(info: TableInfo) -> tuple[str, ...]:
    """The columns an UPDATE/DELETE old tuple carries under the table's replica identity."""
    if info.replica_identity == "d":
        return info.primary_key
    if info.replica_identity == "i":
        return info.identity_columns
    if info.replica_identity == "f":
        return info.columns
    return ()


def read_publication(conn: Conn, name: str) -> tuple[dict[str, Any] | None, dict[str, list[str]]]:
    """(flags of the publication or None, {schema.table: [published columns]})."""
    row = conn.execute(
        "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate"
        " FROM pg_publication WHERE pubname = %s",
        (name,),
    ).fetchone()
    if row is None:
        return None, {}
    flags = dict(zip(("all", "insert", "update", "delete", "truncate"), row, strict=True))
    tables = {
        f"{s}.{t}": list(cols or [])
        for s, t, cols in conn.execute(
            "SELECT schemaname, tablename, attnames FROM pg_publication_tables WHERE pubname = %s",
            (name,),
        ).fetchall()
    }
    return flags, tables


def read_slot(conn: Conn, slot: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT plugin, slot_type, database, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint,"
        " wal_status, active_pid FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    keys = ("plugin", "slot_type", "database", "confirmed_flush_lsn", "wal_status", "active_pid")
    return dict(zip(keys, row, strict=True))


# ---------------------------------------------------------------------------------------------
# preflight
# ---------------------------------------------------------------------------------------------


def preflight_server(conn: Conn, settings: Settings, report: InitReport) -> None:
    """Server-wide checks: version, wal_level, slots, WAL senders, privileges."""
    version = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
    report.check(
        "server_version",
        version >= MIN_SERVER_VERSION,
        f"PostgreSQL {version // 10000}.{version % 10000}"
        if version >= MIN_SERVER_VERSION
        else f"PostgreSQL {version // 10000} is too old: publication column lists (used to keep "
        "excluded columns out of decoding) need PostgreSQL 15 or newer; upgrade the source",
    )
    wal_level = str(conn.execute("SHOW wal_level").fetchone()[0])  # type: ignore[index]
    report.check(
        "wal_level",
        wal_level == "logical",
        "wal_level = logical"
        if wal_level == "logical"
        else f"wal_level is {wal_level!r}: set wal_level = logical in postgresql.conf (or ALTER "
        "SYSTEM SET wal_level = logical) and restart PostgreSQL",
    )
    max_slots = int(conn.execute("SHOW max_replication_slots").fetchone()[0])  # type: ignore[index]
    used = int(conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0])  # type: ignore[index]
    ours = read_slot(conn, settings.source.slot) is not None
    report.check(
        "replication_slots",
        ours or used < max_slots,
        f"{used} of max_replication_slots = {max_slots} in use"
        + (f" (slot {settings.source.slot} exists)" if ours else "")
        if ours or used < max_slots
        else f"all {max_slots} replication slots are in use (max_replication_slots = "
        f"{max_slots}): drop an unused slot (pg_drop_replication_slot) or raise "
        "max_replication_slots and restart",
    )
    max_senders = int(conn.execute("SHOW max_wal_senders").fetchone()[0])  # type: ignore[index]
    senders = int(conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0])  # type: ignore[index]
    stream = settings.source.read_mode == "stream"
    report.check(
        "wal_senders",
        True,
        f"{senders} of max_wal_senders = {max_senders} in use "
        + (
            "(the producer, read_mode = stream, takes one while it runs)"
            if stream
            else "(the producer reads through the SQL interface and needs none; standbys and "
            "other tools do)"
        ),
    )
    if max_senders - senders < 1:
        report.warnings.append(
            f"no free WAL sender (max_wal_senders = {max_senders}); "
            + (
                "a producer with read_mode = stream that is not running yet will fail to start"
                if stream
                else "not needed by cutover, but standbys and pg_basebackup will fail"
            )
        )
    warning = pg.superuser_warning(conn, "cutover init")
    if warning is not None:
        # init may run as an administrator; the long-running components should not.
        report.warnings.append(
            warning + " (init may, once; produce, apply and the commands should not)"
        )
    role = conn.execute(
        "SELECT rolname, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert role is not None
    report.check(
        "replication_privilege",
        bool(role[1]),
        f"role {role[0]} may use replication slots"
        if role[1]
        else f"role {role[0]} lacks the REPLICATION attribute needed for logical slots: "
        f"ALTER ROLE {role[0]} REPLICATION (as a superuser)",
    )


def preflight_tables(
    mapping: MappingSpec, tables: dict[str, TableInfo], report: InitReport
) -> dict[str, tuple[str, ...]]:
    """Per-table checks; returns the publication column list of every table that passed."""
    schema = mapping.source_schema
    lists: dict[str, tuple[str, ...]] = {}
    for name, tm in mapping.tables.items():
        where = f"{schema}.{name}"
        info = tables.get(name)
        if info is None:
            report.check(
                f"table {where}",
                False,
                f"table {where} (in the mapping) does not exist in the source database: create "
                "it or remove it from the mapping",
            )
            continue
        published = published_columns(info, tm)
        problems = [
            *_key_and_column_problems(where, info, tm),
            *_identity_problems(where, info, tm, published),
        ]
        report.check(
            f"table {where}",
            not problems,
            "; ".join(problems)
            if problems
            else f"{where}: primary key ({', '.join(info.primary_key)}), replica identity "
            f"{ {'d': 'default', 'i': 'index', 'f': 'full'}[info.replica_identity] }, "
            f"{len(published)} of {len(info.columns)} columns published",
        )
        if not problems:
            lists[name] = published
    return lists


def _key_and_column_problems(where: str, info: TableInfo, tm: TableMapping) -> list[str]:
    """The primary key matches the mapping; every column is decided about and exists."""
    problems: list[str] = []
    if not info.primary_key:
        problems.append(
            f"{where} has no primary key: add one (ALTER TABLE {where} ADD PRIMARY KEY ...); "
            "snapshots chunk by it and consumers upsert by it"
        )
    elif set(info.primary_key) != set(tm.primary_key):
        problems.append(
            f"{where}: the primary key is ({', '.join(info.primary_key)}) but the mapping "
            f"says primary_key = {list(tm.primary_key)}: fix the mapping"
        )
    unknown = sorted(c for c in tm.source_columns_used() | tm.exclude if c not in info.columns)
    for col in unknown:
        if col in info.generated:
            problems.append(
                f"{where}.{col} is a generated column: PostgreSQL 15 cannot publish it; "
                "remove it from the mapping"
            )
        else:
            problems.append(
                f"{where}.{col} is named in the mapping but the table has no such column"
            )
    undecided = [
        c for c in info.columns if c not in tm.exclude and c not in tm.source_columns_used()
    ]
    if undecided:
        problems.append(
            f"{where}: column(s) {', '.join(undecided)} are neither read by the mapping nor "
            "excluded; add them to exclude = [...] (never published) or map them, so "
            "nothing is published without a decision"
        )
    return problems


def _identity_problems(
    where: str, info: TableInfo, tm: TableMapping, published: tuple[str, ...]
) -> list[str]:
    """The replica identity lets PostgreSQL publish UPDATE/DELETE and key deletes."""
    problems: list[str] = []
    if info.replica_identity == "n":
        problems.append(
            f"{where} has REPLICA IDENTITY NOTHING: updates and deletes cannot be captured; "
            f"ALTER TABLE {where} REPLICA IDENTITY DEFAULT"
        )
    elif info.replica_identity == "f" and tm.exclude:
        problems.append(
            f"{where} has REPLICA IDENTITY FULL but excludes {', '.join(sorted(tm.exclude))}: "
            "a column list must cover the replica identity, so PostgreSQL would refuse "
            f"UPDATE and DELETE on {where}; ALTER TABLE {where} REPLICA IDENTITY DEFAULT"
        )
    elif info.replica_identity == "i":
        hidden = [c for c in info.identity_columns if c not in published]
        if hidden:
            problems.append(
                f"{where}: replica identity index {info.identity_index} uses excluded "
                f"column(s) {', '.join(hidden)}; PostgreSQL would refuse UPDATE and DELETE. "
                f"ALTER TABLE {where} REPLICA IDENTITY DEFAULT"
            )
    if (
        tm.aggregate_key not in identity_columns(info)
        and tm.aggregate_key in info.columns
        and tm.aggregate_key not in info.not_null
    ):
        problems.append(
            f"{where}.{tm.aggregate_key} (the aggregate key) may be NULL and is not in the "
            "replica identity: deletes could not be keyed. Make it NOT NULL (init then "
            "adds it to the replica identity) or choose another aggregate_key"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# kafka
# ---------------------------------------------------------------------------------------------


def replication_problem(settings: KafkaSettings, brokers: int) -> str | None:
    """Why topics cannot get ``[kafka] replication_factor`` replicas on ``brokers`` live brokers
    (None: they can). Kafka would refuse the topic creation anyway, after the slot exists and
    with a terser message."""
    factor = settings.replication_factor
    if factor <= brokers:
        return None
    return (
        f"[kafka] replication_factor = {factor} is more than the {brokers} broker(s) Kafka "
        f"reports at {settings.bootstrap}: set [kafka] replication_factor to {brokers} or less "
        "(3, with min_insync_replicas = 2, on a three-broker cluster), or start the missing "
        "brokers"
    )


def check_replication(settings: KafkaSettings, timeout_s: float = 15.0) -> int:
    """The number of brokers Kafka reports; ConfigError when the replication factor exceeds it."""
    from confluent_kafka import KafkaException

    try:
        brokers = len(kafka.admin(settings).list_topics(timeout=timeout_s).brokers)
    except KafkaException as exc:
        raise kafka.translate(exc, f"reading the brokers of {settings.bootstrap}") from None
    problem = replication_problem(settings, brokers)
    if problem is not None:
        raise ConfigError(problem)
    return brokers
