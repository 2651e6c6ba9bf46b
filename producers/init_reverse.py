"""``cutover init --reverse``: prepare the reverse path (commerce → legacy) before any fence.

The write cutover (docs/CUTOVER.md) fences legacy and opens commerce in a window that must stay
short, so everything the reverse pipeline needs is created here, ahead of it, idempotently
(each object reported ``created`` / ``exists`` / ``altered``, as forward init does):

* preflight on commerce: PostgreSQL >= 15, ``wal_level = logical``, a free replication slot, the
  REPLICATION privilege (the forward checks, run against commerce), and for every mapped
  commerce table: it exists, its primary key is the mapping's target key, its replica identity
  is the primary key or an index (DELETEs must carry the key; FULL would not fit a column list);
* commerce: the producer's control tables in ``[target] control_schema``; the publication
  ``[reverse] publication`` over every mapped commerce table of every domain, with column lists
  = the target key and the mapped columns (the inverse reads nothing else; the bookkeeping
  columns ``_src_lsn``/``_src_seq`` are never published); the pgoutput slot ``[reverse] slot``
  and its recorded position;
* Kafka: the topics ``<prefix>.reverse.<domain>`` (same settings as the domain topics);
* legacy: the reverse appliers' tables in ``[reverse] control_schema`` (offsets, dead letters,
  ``row_positions``).

Re-running it after ``complete`` removed a domain's tables from the publication puts them back.
"""

from __future__ import annotations

import dataclasses

import psycopg

from cutover import pg, topics
from cutover.config import Settings
from cutover.control_store import (
    CONSUMER_TABLES,
    PRODUCER_TABLES,
    REVERSE_TABLES,
    ControlStore,
    Role,
)
from cutover.direction import reverse, reverse_columns
from cutover.errors import CheckFailed
from cutover.mapping import MappingSpec, load_mapping
from producers.init import _connect, _ensure_publication, _ensure_slot
from producers.init_checks import Conn, InitReport, TableInfo, preflight_server, read_tables

#: Prefix of every check and object of the reverse path in the init report.
PREFIX = "reverse: "


def _table_problems(tm_key: tuple[str, ...], cols: tuple[str, ...], info: TableInfo) -> list[str]:
    where = info.name
    problems: list[str] = []
    if info.primary_key != tm_key:
        problems.append(
            f"commerce table {where} has primary key {list(info.primary_key)}, the mapping's "
            f"target key is {list(tm_key)}: make them agree"
        )
    missing = [c for c in cols if c not in info.columns]
    if missing:
        problems.append(f"commerce table {where} lacks the mapped columns {missing}")
    if info.replica_identity in ("n", "f"):
        problems.append(
            f"commerce table {where} has REPLICA IDENTITY "
            f"{'NOTHING' if info.replica_identity == 'n' else 'FULL'}: deletes must carry the "
            f"key and a column list must cover the identity; ALTER TABLE {where} REPLICA "
            "IDENTITY DEFAULT"
        )
    return problems


def _commerce_tables(
    conn: Conn, mapping: MappingSpec, report: InitReport
) -> dict[str, tuple[str, ...]]:
    """Check the mapped commerce tables; return the publication column list of each."""
    tables = read_tables(
        conn, mapping.target_schema, [t.target_table for t in mapping.tables.values()]
    )
    lists: dict[str, tuple[str, ...]] = {}
    for tm in mapping.tables.values():
        info = tables.get(tm.target_table)
        cols = reverse_columns(tm)
        problems = (
            [f"commerce table {mapping.target_schema}.{tm.target_table} does not exist"]
            if info is None
            else _table_problems(tm.target_key, cols, info)
        )
        report.check(f"commerce table {tm.target_table}", not problems, "; ".join(problems) or "ok")
        lists[tm.target_table] = cols
    return lists


def _ensure_tables(
    store: ControlStore, tables: tuple[str, ...], label: str, *roles: Role, report: InitReport
) -> None:
    missing = store.missing(tables)
    if report.dry_run:
        report.action(label, "would_create" if missing else "exists")
        return
    if missing:
        store.ensure(*roles)
    report.action(label, "created" if missing else "exists")


def _prepare_commerce(settings: Settings, mapping: MappingSpec, report: InitReport) -> None:
    direction = reverse(settings)
    capture = direction.settings_for_capture(settings)
    with _connect(settings.target.dsn, "target") as conn:
        try:
            preflight_server(conn, capture, report)
            lists = _commerce_tables(conn, mapping, report)
            if report.problems:
                raise CheckFailed(
                    "reverse preflight failed (commerce); nothing was changed:\n  - "
                    + "\n  - ".join(report.problems)
                )
            store = ControlStore(conn, direction.producer_schema, "target")
            _ensure_tables(
                store,
                PRODUCER_TABLES,
                f"commerce producer tables (schema {store.schema})",
                "producer",
                report=report,
            )
            _ensure_publication(
                conn, capture.source.publication, mapping.target_schema, lists, report
            )
            if report.problems:
                raise CheckFailed("\n".join(report.problems))
            _ensure_slot(conn, capture, report, store)
            if report.problems:
                raise CheckFailed("\n".join(report.problems))
        except psycopg.Error as exc:
            raise pg.translate(exc, "init --reverse", "target") from None


def _prepare_legacy(settings: Settings, report: InitReport) -> None:
    schema = settings.reverse.control_schema
    with _connect(settings.source.dsn, "source") as conn:
        try:
            _ensure_tables(
                ControlStore(conn, schema, "source"),
                (*CONSUMER_TABLES, *REVERSE_TABLES),
                f"legacy reverse applier tables (schema {schema})",
                "consumer",
                "reverse",
                report=report,
            )
        except psycopg.Error as exc:
            raise pg.translate(exc, "init --reverse", "source") from None


def _prepare_topics(settings: Settings, mapping: MappingSpec, report: InitReport) -> None:
    cfg = settings.kafka
    forward_specs = {s.name: s for s in topics.topic_specs(cfg, list(mapping.domains))}
    specs = [
        dataclasses.replace(forward_specs[cfg.topic(d)], name=cfg.reverse_topic(d))
        for d in mapping.domains
    ]
    if report.dry_run:
        report.action("kafka topics", "not_checked", ", ".join(s.name for s in specs))
        return
    for topic, entry in topics.ensure_topics(cfg, specs).items():
        report.action(f"topic {topic}", entry["status"], entry.get("warning", ""))
        if "warning" in entry:
            report.warnings.append(f"topic {topic} {entry['warning']}")


def prepare_reverse(settings: Settings, report: InitReport) -> None:
    """Preflight commerce, then create the reverse path's objects; entries go to ``report``
    with the :data:`PREFIX`. Raises CheckFailed (nothing changed) when a check fails."""
    mapping = load_mapping(settings.mapping_path)
    sub = InitReport(dry_run=report.dry_run)
    try:
        _prepare_commerce(settings, mapping, sub)
        _prepare_topics(settings, mapping, sub)
        _prepare_legacy(settings, sub)
    finally:
        report.checks.extend({**c, "check": PREFIX + c["check"]} for c in sub.checks)
        report.actions.extend({**a, "object": PREFIX + a["object"]} for a in sub.actions)
        report.warnings.extend(PREFIX + w for w in sub.warnings)
