"""``cutover init``: preflight checks, then idempotent creation of everything the pipeline needs.

Preflight (nothing is changed until every check passed; each problem names the table or setting
and the fix):

* PostgreSQL >= 15 (publication column lists), ``wal_level = logical``, a free replication slot
  (unless ours exists), WAL senders (reported), the role may use replication slots;
* every table of the mapping exists in ``source_schema``, has a primary key equal to the
  mapping's ``primary_key``, and a usable replica identity: not NOTHING, not FULL when columns
  are excluded (PostgreSQL would then refuse UPDATE/DELETE on the legacy table, because a column
  list must cover the replica identity), an identity index whose columns are all published;
* every column of a captured table is read by the mapping or excluded, and every column the
  mapping reads exists: a column nobody decided about is never published by accident (a new
  social column must not leak because somebody forgot the mapping).

Creation (each reported as ``created`` / ``exists`` / ``altered``; re-running changes nothing):

1. legacy control tables (schema ``cutover``, :mod:`producers.source_state`);
2. replica identity: a DELETE carries only the replica-identity columns, and the Kafka key of a
   delete is the aggregate id. When a table's aggregate key is not part of its primary key
   (``products.merchant_id``, ``payments.order_id``, ``invoices.order_id``), init builds a unique
   index ``cutover_ri_<table>`` on (primary key, aggregate key) ``CONCURRENTLY`` and makes it the
   replica identity, so deletes can be routed to the aggregate's partition;
3. the publication, FOR TABLE with explicit column lists = the table's columns minus the
   mapping's ``exclude``: pgoutput never sends excluded (social) columns. An existing publication
   with other tables or columns is ALTERed (``SET TABLE``) and reported as ``altered``. Columns
   added to a table later are NOT published until the mapping mentions them and init runs again
   (so the writer schema stays what consumers know until someone decides);
4. the pgoutput slot, and its starting position recorded in ``cutover.producer_state`` (so a
   slot advanced, dropped or recreated behind our back is detected from the very first start);
5. Kafka topics (docs/ARCHITECTURE.md: domain topics, dlq, compacted control and schemas);
6. the commerce control tables (``cutover/control.sql``) and, with ``--target-ddl FILE``, the
   commerce schema when it is missing.

All SQL is composed with :mod:`psycopg.sql` (identifiers quoted, never string formatting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql

from cutover import kafka, pg
from cutover.config import Settings
from cutover.errors import CheckFailed, UsageError
from cutover.mapping import (
    MappingSpec,
    TableMapping,
    check_column_types,
    check_round_trip,
    load_mapping,
)
from producers import source_state
from producers.pgoutput import lsn_to_str

MIN_SERVER_VERSION: Final = 150000
CONTROL_SQL: Final = Path(__file__).resolve().parents[1] / "cutover" / "control.sql"
PUBLISH: Final = "insert, update, delete, truncate"

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


def _connect(dsn: str, side: str) -> Conn:
    return pg.connect(dsn, side=side, application_name="cutover init", doing="cannot connect")


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
    report.check(
        "wal_senders",
        True,
        f"{senders} of max_wal_senders = {max_senders} in use (the producer reads through "
        "the SQL interface and needs none; standbys and other tools do)",
    )
    if max_senders - senders < 1:
        report.warnings.append(
            f"no free WAL sender (max_wal_senders = {max_senders}); not needed by cutover, "
            "but standbys and pg_basebackup will fail"
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
        published = published_columns(info, tm)
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


# ---------------------------------------------------------------------------------------------
# creation
# ---------------------------------------------------------------------------------------------


def _ensure_replica_identity(
    conn: Conn, schema: str, info: TableInfo, tm: TableMapping, report: InitReport
) -> None:
    """Make DELETEs carry the aggregate key (see the module docstring, step 2)."""
    if tm.aggregate_key in identity_columns(info):
        return
    index = ri_index_name(info.name)
    cols = [*info.primary_key, tm.aggregate_key]
    where = f"{schema}.{info.name}"
    if report.dry_run:
        report.action(f"replica identity {where}", "would_alter", f"index {index} ({cols})")
        return
    existing = conn.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, index),
    ).fetchone()
    if existing is not None and not existing[0]:
        # A concurrent build that failed leaves an invalid index behind: rebuild it.
        conn.execute(
            sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(schema, index))
        )
    conn.execute(
        sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({})").format(
            sql.Identifier(index),
            sql.Identifier(schema, info.name),
            sql.SQL(", ").join(map(sql.Identifier, cols)),
        )
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
            sql.Identifier(schema, info.name), sql.Identifier(index)
        )
    )
    report.action(
        f"replica identity {where}",
        "altered",
        f"unique index {index} on ({', '.join(cols)}) is now the replica identity, so "
        f"deletes carry the aggregate key {tm.aggregate_key}",
    )


def _table_list(schema: str, lists: dict[str, tuple[str, ...]]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} ({})").format(
            sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, cols))
        )
        for table, cols in sorted(lists.items())
    )


def _ensure_publication(
    conn: Conn, name: str, schema: str, lists: dict[str, tuple[str, ...]], report: InitReport
) -> None:
    flags, existing = read_publication(conn, name)
    wanted = {f"{schema}.{t}": list(c) for t, c in lists.items()}
    obj = f"publication {name}"
    if flags is None:
        if report.dry_run:
            report.action(obj, "would_create")
            return
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = {})").format(
                sql.Identifier(name), _table_list(schema, lists), sql.Literal(PUBLISH)
            )
        )
        report.action(obj, "created", f"{len(lists)} tables with column lists")
        return
    if flags["all"]:
        report.check(
            obj,
            False,
            f"publication {name} is FOR ALL TABLES: it would publish excluded columns and the "
            f"control schema; DROP PUBLICATION {name} and re-run cutover init",
        )
        return
    diffs = _publication_diff(existing, wanted)
    options_ok = all(flags[k] for k in ("insert", "update", "delete", "truncate"))
    if not diffs and options_ok:
        report.action(obj, "exists")
        return
    if report.dry_run:
        report.action(obj, "would_alter", "; ".join(diffs))
        return
    with conn.transaction():
        if diffs:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
                    sql.Identifier(name), _table_list(schema, lists)
                )
            )
        if not options_ok:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET (publish = {})").format(
                    sql.Identifier(name), sql.Literal(PUBLISH)
                )
            )
            diffs.append(f"publish = '{PUBLISH}'")
    report.action(obj, "altered", "; ".join(diffs))
    report.warnings.append(f"publication {name} was altered: {'; '.join(diffs)}")


def _publication_diff(existing: dict[str, list[str]], wanted: dict[str, list[str]]) -> list[str]:
    diffs = []
    for table, cols in sorted(wanted.items()):
        have = existing.get(table)
        if have is None:
            diffs.append(f"add {table}")
        elif sorted(have) != sorted(cols):
            added = sorted(set(cols) - set(have))
            removed = sorted(set(have) - set(cols))
            parts = [f"+{c}" for c in added] + [f"-{c}" for c in removed]
            diffs.append(f"{table} columns {' '.join(parts)}")
    diffs.extend(f"drop {t}" for t in sorted(set(existing) - set(wanted)))
    return diffs


def _ensure_slot(conn: Conn, settings: Settings, report: InitReport) -> None:
    slot_name = settings.source.slot
    obj = f"slot {slot_name}"
    slot = read_slot(conn, slot_name)
    database = str(conn.execute("SELECT current_database()").fetchone()[0])  # type: ignore[index]
    recorded = source_state.read_position(conn, slot_name) if not report.dry_run else None
    if slot is not None:
        if slot["slot_type"] != "logical" or slot["plugin"] != "pgoutput":
            report.check(
                obj,
                False,
                f"slot {slot_name} exists but is a {slot['slot_type']} slot with plugin "
                f"{slot['plugin']!r}; choose another [source] slot or drop it",
            )
            return
        if slot["database"] != database:
            report.check(
                obj,
                False,
                f"slot {slot_name} belongs to database {slot['database']}, not {database}; "
                "choose another [source] slot",
            )
            return
        report.action(obj, "exists", f"confirmed {lsn_to_str(slot['confirmed_flush_lsn'])}")
        if recorded is None and not report.dry_run:
            # An existing slot nobody recorded: adopt its position from now on.
            source_state.reset_position(
                conn, slot_name, settings.source.publication, int(slot["confirmed_flush_lsn"])
            )
            report.action(f"producer_state {slot_name}", "created", "adopted the slot position")
        return
    if report.dry_run:
        report.action(obj, "would_create")
        return
    # Waits for transactions running now to finish (the slot needs a consistent start point).
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot_name,))
    slot = read_slot(conn, slot_name)
    assert slot is not None
    position = int(slot["confirmed_flush_lsn"])
    if recorded is not None and recorded < position:
        # We delivered up to `recorded` from an earlier slot of this name; the new slot starts
        # later, so whatever was committed in between is in no topic.
        report.warnings.append(
            f"slot {slot_name} was missing and has been created at {lsn_to_str(position)}, but "
            f"the producer had delivered only up to {lsn_to_str(recorded)}: changes in between "
            "were not captured. `cutover produce` will refuse to start until you re-snapshot "
            "(cutover init --resnapshot)"
        )
        report.action(obj, "created", f"at {lsn_to_str(position)} (after a lost slot)")
        return
    source_state.reset_position(conn, slot_name, settings.source.publication, position)
    report.action(obj, "created", f"at {lsn_to_str(position)}")


def resnapshot(conn: Conn, settings: Settings, report: InitReport) -> None:
    """Accept the slot's current position and reload every table (after a lost slot)."""
    slot = read_slot(conn, settings.source.slot)
    if slot is None:
        raise UsageError(f"slot {settings.source.slot} does not exist: run cutover init first")
    position = int(slot["confirmed_flush_lsn"])
    source_state.reset_position(conn, settings.source.slot, settings.source.publication, position)
    source_state.reset_snapshots(conn, settings.source.slot)
    report.action(
        f"producer_state {settings.source.slot}",
        "altered",
        f"position reset to {lsn_to_str(position)}; every table will be snapshotted again",
    )


def check_target_resettable(settings: Settings, mapping: MappingSpec) -> list[str]:
    """Why the commerce tables cannot be emptied for a re-snapshot now (empty: they can).

    A re-snapshot rebuilds commerce from legacy: rows deleted in legacy while the slot was lost
    are in no event, so upserting the snapshot over the old content would keep them forever.
    That is only safe when no domain serves reads from commerce and the consumers have applied
    everything already in Kafka (an older event applied after the reset could bring back a row
    legacy deleted)."""
    from cutover.kafka import fetch_watermarks, kafka_consumer

    control = sql.Identifier(settings.target.control_schema, "domain_state")
    offsets = sql.Identifier(settings.target.control_schema, "consumer_offsets")
    problems: list[str] = []
    with _connect(settings.target.dsn, "target") as conn:
        try:
            if conn.execute("SELECT to_regclass(%s)", (control.as_string(conn),)).fetchone() != (
                None,
            ):
                switched = conn.execute(
                    sql.SQL(
                        "SELECT domain, state FROM {} WHERE state <> 'replicating' ORDER BY domain"
                    ).format(control)
                ).fetchall()
                problems += [
                    f"domain {d} is {state}: roll it back first (cutover rollback {d})"
                    for d, state in switched
                ]
            stored: dict[tuple[str, int], int] = {}
            if conn.execute("SELECT to_regclass(%s)", (offsets.as_string(conn),)).fetchone() != (
                None,
            ):
                # Whatever group applied into this database (a custom --group-id included):
                # the furthest stored position per partition.
                for topic, partition, next_offset in conn.execute(
                    sql.SQL(
                        "SELECT topic, kafka_partition, max(next_offset) FROM {}"
                        " GROUP BY topic, kafka_partition"
                    ).format(offsets)
                ):
                    stored[(topic, int(partition))] = int(next_offset)
        except psycopg.Error as exc:
            raise pg.translate(
                exc, "checking the commerce database for a re-snapshot", "target"
            ) from None
    consumer = kafka_consumer(settings)
    try:
        for domain in mapping.domains:
            topic = settings.kafka.topic(domain)
            for partition, (_low, high) in fetch_watermarks(consumer, topic).items():
                behind = high - stored.get((topic, partition), 0)
                if high > 0 and behind > 0:
                    problems.append(
                        f"{topic}[{partition}]: the consumers have {behind} messages left to "
                        "apply; let `cutover apply` drain the topics first"
                    )
    finally:
        consumer.close()
    return problems


def reset_target(settings: Settings, mapping: MappingSpec, report: InitReport) -> None:
    """Empty the commerce tables of the mapping (and their tombstones) for a re-snapshot."""
    tables = [
        sql.Identifier(mapping.target_schema, t.target_table) for t in mapping.tables.values()
    ]
    tombstones = sql.Identifier(settings.target.control_schema, "tombstones")
    with _connect(settings.target.dsn, "target") as conn:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(tables)))
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE target_table = ANY(%s)").format(tombstones),
                    ([t.target_table for t in mapping.tables.values()],),
                )
        except psycopg.Error as exc:
            raise pg.translate(
                exc, "emptying the commerce tables for a re-snapshot", "target"
            ) from None
    report.action(
        f"commerce tables of {mapping.target_schema}",
        "altered",
        "emptied: the re-snapshot reloads them from legacy",
    )


def _ensure_target(
    settings: Settings, mapping: MappingSpec, target_ddl: Path | None, report: InitReport
) -> None:
    with _connect(settings.target.dsn, "target") as conn:
        try:
            have_schema = conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (mapping.target_schema,)
            ).fetchone()
            if have_schema is None:
                if target_ddl is None:
                    report.warnings.append(
                        f"target schema {mapping.target_schema} is missing in the commerce "
                        "database: load its DDL (cutover init --target-ddl FILE)"
                    )
                elif report.dry_run:
                    report.action(f"target schema {mapping.target_schema}", "would_create")
                else:
                    conn.execute(target_ddl.read_text(encoding="utf-8").encode())
                    report.action(
                        f"target schema {mapping.target_schema}", "created", f"from {target_ddl}"
                    )
            else:
                report.action(f"target schema {mapping.target_schema}", "exists")
            missing = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'cutover'"
                " AND tablename IN ('consumer_offsets', 'tombstones', 'dead_letters')"
            ).fetchone()
            assert missing is not None
            if int(missing[0]) == 3:
                report.action("commerce control tables", "exists")
            elif report.dry_run:
                report.action("commerce control tables", "would_create")
            else:
                conn.execute(CONTROL_SQL.read_text(encoding="utf-8").encode())
                report.action("commerce control tables", "created", "cutover/control.sql")
        except psycopg.Error as exc:
            raise pg.translate(exc, "preparing the commerce database", "target") from None
        except OSError as exc:
            raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None


def run_init(
    settings: Settings,
    *,
    target_ddl: Path | None = None,
    dry_run: bool = False,
    resnapshot_all: bool = False,
    skip_target: bool = False,
) -> InitReport:
    """Preflight, then create what is missing. Raises CheckFailed listing every problem."""
    mapping = load_mapping(settings.mapping_path)
    check_column_types(mapping, settings.source.dsn, None if skip_target else settings.target.dsn)
    check_round_trip(mapping)
    report = InitReport(dry_run=dry_run)
    if target_ddl is not None and not target_ddl.is_file():
        raise UsageError(f"--target-ddl {target_ddl}: no such file")
    if resnapshot_all and not dry_run and not skip_target:
        # Checked before anything changes: a refusal leaves legacy and commerce as they were.
        refusals = check_target_resettable(settings, mapping)
        if refusals:
            raise CheckFailed(
                "re-snapshot refused; nothing was changed:\n  - " + "\n  - ".join(refusals)
            )
    with _connect(settings.source.dsn, "source") as conn:
        try:
            preflight_server(conn, settings, report)
            tables = read_tables(conn, mapping.source_schema, list(mapping.tables))
            lists = preflight_tables(mapping, tables, report)
            if report.problems:
                raise CheckFailed(
                    "preflight failed; nothing was changed:\n  - " + "\n  - ".join(report.problems)
                )
            schema = mapping.source_schema
            if dry_run:
                missing = source_state.missing_tables(conn)
                report.action("legacy control tables", "would_create" if missing else "exists")
            else:
                created = source_state.ensure_schema(conn)
                report.action(
                    "legacy control tables (schema cutover)", "created" if created else "exists"
                )
            for name, tm in mapping.tables.items():
                _ensure_replica_identity(conn, schema, tables[name], tm, report)
            _ensure_publication(conn, settings.source.publication, schema, lists, report)
            if report.problems:
                raise CheckFailed("\n".join(report.problems))
            _ensure_slot(conn, settings, report)
            if report.problems:
                raise CheckFailed("\n".join(report.problems))
            if resnapshot_all and not dry_run:
                resnapshot(conn, settings, report)
        except psycopg.Error as exc:
            raise pg.translate(exc, "init", "source") from None
    specs = kafka.topic_specs(settings.kafka, list(mapping.domains))
    if dry_run:
        report.action("kafka topics", "not_checked", ", ".join(s.name for s in specs))
    else:
        for topic, entry in kafka.ensure_topics(settings.kafka, specs).items():
            report.action(f"topic {topic}", entry["status"], entry.get("warning", ""))
            if "warning" in entry:
                report.warnings.append(f"topic {topic} {entry['warning']}")
    if not skip_target:
        _ensure_target(settings, mapping, target_ddl, report)
        if resnapshot_all and not dry_run:
            reset_target(settings, mapping, report)
    return report
