-- kafka-cutover control tables in the COMMERCE database (schema "cutover", created by
-- `cutover init`). Idempotent. The apply consumers write them in the same transaction as the
-- rows they apply; the cutover commands read them.

CREATE SCHEMA IF NOT EXISTS cutover;

-- Consumed positions, stored with the rows (exactly-once effect): on partition assignment a
-- consumer seeks to next_offset. Kafka's committed offsets are only a monitoring hint.
CREATE TABLE IF NOT EXISTS cutover.consumer_offsets (
    group_id          text        NOT NULL,
    topic             text        NOT NULL,
    kafka_partition   int         NOT NULL,
    next_offset       bigint      NOT NULL,
    last_source_lsn   bigint,               -- commit LSN of the last change applied
    last_source_ts_ms bigint,               -- source commit time of the last change applied
    last_heartbeat_ms bigint,               -- producer time of the last heartbeat passed
    applied_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, kafka_partition)
);

-- A deleted commerce row leaves a tombstone with the position that deleted it, so an older
-- event (a replay, a late snapshot row) can never bring it back.
CREATE TABLE IF NOT EXISTS cutover.tombstones (
    target_table text   NOT NULL,
    row_key      text   NOT NULL,           -- the target key values, JSON array text
    src_lsn      bigint NOT NULL,
    src_seq      bigint NOT NULL,
    PRIMARY KEY (target_table, row_key)
);

-- Every poison message, also sent to the dead-letter topic. status: open -> retried/resolved.
CREATE TABLE IF NOT EXISTS cutover.dead_letters (
    id               bigserial   PRIMARY KEY,
    group_id         text        NOT NULL,
    domain           text,
    topic            text        NOT NULL,
    kafka_partition  int         NOT NULL,
    kafka_offset     bigint      NOT NULL,
    message_key      bytea,
    payload          bytea,
    error_class      text        NOT NULL,
    error_message    text        NOT NULL,
    source_table     text,
    status           text        NOT NULL DEFAULT 'open'
                     CHECK (status IN ('open', 'retried', 'resolved')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz,
    UNIQUE (group_id, topic, kafka_partition, kafka_offset)
);
