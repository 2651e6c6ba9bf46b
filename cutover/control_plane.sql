-- kafka-cutover control plane in the COMMERCE database: verify results, the cutover state
-- machine, and the audit trail. Idempotent (CREATE ... IF NOT EXISTS); applied by
-- control.state.ensure_control_plane under an advisory lock before any command that needs it,
-- so it does not depend on `cutover init` having run. Names are unqualified on purpose: the
-- code creates the control schema ([target] control_schema, default "cutover") and runs this
-- file with search_path set to it. The consumer's tables (consumer_offsets, tombstones,
-- dead_letters) are in cutover/control.sql.

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

-- The cutover state of each domain (DESIGN §6). `state` is one of the stable states
-- (replicating, reads_switched; writes_switched reserved) or an in-flight one
-- (switching_reads, rolling_back) naming `transition_id`. `version` grows by one per
-- transition and is what readers of the control topic order by.
CREATE TABLE IF NOT EXISTS domain_state (
    domain        text        PRIMARY KEY,
    state         text        NOT NULL DEFAULT 'replicating'
                  CHECK (state IN ('replicating', 'switching_reads', 'reads_switched',
                                   'rolling_back', 'writes_switched')),
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
    action        text        NOT NULL CHECK (action IN ('switch_reads', 'rollback')),
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
    done_at       timestamptz
);
CREATE INDEX IF NOT EXISTS transitions_domain_idx ON transitions (domain, created_at);

-- The audit trail: every state-changing command (and every gate evaluation, dry runs and
-- refusals included): who, when, what, with which gates and evidence, and how it ended.
CREATE TABLE IF NOT EXISTS audit (
    audit_id      bigserial   PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    actor         text        NOT NULL,
    command       text        NOT NULL,   -- switch-reads, rollback, verify
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
