"""`cutover replay play`: a replay file into a topic or a sandbox commerce database."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaException, Producer
from structlog.typing import FilteringBoundLogger

from consumers.dlq import DeadLetter
from consumers.events import Change, from_record
from consumers.replay.avro import REPLAY_GROUP
from consumers.replay.filters import Filters, Pacer, ProgressFn, Rate, table_of_schema
from consumers.replay.reader import Recorded, ReplayFile
from consumers.replay.record import consumer_conf, schemas_topic_for, topic_partitions
from consumers.schemas import kafka_error
from consumers.sink import Sink, translate
from cutover.config import KafkaSettings, Settings
from cutover.errors import (
    CutoverError,
    DatabaseError,
    DecodeError,
    KafkaError,
    UsageError,
    redact_dsn,
)
from cutover.logging import get_logger
from cutover.mapping import load_mapping


def log() -> FilteringBoundLogger:
    # Looked up at each use: a logger bound before cutover.logging.configure() keeps defaults.
    return get_logger(__name__)


@dataclass(slots=True)
class PlaySummary:
    """What ``replay play`` did."""

    source: str
    destination: str
    rate: str
    played: int = 0
    skipped: int = 0
    dead_letters: int = 0
    upserted: int = 0
    deleted: int = 0
    open_units_at_end: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.played / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "destination": self.destination,
            "rate": self.rate,
            "played": self.played,
            "skipped": self.skipped,
            "dead_letters": self.dead_letters,
            "upserted": self.upserted,
            "deleted": self.deleted,
            "open_units_at_end": self.open_units_at_end,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s),
        }


def _selected(replay: ReplayFile, filters: Filters, summary: PlaySummary) -> Iterator[Recorded]:
    """The file's records that pass ``filters`` (``summary.skipped`` counts the others)."""
    store = replay.schema_store() if filters.tables is not None else None
    tables: dict[str | None, tuple[str, str] | None] = {None: None}
    for rec in replay:
        if not filters.position(rec.partition, rec.offset, rec.timestamp_ms):
            summary.skipped += 1
            continue
        if filters.by_content:
            table = None
            if store is not None:
                if rec.fingerprint not in tables:
                    ws = store.get(int(rec.fingerprint, 16)) if rec.fingerprint else None
                    tables[rec.fingerprint] = table_of_schema(ws.name) if ws else None
                table = tables[rec.fingerprint]
            if not filters.content(rec.key, table):
                summary.skipped += 1
                continue
        yield rec


def play_to_topic(
    kafka: KafkaSettings,
    path: Path,
    topic: str,
    filters: Filters,
    rate: Rate,
    *,
    schemas_topic: str | None = None,
    progress: ProgressFn | None = None,
    timeout_s: float = 60.0,
) -> PlaySummary:
    """Re-publish the file's messages to ``topic``: same partition numbers, keys, headers and
    value bytes, in file order (per-partition order kept; idempotent producer)."""
    started = time.monotonic()
    summary = PlaySummary(str(path), topic, rate.describe())
    with ReplayFile(path) as replay:
        needed = [int(p) for p in replay.recording.get("partitions", {})]
        probe = Consumer(consumer_conf(kafka))
        try:
            have = topic_partitions(probe, topic, kafka.bootstrap)
            schemas = schemas_topic or schemas_topic_for(topic, kafka)
            try:
                smeta = probe.list_topics(schemas, timeout=10).topics.get(schemas)
            except KafkaException as exc:
                raise kafka_error(exc, f"reading the metadata of {schemas}") from None
            has_schemas = smeta is not None and smeta.error is None and bool(smeta.partitions)
        finally:
            probe.close()
        if needed and max(needed) >= len(have):
            raise UsageError(
                f"topic {topic} has {len(have)} partitions, the file holds partition "
                f"{max(needed)}: partition numbers are kept, so {topic} needs at least "
                f"{max(needed) + 1}"
            )
        conf: dict[str, Any] = {
            "linger.ms": 20,
            "batch.size": 1 << 20,
            **kafka.producer,
            "bootstrap.servers": kafka.bootstrap,
            # Order per partition survives retries only with idempotence.
            "enable.idempotence": True,
            "acks": "all",
        }
        producer = Producer(conf)
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None and len(failures) < 10:
                failures.append(f"{err.str()} ({err.name()})")

        if has_schemas:
            # What the producer does: every writer schema on the compacted schemas topic, so a
            # consumer of `topic` can decode what we play.
            for fp, text in replay.writer_schemas.items():
                producer.produce(schemas, key=fp.encode(), value=text.encode())
        else:
            log().warning("replay.schemas_not_published", schemas_topic=schemas)
        total = replay.events or 0
        pacer = Pacer(rate)
        produce = producer.produce
        played = 0
        for rec in _selected(replay, filters, summary):
            wait = pacer.delay(played, rec.timestamp_ms)
            if wait > 0:
                producer.poll(0)
                time.sleep(wait)
            kwargs: dict[str, Any] = {
                "value": rec.value,
                "key": rec.key,
                "partition": rec.partition,
                "on_delivery": on_delivery,
            }
            if rec.headers:
                kwargs["headers"] = list(rec.headers)
            while True:
                try:
                    produce(topic, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.05)
                except KafkaException as exc:
                    raise kafka_error(exc, f"producing to {topic}") from None
            played += 1
            if played % 5000 == 0:
                producer.poll(0)
                if failures:
                    break
                if progress is not None:
                    progress(played + summary.skipped, total)
        remaining = producer.flush(timeout_s)
        if failures:
            raise KafkaError(f"messages not delivered to {topic}: {failures[0]}")
        if remaining:
            raise KafkaError(f"{remaining} messages not acknowledged by {topic} in {timeout_s}s")
        summary.played = played
        if progress is not None:
            progress(played + summary.skipped, total)
    summary.seconds = time.monotonic() - started
    log().info("replay.played", **summary.as_json())
    return summary


def play_to_target(
    settings: Settings,
    path: Path,
    dsn: str,
    filters: Filters,
    rate: Rate,
    *,
    batch_events: int | None = None,
    progress: ProgressFn | None = None,
) -> PlaySummary:
    """Apply the file's change events to the commerce database ``dsn`` through the apply path
    of ``cutover apply`` (:class:`consumers.sink.Sink`: mapping, position guards, tombstones).

    Commits happen where no partition is inside a source transaction (per-aggregate atomicity
    as in ``cutover apply``); a long one is applied in sub-batches of one database transaction.
    Poison messages are recorded in ``cutover.dead_letters`` (group ``cutover-replay``), not sent
    to a topic. Offsets are not stored: a sandbox has no consumer to resume.
    """
    started = time.monotonic()
    summary = PlaySummary(str(path), f"database {redact_dsn(dsn)}", rate.describe())
    batch_max = batch_events or settings.apply.batch_max_events
    if batch_max <= 0:
        raise UsageError("--batch-events must be positive")
    mapping = load_mapping(settings.mapping_path)
    control = settings.target.control_schema
    domain_of = {settings.kafka.topic(d): d for d in mapping.domains}
    with ReplayFile(path) as replay:
        store = replay.schema_store()
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10,
                                   application_name="cutover-replay")  # fmt: skip
        except psycopg.Error as exc:
            raise translate(exc, "connecting to the sandbox") from None
        with conn:
            sink = Sink(conn, mapping, control)
            _check_sandbox(sink, control, mapping.target_schema)
            total = replay.events or 0
            pacer = Pacer(rate)
            batch: list[Change] = []
            refs: list[Recorded] = []
            letters: list[DeadLetter] = []
            open_parts: set[tuple[str, int]] = set()
            in_tx = False

            def flush(commit: bool) -> None:
                nonlocal in_tx
                if not batch and not letters and not (commit and in_tx):
                    return
                if not in_tx:
                    sink.begin()
                    in_tx = True
                stats, failures = sink.apply(batch)
                summary.upserted += stats.upserted
                summary.deleted += stats.deleted
                for i, error in failures:
                    rec = refs[i]
                    letters.append(_letter(rec, error, domain_of, batch[i].table))
                if letters:
                    sink.record_dead_letters([x.db_row(REPLAY_GROUP) for x in letters])
                    summary.dead_letters += len(letters)
                batch.clear()
                refs.clear()
                letters.clear()
                if commit:
                    sink.commit()
                    in_tx = False

            try:
                for rec in _selected(replay, filters, summary):
                    wait = pacer.delay(summary.played, rec.timestamp_ms)
                    if wait > 0:
                        flush(commit=not open_parts)  # show progress while waiting
                        time.sleep(wait)
                    tp = (rec.topic, rec.partition)
                    summary.played += 1
                    try:
                        if rec.value is None:
                            raise DecodeError("message has no value (null)")
                        ws, value = store.decode(rec.value)
                        event = from_record(ws.name, value)
                    except DecodeError as exc:
                        # Like closed_prefix: an undecodable message closes only at a boundary.
                        letters.append(_letter(rec, exc, domain_of, None))
                        continue
                    if event.closes:
                        open_parts.discard(tp)
                    else:
                        open_parts.add(tp)
                    if isinstance(event, Change):
                        batch.append(event)
                        refs.append(rec)
                    if len(batch) >= batch_max:
                        flush(commit=not open_parts)
                        if progress is not None:
                            progress(summary.played + summary.skipped, total)
                summary.open_units_at_end = len(open_parts)
                if open_parts:
                    log().warning(
                        "replay.open_units_at_end",
                        partitions=sorted(f"{t}[{p}]" for t, p in open_parts),
                    )
                flush(commit=True)
            except BaseException:
                sink.rollback()
                raise
    if progress is not None:
        progress(summary.played + summary.skipped, total)
    summary.seconds = time.monotonic() - started
    log().info("replay.played", **summary.as_json())
    return summary


def _check_sandbox(sink: Sink, control: str, target_schema: str) -> None:
    for name in (f"{control}.tombstones", f"{control}.dead_letters"):
        row = sink.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        if row is None or row[0] is None:
            raise DatabaseError(
                f"the sandbox has no control table {name}: run `cutover init` against it "
                "(or load cutover/control.sql) first",
                side="target",
            )
    row = sink.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (target_schema,)).fetchone()
    if row is None:
        raise DatabaseError(
            f"the sandbox has no schema {target_schema}: load the commerce DDL first "
            "(e.g. `cutover init --target-ddl examples/shop/commerce.sql`)",
            side="target",
        )


def _letter(
    rec: Recorded, error: CutoverError, domain_of: Mapping[str, str], table: str | None
) -> DeadLetter:
    return DeadLetter(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key,
        value=rec.value,
        error=error,
        domain=domain_of.get(rec.topic),
        source_table=table,
    )
