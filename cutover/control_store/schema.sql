-- kafka-cutover control tables: the one schema of the control store (cutover/control_store).
-- Idempotent (CREATE ... IF NOT EXISTS); applied by ControlStore.ensure under an advisory lock, so
-- commands do not depend on `cutover init` having run. Names are unqualified on purpose: the code
-- creates the control schema and runs this file with search_path set to it, in whichever database
-- the store is told it lives in. One section per role (`-- @section NAME` lines split them): a
-- role creates its own tables where it runs. The forward direction keeps the producer's in LEGACY
-- (schema "cutover") and the consumers' and the commands' in COMMERCE ([target] control_schema,
-- default "cutover"); the reverse direction creates the same sections the other way round. The
-- commands never create the consumers' tables: a missing dead_letters table fails the gate.

-- @section consumer
-- Written by the apply consumers in the same transaction as the rows they apply.

-- Consumed positions, stored with the rows (exactly-once effect): on partition assignment a
-- consumer seeks to next_offset. Kafka's committed offsets are only a monitoring hint.
CREATE TABLE IF NOT EXISTS consumer_offsets (
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

-- A deleted row leaves a tombstone with the position that deleted it, so an older event (a
-- replay, a late snapshot row) can never bring it back.
CREATE TABLE IF NOT EXISTS tombstones (
    target_table text   NOT NULL,
    row_key      text   NOT NULL,           -- the target key values, JSON array text
    src_lsn      bigint NOT NULL,
    src_seq      bigint NOT NULL,
    PRIMARY KEY (target_table, row_key)
);

-- Every carried TRUNCATE of a source table, one row per target table and source position (the
-- copies from the domain topic's other partitions only count in `copies`). The newest position
-- of a table is its truncate horizon: the applier deleted the table's rows written before it,
-- and an upsert older than it is skipped, so a partition that is behind cannot bring rows back.
CREATE TABLE IF NOT EXISTS truncates (
    target_table text        NOT NULL,
    src_lsn      bigint      NOT NULL,
    src_seq      bigint      NOT NULL,
    source_table text        NOT NULL,
    rows_removed bigint      NOT NULL DEFAULT 0,
    copies       int         NOT NULL DEFAULT 1,   -- copies applied (one per partition)
    applied_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_table, src_lsn, src_seq)
);

-- Every poison message, also sent to the dead-letter topic. status: open -> retried/resolved.
CREATE TABLE IF NOT EXISTS dead_letters (
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

-- @section commands
-- Verify results, the cutover state machine, and the audit trail.

-- One row per `cutover verify` run. `domains` lists the domains whose every table the run
-- covered (only those count for the switch-reads gate); `failed_domains` those with a
-- persistent difference or a broken invariant. The LSNs say which source positions the result
-- holds for: the legacy WAL position when the run started and ended, and the position the
-- consumers had applied (per domain, in figures) when it ended.
CREATE TABLE IF NOT EXISTS verify_runs (
    run_id           bigserial   PRIMARY KEY,
    status           text        NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'interrupted', 'finished', 'error')),
    domain           text,                   -- --domain, NULL for all
    tables           text[]      NOT NULL,   -- source tables in scope
    domains          text[]      NOT NULL,   -- domains fully covered
    failed_domains   text[]      NOT NULL DEFAULT '{}',
    passed           boolean,
    actor            text,
    options          jsonb       NOT NULL DEFAULT '{}',
    plan             jsonb       NOT NULL DEFAULT '{}',  -- table -> chunk ranges (resume)
    figures          jsonb,                  -- the report (per table, invariants, rates)
    source_lsn_start bigint,
    source_lsn_end   bigint,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX IF NOT EXISTS verify_runs_finished_idx
    ON verify_runs (finished_at DESC) WHERE status = 'finished';

-- Per-chunk progress of a run (first pass), so an interrupted run resumes with `--resume`.
CREATE TABLE IF NOT EXISTS verify_chunks (
    run_id        bigint  NOT NULL REFERENCES verify_runs (run_id) ON DELETE CASCADE,
    source_table  text    NOT NULL,
    chunk_no      integer NOT NULL,
    legacy_rows   bigint  NOT NULL,
    commerce_rows bigint  NOT NULL,
    absent_rows   bigint  NOT NULL,
    matching      bigint  NOT NULL,
    candidates    jsonb   NOT NULL DEFAULT '[]',  -- [{key, kind, columns}] found in this chunk
    done_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, source_table, chunk_no)
);

-- The cutover state of each domain (docs/CUTOVER.md). `state` is one of the stable states
-- (replicating, reads_switched, writes_switched, completed) or an in-flight one
-- (switching_reads, rolling_back, switching_writes, rolling_back_writes, completing) naming
-- `transition_id`. `version` grows by one per
-- transition and is what readers of the control topic order by.
CREATE TABLE IF NOT EXISTS domain_state (
    domain        text        PRIMARY KEY,
    state         text        NOT NULL DEFAULT 'replicating'
                  CONSTRAINT domain_state_state_check
                  CHECK (state IN ('replicating', 'switching_reads', 'reads_switched',
                                   'rolling_back', 'switching_writes', 'writes_switched',
                                   'rolling_back_writes', 'completing', 'completed')),
    version       bigint      NOT NULL DEFAULT 0,
    changed_at    timestamptz NOT NULL DEFAULT now(),
    actor         text,
    transition_id uuid
);

-- Every transition: intent -> published -> done (or abandoned when a rollback overrides an
-- unfinished switch). A crash leaves the row at intent or published; a re-run resumes it.
CREATE TABLE IF NOT EXISTS transitions (
    transition_id uuid        PRIMARY KEY,
    domain        text        NOT NULL,
    action        text        NOT NULL CONSTRAINT transitions_action_check
                  CHECK (action IN ('switch_reads', 'rollback', 'switch_writes',
                                    'rollback_writes', 'complete')),
    from_state    text        NOT NULL,
    to_state      text        NOT NULL,
    version       bigint      NOT NULL,
    status        text        NOT NULL DEFAULT 'intent'
                  CHECK (status IN ('intent', 'published', 'done', 'abandoned')),
    actor         text        NOT NULL,
    reason        text,
    forced        boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    done_at       timestamptz,
    -- The write transitions' steps (control/write_switch.py): the last one done and what the
    -- steps recorded (fence LSN, when the fence went up, the reverse start position, ...).
    step          text,
    step_detail   jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS transitions_domain_idx ON transitions (domain, created_at);

-- Databases created before the write cutover: widen the two CHECKs and add the step columns.
-- Only when needed, so a routine run takes no ACCESS EXCLUSIVE lock on domain_state.
DO $widen$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'transitions'::regclass
                   AND attname = 'step_detail' AND NOT attisdropped) THEN
        ALTER TABLE transitions ADD COLUMN IF NOT EXISTS step text;
        ALTER TABLE transitions ADD COLUMN step_detail jsonb NOT NULL DEFAULT '{}';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'domain_state'::regclass
                   AND conname = 'domain_state_state_check'
                   AND pg_get_constraintdef(oid) LIKE '%completed%') THEN
        ALTER TABLE domain_state DROP CONSTRAINT IF EXISTS domain_state_state_check;
        ALTER TABLE domain_state ADD CONSTRAINT domain_state_state_check
            CHECK (state IN ('replicating', 'switching_reads', 'reads_switched',
                             'rolling_back', 'switching_writes', 'writes_switched',
                             'rolling_back_writes', 'completing', 'completed'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'transitions'::regclass
                   AND conname = 'transitions_action_check'
                   AND pg_get_constraintdef(oid) LIKE '%complete%') THEN
        ALTER TABLE transitions DROP CONSTRAINT IF EXISTS transitions_action_check;
        ALTER TABLE transitions ADD CONSTRAINT transitions_action_check
            CHECK (action IN ('switch_reads', 'rollback', 'switch_writes', 'rollback_writes',
                              'complete'));
    END IF;
END
$widen$;

-- The audit trail: every state-changing command (and every gate evaluation, dry runs and
-- refusals included): who, when, what, with which gates and evidence, and how it ended.
CREATE TABLE IF NOT EXISTS audit (
    audit_id      bigserial   PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    actor         text        NOT NULL,
    command       text        NOT NULL,   -- switch-reads, rollback, switch-writes, verify, ...
    domain        text,
    outcome       text        NOT NULL,   -- done, resumed, noop, refused, dry_run, failed, ...
    forced        boolean     NOT NULL DEFAULT false,
    reason        text,
    transition_id uuid,
    from_state    text,
    to_state      text,
    gates         jsonb       NOT NULL DEFAULT '[]',
    detail        jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_at_idx ON audit (at);

-- @section producer
-- Next to the data the producer reads, so that one PostgreSQL transaction can never disagree
-- with itself; never published (the publication lists the mapped tables by name).

-- What the producer delivered, per slot. Written before the slot is advanced (write-ahead).
CREATE TABLE IF NOT EXISTS producer_state (
    slot_name      text        PRIMARY KEY,
    publication    text        NOT NULL,
    delivered_lsn  bigint      NOT NULL,  -- end LSN of the last source tx fully acked by Kafka
    producer       text,                  -- host:pid of the producer that wrote it
    heartbeat_at   timestamptz,           -- last time the producer advanced or heartbeated
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Last published column list per table (to refuse incompatible changes across restarts).
CREATE TABLE IF NOT EXISTS table_schemas (
    slot_name    text        NOT NULL,
    source_table text        NOT NULL,    -- schema.table
    columns      jsonb       NOT NULL,    -- [[name, type_oid, typmod], ...]
    fingerprint  text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, source_table)
);

CREATE TABLE IF NOT EXISTS snapshot_requests (
    id           bigserial   PRIMARY KEY,
    slot_name    text        NOT NULL,
    source_table text        NOT NULL,    -- the mapping's table name (in its source_schema)
    where_sql    text,                    -- optional filter as the operator wrote it (parsed again)
    kind         text        NOT NULL CHECK (kind IN ('initial', 'request')),
    status       text        NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'done', 'failed')),
    requested_by text,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    error        text
);
CREATE INDEX IF NOT EXISTS snapshot_requests_open_idx
    ON snapshot_requests (slot_name, id) WHERE status IN ('pending', 'running');

-- Rows the producer could not carry (a NaN, an infinite date, an event over the size limit):
-- the row is withheld, the stream goes on. No column value is stored, only where and why.
-- Resolved by the producer when a later full image of the same row flows (the fix).
CREATE TABLE IF NOT EXISTS producer_dead_letters (
    id           bigserial   PRIMARY KEY,
    slot_name    text        NOT NULL,
    domain       text        NOT NULL,
    topic        text        NOT NULL,    -- the domain topic the row's event was meant for
    source_table text        NOT NULL,    -- schema.table
    row_key      text        NOT NULL,    -- the row's primary key, JSON object text
    source_lsn   bigint      NOT NULL,    -- commit LSN of the change (high watermark: snapshot)
    reason       text        NOT NULL,    -- a fixed vocabulary, never a value
    column_name  text,
    status       text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    resolved_lsn bigint,                  -- the change that carried the fixed row
    UNIQUE (slot_name, source_table, row_key, source_lsn)
);

CREATE TABLE IF NOT EXISTS snapshot_progress (
    request_id   bigint      PRIMARY KEY REFERENCES snapshot_requests (id),
    last_pk      jsonb,                   -- text of the primary key values of the last row read
    rows_emitted bigint      NOT NULL DEFAULT 0,
    chunks       integer     NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- @section reverse
-- The reverse appliers' (commerce -> legacy) position guard, in legacy's [reverse] control_schema.
-- Legacy tables have no _src_lsn/_src_seq columns, so the position (commerce commit LSN, ordinal)
-- of the change that last wrote a legacy row lives here, one row per (legacy table, key), written
-- in the same transaction as the row: a change applies only if it moves this position forward (a
-- delete too, so an older change arriving later cannot bring a deleted row back).
CREATE TABLE IF NOT EXISTS row_positions (
    legacy_table text   NOT NULL,
    row_key      text   NOT NULL,           -- the legacy key values, JSON array text
    src_lsn      bigint NOT NULL,
    src_seq      bigint NOT NULL,
    PRIMARY KEY (legacy_table, row_key)
);
