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

1. legacy control tables (schema ``cutover``, :mod:`cutover.control_store`);
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
6. the commerce control tables (``cutover/control_store/schema.sql``, in ``[target]
   control_schema``) and, with ``--target-ddl FILE``, the
   commerce schema when it is missing.

All SQL is composed with :mod:`psycopg.sql` (identifiers quoted, never string formatting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import psycopg
from psycopg import sql

from cutover import pg, topics
from cutover.config import Settings
from cutover.control_store import (
    CONSUMER_TABLES,
    LEGACY_SCHEMA,
    PRODUCER_TABLES,
    REPLICATING,
    ControlStore,
    load_states,
    offsets,
)
from cutover.control_store import producer as producer_state
from cutover.errors import CheckFailed, ConfigError, UsageError
from cutover.mapping import (
    MappingSpec,
    TableMapping,
    check_column_types,
    check_round_trip,
    load_mapping,
)
from producers import row_letters
from producers.init_checks import (
    Conn,
    InitReport,
    TableInfo,
    check_replication,
    identity_columns,
    preflight_server,
    preflight_tables,
    read_publication,
    read_slot,
    read_tables,
    ri_index_name,
)
from producers.pgoutput import lsn_to_str
from producers.slot_safety import truncate_stops_ahead

PUBLISH: Final = "insert, update, delete, truncate"


def _connect(dsn: str, side: str) -> Conn:
    return pg.connect(dsn, side=side, application_name="cutover init", doing="cannot connect")


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


def _ensure_slot(
    conn: Conn, settings: Settings, report: InitReport, store: ControlStore | None = None
) -> None:
    """``settings.source``'s slot, and its position in ``store`` (default: legacy's)."""
    slot_name = settings.source.slot
    obj = f"slot {slot_name}"
    slot = read_slot(conn, slot_name)
    database = str(conn.execute("SELECT current_database()").fetchone()[0])  # type: ignore[index]
    store = store or ControlStore(conn, LEGACY_SCHEMA, "source")
    recorded = producer_state.read_position(store, slot_name) if not report.dry_run else None
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
            producer_state.reset_position(
                store, slot_name, settings.source.publication, int(slot["confirmed_flush_lsn"])
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
    producer_state.reset_position(store, slot_name, settings.source.publication, position)
    report.action(obj, "created", f"at {lsn_to_str(position)}")


def resnapshot(conn: Conn, settings: Settings, report: InitReport) -> None:
    """Accept the slot's current position and reload every table (after a lost slot)."""
    slot = read_slot(conn, settings.source.slot)
    if slot is None:
        raise UsageError(f"slot {settings.source.slot} does not exist: run cutover init first")
    position = int(slot["confirmed_flush_lsn"])
    store = ControlStore(conn, LEGACY_SCHEMA, "source")
    producer_state.reset_position(
        store, settings.source.slot, settings.source.publication, position
    )
    producer_state.reset_snapshots(store, settings.source.slot)
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

    problems: list[str] = []
    with _connect(settings.target.dsn, "target") as conn:
        store = ControlStore(conn, settings.target.control_schema, "target")
        if store.exists("domain_state"):
            problems += [
                f"domain {d} is {st.state}: roll it back first (cutover rollback {d})"
                for d, st in load_states(conn, store.schema).items()
                if st.state != REPLICATING
            ]
        # Whatever group applied into this database (a custom --group-id included): the
        # furthest stored position per partition.
        stored = offsets.furthest(store) if store.exists("consumer_offsets") else {}
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
            store = ControlStore(conn, settings.target.control_schema, "target")
            if not store.missing(CONSUMER_TABLES):
                report.action("commerce control tables", "exists")
            elif report.dry_run:
                report.action("commerce control tables", "would_create")
            else:
                store.ensure("consumer")
                report.action(
                    "commerce control tables", "created", "cutover/control_store/schema.sql"
                )
        except psycopg.Error as exc:
            raise pg.translate(exc, "preparing the commerce database", "target") from None
        except OSError as exc:
            raise UsageError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _ensure_legacy_control(conn: Conn, report: InitReport) -> None:
    """The producer's control tables, next to the slot (legacy, schema cutover)."""
    store = ControlStore(conn, LEGACY_SCHEMA, "source")
    missing = store.missing(PRODUCER_TABLES)
    if report.dry_run:
        report.action("legacy control tables", "would_create" if missing else "exists")
        return
    if missing:
        store.ensure("producer")
    report.action("legacy control tables (schema cutover)", "created" if missing else "exists")


def _report_message_size(settings: Settings, report: InitReport) -> None:
    """One size limit for topics and producer; the largest row event it lets through."""
    problems = topics.size_problems(settings.kafka)
    if problems:
        raise ConfigError("\n".join(problems))
    limit = settings.kafka.max_message_bytes
    report.action(
        "message size limit",
        "set",
        f"topics max.message.bytes = producer message.max.bytes = {limit}; the largest row "
        f"event is {limit - row_letters.SIZE_MARGIN} bytes encoded, a larger row becomes a "
        "producer dead letter ([kafka] max_message_bytes)",
    )


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
    if not dry_run:
        # Before anything changes: topics with more replicas than brokers cannot be created.
        check_replication(settings.kafka)
    if resnapshot_all and not dry_run and not skip_target:
        # Checked before anything changes: a refusal leaves legacy and commerce as they were.
        refusals = check_target_resettable(settings, mapping)
        if refusals:
            raise CheckFailed(
                "re-snapshot refused; nothing was changed:\n  - " + "\n  - ".join(refusals)
            )
    with _connect(settings.source.dsn, "source") as conn:
        if resnapshot_all and not dry_run:
            # Never a trap: a reload while the change that stopped the producer is still ahead
            # would be followed by the same stop (issue 12, item 4).
            ahead = truncate_stops_ahead(
                conn, settings.source.slot, settings.source.publication, mapping
            )
            if ahead:
                raise CheckFailed(
                    "re-snapshot refused; nothing was changed:\n  - " + "\n  - ".join(ahead)
                )
        try:
            preflight_server(conn, settings, report)
            tables = read_tables(conn, mapping.source_schema, list(mapping.tables))
            lists = preflight_tables(mapping, tables, report)
            if report.problems:
                raise CheckFailed(
                    "preflight failed; nothing was changed:\n  - " + "\n  - ".join(report.problems)
                )
            schema = mapping.source_schema
            _ensure_legacy_control(conn, report)
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
    specs = topics.topic_specs(settings.kafka, list(mapping.domains))
    _report_message_size(settings, report)
    if dry_run:
        report.action("kafka topics", "not_checked", ", ".join(s.name for s in specs))
    else:
        for topic, entry in topics.ensure_topics(settings.kafka, specs).items():
            report.action(f"topic {topic}", entry["status"], entry.get("warning", ""))
            if "warning" in entry:
                report.warnings.append(f"topic {topic} {entry['warning']}")
    if not skip_target:
        _ensure_target(settings, mapping, target_ddl, report)
        if resnapshot_all and not dry_run:
            reset_target(settings, mapping, report)
    return report
