import { type Kysely, sql } from 'kysely'

/**
 * The first schema of pg-singleton. Every object lives in `pgsingleton` (PostgreSQL
 * reserves the `pg_` prefix for system schemas). Raw SQL on purpose: the view and the
 * function are easier to review as SQL than as builder calls.
 */
export async function up(db: Kysely<unknown>): Promise<void> {
  await sql`CREATE SCHEMA IF NOT EXISTS pgsingleton`.execute(db)

  // One row: which schema version the database holds, whoever's migrator applied it.
  // pg-singleton refuses to start against a version newer than it knows.
  await sql`
    CREATE TABLE pgsingleton.meta (
      id boolean PRIMARY KEY DEFAULT true CHECK (id),
      schema_version integer NOT NULL
    )`.execute(db)
  await sql`INSERT INTO pgsingleton.meta (schema_version) VALUES (1)`.execute(db)

  // The advisory-lock key of a singleton: the first 64 bits of
  // sha256('pgsingleton:' || name) as a signed bigint. Namespaced by the schema name so
  // that an app's own advisory locks (usually small integers or hashtext() values) and a
  // second deployment under another schema do not collide. src/lock/lock-key.ts computes
  // the same value in Node; a test holds the two equal.
  await sql`
    CREATE FUNCTION pgsingleton.lock_key(singleton text) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
      SELECT ('x' || left(encode(sha256(convert_to('pgsingleton:' || singleton, 'UTF8')), 'hex'), 16))::bit(64)::bigint
    $$`.execute(db)

  // One row per singleton. `epoch` is the fencing token: each acquisition of the lock
  // bumps it, and every cleanup batch checks it under a row lock.
  await sql`
    CREATE TABLE pgsingleton.leases (
      name text PRIMARY KEY,
      epoch bigint NOT NULL CHECK (epoch > 0),
      node_id text NOT NULL,
      backend_pid integer NOT NULL,
      acquired_at timestamptz NOT NULL,
      heartbeat_at timestamptz NOT NULL
    )`.execute(db)
  await sql`
    CREATE FUNCTION pgsingleton.leases_epoch_never_decreases() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.epoch < OLD.epoch THEN
        RAISE EXCEPTION 'pgsingleton.leases: epoch of % may only increase (% -> %)',
          OLD.name, OLD.epoch, NEW.epoch;
      END IF;
      RETURN NEW;
    END $$`.execute(db)
  await sql`
    CREATE TRIGGER epoch_never_decreases BEFORE UPDATE ON pgsingleton.leases
    FOR EACH ROW EXECUTE FUNCTION pgsingleton.leases_epoch_never_decreases()`.execute(db)

  // The schedule lives here, not in any node's memory: the next due occurrence of
  // each policy. A new holder picks up exactly where the last one stopped.
  await sql`
    CREATE TABLE pgsingleton.schedules (
      singleton text NOT NULL,
      policy text NOT NULL,
      every interval NOT NULL,
      next_run_at timestamptz NOT NULL,
      last_scheduled_for timestamptz,
      updated_epoch bigint NOT NULL,
      PRIMARY KEY (singleton, policy)
    )`.execute(db)

  await sql`
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
    )`.execute(db)
  // The hard backstop of continuity: an occurrence is completed at most once.
  await sql`
    CREATE UNIQUE INDEX cleanup_runs_one_done_per_occurrence
    ON pgsingleton.cleanup_runs (singleton, policy, scheduled_for) WHERE status = 'done'`.execute(
    db,
  )
  await sql`
    CREATE INDEX cleanup_runs_open ON pgsingleton.cleanup_runs (singleton, epoch)
    WHERE status IN ('scheduled', 'running', 'failed')`.execute(db)
  // The holder looks for fenced occurrences without a successor on every tick.
  await sql`
    CREATE INDEX cleanup_runs_fenced ON pgsingleton.cleanup_runs (singleton, policy, scheduled_for)
    WHERE status = 'fenced'`.execute(db)
  await sql`
    CREATE INDEX cleanup_runs_occurrence ON pgsingleton.cleanup_runs (singleton, policy, scheduled_for)`.execute(
    db,
  )
  await sql`
    CREATE INDEX cleanup_runs_finished ON pgsingleton.cleanup_runs (singleton, finished_at DESC)`.execute(
    db,
  )

  // One row per committed batch, written in the batch's own transaction: the audit
  // trail that shows (and lets the tests check) that batches of different epochs never
  // overlapped and committed in epoch order.
  await sql`
    CREATE TABLE pgsingleton.cleanup_batches (
      run_id bigint NOT NULL REFERENCES pgsingleton.cleanup_runs (id) ON DELETE CASCADE,
      batch integer NOT NULL,
      epoch bigint NOT NULL,
      began_at timestamptz NOT NULL,
      ended_at timestamptz NOT NULL,
      rows_deleted integer NOT NULL,
      PRIMARY KEY (run_id, batch)
    )`.execute(db)

  // Who holds it comes from pg_locks (the server's truth), not from what a node wrote:
  // with no backend holding the key, the holder columns are null.
  await sql`
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
    ) r ON true`.execute(db)
}

export async function down(db: Kysely<unknown>): Promise<void> {
  await sql`DROP VIEW IF EXISTS pgsingleton.status`.execute(db)
  await sql`DROP TABLE IF EXISTS pgsingleton.cleanup_batches`.execute(db)
  await sql`DROP TABLE IF EXISTS pgsingleton.cleanup_runs`.execute(db)
  await sql`DROP TABLE IF EXISTS pgsingleton.schedules`.execute(db)
  await sql`DROP TABLE IF EXISTS pgsingleton.leases`.execute(db)
  await sql`DROP FUNCTION IF EXISTS pgsingleton.leases_epoch_never_decreases()`.execute(db)
  await sql`DROP FUNCTION IF EXISTS pgsingleton.lock_key(text)`.execute(db)
  await sql`DROP TABLE IF EXISTS pgsingleton.meta`.execute(db)
}
