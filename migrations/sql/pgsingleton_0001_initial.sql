-- pg-singleton schema step 1 (pgsingleton_0001_initial).
-- Safe to run by any route, any number of times, at the same moment as another route:
-- it applies only on top of step 0 and records 1 in pgsingleton.meta.
DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(-7089759982357046742);
  IF to_regclass('pgsingleton.meta') IS NOT NULL THEN
    EXECUTE 'SELECT CASE WHEN m.schema_version >= 3
  THEN greatest(coalesce((to_jsonb(m)->>''revision'')::integer, 0), m.schema_version) ELSE m.schema_version END FROM pgsingleton.meta m' INTO found;
  END IF;
  IF found >= 1 THEN
    RETURN; -- applied already, by this route or another
  END IF;
  IF found < 0 THEN
    RAISE EXCEPTION 'pg-singleton: schema step 1 needs step 0 first; the database has %', found;
  END IF;
  EXECUTE $pgsingleton_step$
CREATE SCHEMA IF NOT EXISTS pgsingleton;

-- One row: which schema version the database holds, whoever's migrator applied it.
-- pg-singleton refuses to start against a version newer than it knows.
CREATE TABLE pgsingleton.meta (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    schema_version integer NOT NULL
  );

INSERT INTO pgsingleton.meta (schema_version) VALUES (1);

-- The advisory-lock key of a singleton: the first 64 bits of
-- sha256('pgsingleton:' || name) as a signed bigint. Namespaced by the schema name so
-- that an app's own advisory locks (usually small integers or hashtext() values) and a
-- second deployment under another schema do not collide. src/lock/lock-key.ts computes
-- the same value in Node; a test holds the two equal.
CREATE FUNCTION pgsingleton.lock_key(singleton text) RETURNS bigint
  LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
  AS $$
    SELECT ('x' || left(encode(sha256(convert_to('pgsingleton:' || singleton, 'UTF8')), 'hex'), 16))::bit(64)::bigint
  $$;

-- One row per singleton. "epoch" is the fencing token: each acquisition of the lock
-- bumps it, and every cleanup batch checks it under a row lock.
CREATE TABLE pgsingleton.leases (
    name text PRIMARY KEY,
    epoch bigint NOT NULL CHECK (epoch > 0),
    node_id text NOT NULL,
    backend_pid integer NOT NULL,
    acquired_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL
  );

CREATE FUNCTION pgsingleton.leases_epoch_never_decreases() RETURNS trigger
  LANGUAGE plpgsql AS $$
  BEGIN
    IF NEW.epoch < OLD.epoch THEN
      RAISE EXCEPTION 'pgsingleton.leases: epoch of % may only increase (% -> %)',
        OLD.name, OLD.epoch, NEW.epoch;
    END IF;
    RETURN NEW;
  END $$;

CREATE TRIGGER epoch_never_decreases BEFORE UPDATE ON pgsingleton.leases
  FOR EACH ROW EXECUTE FUNCTION pgsingleton.leases_epoch_never_decreases();

-- The schedule lives here, not in any node's memory: the next due occurrence of
-- each policy. A new holder picks up exactly where the last one stopped.
CREATE TABLE pgsingleton.schedules (
    singleton text NOT NULL,
    policy text NOT NULL,
    every interval NOT NULL,
    next_run_at timestamptz NOT NULL,
    last_scheduled_for timestamptz,
    updated_epoch bigint NOT NULL,
    PRIMARY KEY (singleton, policy)
  );

CREATE TABLE pgsingleton.cleanup_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    singleton text NOT NULL,
    policy text NOT NULL,
    epoch bigint NOT NULL,
    scheduled_for timestamptz NOT NULL,
    scheduled_by text NOT NULL,
    -- later slots of the grid that came due while nobody held the singleton, run as part of this one
    coalesced integer NOT NULL DEFAULT 0,
    -- true when a holder re-issued an occurrence an older epoch had left unfinished
    reissued boolean NOT NULL DEFAULT false,
    node_id text,
    job_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    rows_deleted bigint NOT NULL DEFAULT 0,
    batches integer NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'scheduled'
      CHECK (status IN ('scheduled', 'running', 'done', 'fenced', 'failed')),
    error text
  );

-- The hard backstop of continuity: an occurrence is completed at most once.
CREATE UNIQUE INDEX cleanup_runs_one_done_per_occurrence
  ON pgsingleton.cleanup_runs (singleton, policy, scheduled_for) WHERE status = 'done';

CREATE INDEX cleanup_runs_open ON pgsingleton.cleanup_runs (singleton, epoch)
  WHERE status IN ('scheduled', 'running', 'failed');

-- The holder looks for fenced occurrences without a successor on every tick.
CREATE INDEX cleanup_runs_fenced ON pgsingleton.cleanup_runs (singleton, policy, scheduled_for)
  WHERE status = 'fenced';

CREATE INDEX cleanup_runs_occurrence ON pgsingleton.cleanup_runs (singleton, policy, scheduled_for);

CREATE INDEX cleanup_runs_finished ON pgsingleton.cleanup_runs (singleton, finished_at DESC);

-- One row per committed batch, written in the batch's own transaction: the audit
-- trail that shows (and lets the tests check) that batches of different epochs never
-- overlapped and committed in epoch order.
CREATE TABLE pgsingleton.cleanup_batches (
    run_id bigint NOT NULL REFERENCES pgsingleton.cleanup_runs (id) ON DELETE CASCADE,
    batch integer NOT NULL,
    epoch bigint NOT NULL,
    began_at timestamptz NOT NULL,
    ended_at timestamptz NOT NULL,
    rows_deleted integer NOT NULL,
    PRIMARY KEY (run_id, batch)
  );

-- Who holds it comes from pg_locks (the server's truth), not from what a node wrote:
-- with no backend holding the key, the holder columns are null.
CREATE VIEW pgsingleton.status AS
  WITH keyed AS (
    SELECT l.*, pgsingleton.lock_key(l.name) AS key FROM pgsingleton.leases l
  ), sessions AS (
    SELECT k.name, lk.pid, lk.granted, a.application_name
    FROM keyed k
    JOIN pg_locks lk
      ON lk.locktype = 'advisory'
     AND lk.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     AND lk.objsubid = 1
     AND lk.classid::bigint = ((k.key >> 32) & 4294967295)
     AND lk.objid::bigint = (k.key & 4294967295)
    LEFT JOIN pg_stat_activity a ON a.pid = lk.pid
  )
  SELECT
    k.name,
    h.application_name AS node_id,
    h.pid AS backend_pid,
    CASE WHEN h.pid = k.backend_pid THEN k.epoch END AS epoch,
    CASE WHEN h.pid = k.backend_pid THEN k.acquired_at END AS acquired_at,
    CASE WHEN h.pid = k.backend_pid THEN k.heartbeat_at END AS heartbeat_at,
    w.waiting_nodes,
    w.waiting_node_ids,
    k.epoch AS last_epoch,
    k.node_id AS last_node_id,
    r.finished_at AS last_run_at,
    r.rows_deleted AS last_run_rows,
    r.policy AS last_run_policy,
    r.status AS last_run_status
  FROM keyed k
  LEFT JOIN sessions h ON h.name = k.name AND h.granted
  LEFT JOIN LATERAL (
    SELECT count(*)::integer AS waiting_nodes,
           coalesce(array_agg(s.application_name ORDER BY s.pid), '{}') AS waiting_node_ids
    FROM sessions s WHERE s.name = k.name AND NOT s.granted
  ) w ON true
  LEFT JOIN LATERAL (
    SELECT cr.finished_at, cr.rows_deleted, cr.policy, cr.status
    FROM pgsingleton.cleanup_runs cr
    WHERE cr.singleton = k.name AND cr.finished_at IS NOT NULL
    ORDER BY cr.finished_at DESC
    LIMIT 1
  ) r ON true;
$pgsingleton_step$;
  IF EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('pgsingleton.meta') AND attname = 'revision' AND NOT attisdropped) THEN
    EXECUTE 'UPDATE pgsingleton.meta SET revision = 1';
  END IF;
END $pgsingleton_migration$;
