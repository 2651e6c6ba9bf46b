"""The evidence of the read-switch gates, read from both databases and Kafka (I/O).

The gates themselves (:mod:`control.gates`) are pure: they judge what this module reads. Each
probe is isolated: one that fails becomes evidence with its own ``error`` (which fails its gate,
closed) instead of aborting the others. Errors are printed, so DSNs are redacted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import psycopg
from psycopg import sql

from control.gates import (
    CaptureEvidence,
    DeadLetterEvidence,
    Evidence,
    HeartbeatEvidence,
    LagEvidence,
    SlotEvidence,
    VerifyEvidence,
    apply_lag,
)
from cutover import capture
from cutover.config import Settings
from cutover.control_store import LEGACY_SCHEMA, ControlStore, dead_letters, offsets
from cutover.control_store import producer as producer_state
from cutover.errors import CutoverError, DatabaseError, redact_dsn
from cutover.kafka import fetch_watermarks, kafka_consumer
from cutover.mapping import load_mapping

Conn = psycopg.Connection[Any]

#: Schema of the producer's control tables in the LEGACY database.
LEGACY_CONTROL_SCHEMA = LEGACY_SCHEMA


def probe_error(exc: BaseException) -> str:
    """The first line of a failed probe's error, as evidence (DSNs redacted)."""
    # Evidence is printed: a libpq parse error may echo a piece of a DSN password.
    text = redact_dsn(str(getattr(exc, "message", None) or exc).strip())
    return text.splitlines()[0] if text else type(exc).__name__


def verify_evidence(conn: Conn, control_schema: str, domain: str) -> VerifyEvidence:
    try:
        row = conn.execute(
            sql.SQL(
                "SELECT run_id, NOT (%s = ANY(failed_domains)), "
                "EXTRACT(EPOCH FROM now() - finished_at)::float8, finished_at "
                "FROM {} WHERE status = 'finished' AND %s = ANY(domains) "
                "ORDER BY finished_at DESC, run_id DESC LIMIT 1"
            ).format(sql.Identifier(control_schema, "verify_runs")),
            [domain, domain],
        ).fetchone()
    except psycopg.Error as exc:
        return VerifyEvidence(error=probe_error(exc))
    if row is None:
        return VerifyEvidence()
    return VerifyEvidence(
        run_id=int(row[0]), passed=bool(row[1]), age_s=float(row[2]), finished_at=row[3].isoformat()
    )


def stored_lag(store: ControlStore, group_id: str, topic: str, consumer: Any) -> LagEvidence:
    """Events of ``topic`` not yet applied: its high watermarks against the offsets ``group_id``
    stored in ``store`` (none stored: everything is lag)."""
    try:
        stored: dict[int, int] = {}
        if store.exists(offsets.TABLE):
            rows = offsets.read_group(store, group_id, topic)
            stored = {o.partition: o.next_offset for o in rows}
        marks = fetch_watermarks(consumer, topic)
    except (psycopg.Error, CutoverError) as exc:
        return LagEvidence(topic=topic, error=probe_error(exc))
    per = apply_lag(marks, stored)
    return LagEvidence(topic=topic, partitions=per, total=sum(per.values()))


def lag_evidence(settings: Settings, conn: Conn, domain: str, consumer: Any) -> LagEvidence:
    store = ControlStore(conn, settings.target.control_schema, "target")
    return stored_lag(store, settings.apply.group_id, settings.kafka.topic(domain), consumer)


def dead_letter_evidence(settings: Settings, conn: Conn, domain: str) -> DeadLetterEvidence:
    store = ControlStore(conn, settings.target.control_schema, "target")
    try:
        if not store.exists(dead_letters.TABLE):
            # Fail closed: without the table nothing says no letter is open (the consumer
            # creates it on start; a missing one means the pipeline is not what we think).
            return DeadLetterEvidence(
                error=f"no {store.schema}.dead_letters table: has `cutover consume` ever run?"
            )
        count, ids = dead_letters.open_of_domain(store, domain, settings.kafka.topic(domain))
    except (psycopg.Error, DatabaseError) as exc:
        return DeadLetterEvidence(error=probe_error(exc))
    return DeadLetterEvidence(open=count, sample_ids=ids)


def with_producer_letters(dl: DeadLetterEvidence, legacy: Conn, domain: str) -> DeadLetterEvidence:
    """Add the domain's open producer dead letters (rows withheld by the producer)."""
    store = ControlStore(legacy, LEGACY_CONTROL_SCHEMA, "source")
    try:
        if not store.exists(dead_letters.PRODUCER_TABLE):
            return dl  # no producer ran since `cutover init` created it: none withheld
        count, ids = dead_letters.producer_open_of_domain(store, domain)
    except (psycopg.Error, DatabaseError) as exc:
        return replace(dl, error=probe_error(exc))
    return replace(dl, producer_open=count, producer_ids=ids)


def heartbeat_evidence(settings: Settings, legacy: Conn) -> HeartbeatEvidence:
    store = ControlStore(legacy, LEGACY_CONTROL_SCHEMA, "source")
    try:
        if not store.exists("producer_state"):
            return HeartbeatEvidence(error="the producer never ran (no cutover.producer_state)")
        beat = producer_state.read_heartbeat(store, settings.source.slot)
    except (psycopg.Error, DatabaseError) as exc:
        return HeartbeatEvidence(error=probe_error(exc))
    if beat is None or beat.age_s is None:
        return HeartbeatEvidence(
            error=f"no heartbeat recorded for slot {settings.source.slot} in cutover.producer_state"
        )
    return HeartbeatEvidence(age_s=max(0.0, beat.age_s), producer=beat.producer)


def slot_evidence(settings: Settings, legacy: Conn) -> SlotEvidence:
    slot = settings.source.slot
    try:
        row = legacy.execute(
            "SELECT wal_status, active FROM pg_replication_slots "
            "WHERE slot_name = %s AND database = current_database()",
            [slot],
        ).fetchone()
    except psycopg.Error as exc:
        return SlotEvidence(slot=slot, error=probe_error(exc))
    if row is None:
        return SlotEvidence(slot=slot, exists=False)
    return SlotEvidence(slot=slot, exists=True, wal_status=row[0], active=bool(row[1]))


def capture_evidence(settings: Settings, legacy: Conn, domain: str) -> CaptureEvidence:
    try:
        mapping = load_mapping(settings.mapping_path)
        found = capture.blocks(legacy, settings.source.publication, mapping, domain)
    except (CutoverError, psycopg.Error) as exc:  # a failed probe fails its gate only
        return CaptureEvidence(error=probe_error(exc))
    return CaptureEvidence(blocks=tuple(found))


def _connect(dsn: str) -> Conn:
    conn = psycopg.connect(
        dsn, autocommit=True, connect_timeout=5, application_name="cutover-gates"
    )
    return conn


def collect(settings: Settings, domain: str, *, consumer: Any | None = None) -> Evidence:
    """Gather the evidence of every gate of ``domain`` (each probe fails on its own)."""
    own_consumer = consumer is None
    failed_legacy: str | None = None
    failed_commerce: str | None = None
    legacy: Conn | None = None
    commerce: Conn | None = None
    try:
        try:
            legacy = _connect(settings.source.dsn)
        except psycopg.Error as exc:
            failed_legacy = f"legacy database unreachable: {probe_error(exc)}"
        try:
            commerce = _connect(settings.target.dsn)
        except psycopg.Error as exc:
            failed_commerce = f"commerce database unreachable: {probe_error(exc)}"
        if consumer is None:
            consumer = kafka_consumer(settings)
        schema = settings.target.control_schema
        if commerce is not None:
            ver = verify_evidence(commerce, schema, domain)
            lag = lag_evidence(settings, commerce, domain, consumer)
            dls = dead_letter_evidence(settings, commerce, domain)
        else:
            ver = VerifyEvidence(error=failed_commerce)
            lag = LagEvidence(topic=settings.kafka.topic(domain), error=failed_commerce)
            dls = DeadLetterEvidence(error=failed_commerce)
        if legacy is not None:
            hb = heartbeat_evidence(settings, legacy)
            slot = slot_evidence(settings, legacy)
            cap = capture_evidence(settings, legacy, domain)
            dls = with_producer_letters(dls, legacy, domain)
        else:
            hb = HeartbeatEvidence(error=failed_legacy)
            slot = SlotEvidence(slot=settings.source.slot, error=failed_legacy)
            cap = CaptureEvidence(error=failed_legacy)
        return Evidence(domain, ver, lag, dls, hb, slot, cap)
    finally:
        for conn in (legacy, commerce):
            if conn is not None:
                conn.close()
        if own_consumer and consumer is not None:
            consumer.close()
