-- kafka-cutover write fence: a guard inside the database that refuses writes to a domain's
-- tables on the side that no longer holds the domain's writes ("never two
-- writable sides", docs/CUTOVER.md). Idempotent. Names are unqualified on purpose: the
-- code creates the control schema and runs this file with search_path set to it. The trigger
-- function names its own table with the schema it lives in: cutover.fence replaces
-- @fence_schema@ with that schema's quoted identifier when it installs this file, so the
-- applications' search_path does not matter, and the guard's query is static SQL whose plan
-- PL/pgSQL keeps for the session (a dynamic EXECUTE is planned again on every write
-- statement: it doubled the CPU of a small write transaction). Triggers still pass the
-- schema as TG_ARGV[1]; the guard no longer reads it.
--
-- How it holds even for a writer already past the check when the fence goes up: the guard
-- takes FOR SHARE on the domain's fence row for the rest of the writing transaction, and
-- raising the fence updates that row, which waits for every such writer to end. So when the
-- fence's transaction commits, every write admitted before it has committed or aborted, and the
-- WAL position read after it (the fence LSN) is past all of them.
CREATE TABLE IF NOT EXISTS write_fence (
    domain     text        PRIMARY KEY,
    fenced     boolean     NOT NULL DEFAULT false,
    state      text        NOT NULL DEFAULT 'replicating',
    reason     text,
    changed_at timestamptz NOT NULL DEFAULT now(),
    fence_lsn  pg_lsn
);

-- Every raise and lower, at the LSN of the logical message ('cutover.fence') its transaction
-- emitted. The producer reading this database drops the domain's row changes between a raise
-- and the next lower (WAL order); on restart it reads here which domains were fenced at its
-- slot's position (docs/CUTOVER.md, "The fence in the stream").
CREATE TABLE IF NOT EXISTS write_fence_log (
    lsn    pg_lsn      PRIMARY KEY,
    domain text        NOT NULL,
    fenced boolean     NOT NULL,
    at     timestamptz NOT NULL DEFAULT now()
);

-- SECURITY DEFINER: the guard reads and locks the fence row with its owner's rights, so the
-- applications writing the domain's tables need no privilege on the fence. Granting them
-- UPDATE on write_fence (what FOR SHARE needs) would let any of them lower a fence. The fixed
-- search_path is the rule for such functions; every name in it is qualified anyway.
CREATE OR REPLACE FUNCTION write_fence_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $guard$
DECLARE
    is_fenced   boolean;
    fence_state text;
BEGIN
    -- The appliers' sessions carry a replication origin (set up to mark their transactions
    -- so the other direction does not echo them): they are the one writer a fence lets through.
    IF pg_catalog.pg_replication_origin_session_is_setup() THEN
        RETURN NULL;
    END IF;
    SELECT f.fenced, f.state INTO is_fenced, fence_state
      FROM @fence_schema@.write_fence AS f
     WHERE f.domain = TG_ARGV[0]
       FOR SHARE;
    IF is_fenced THEN
        RAISE EXCEPTION 'write to %.% refused: domain % is fenced on this database (state %)',
                TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0], fence_state
            USING ERRCODE = '25006',  -- read_only_sql_transaction: retry on the other side
                  DETAIL = format('cutover fence of domain %s', TG_ARGV[0]),
                  HINT = 'The domain''s writes moved; ask cutover.routing where they go now '
                         'and retry the transaction there.';
    END IF;
    RETURN NULL;
END
$guard$;
