-- pg-singleton schema step 3 (pgsingleton_0003_tasks).
-- Safe to run by any route, any number of times, at the same moment as another route:
-- it applies only on top of step 2 and records 3 in pgsingleton.meta.
DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(-7089759982357046742);
  IF to_regclass('pgsingleton.meta') IS NOT NULL THEN
    EXECUTE 'SELECT CASE WHEN m.schema_version >= 3
  THEN greatest(coalesce((to_jsonb(m)->>''revision'')::integer, 0), m.schema_version) ELSE m.schema_version END FROM pgsingleton.meta m' INTO found;
  END IF;
  IF found >= 3 THEN
    RETURN; -- applied already, by this route or another
  END IF;
  IF found < 2 THEN
    RAISE EXCEPTION 'pg-singleton: schema step 3 needs step 2 first; the database has %', found;
  END IF;
  EXECUTE $pgsingleton_step$
UPDATE pgsingleton.meta SET schema_version = 3, protocol = 3;
SELECT set_config('pgsingleton.protocol', '3', true);

ALTER TABLE pgsingleton.schedules
  ADD COLUMN kind text NOT NULL DEFAULT 'cleanup' CHECK (kind IN ('cleanup', 'task')),
  -- a cron pattern (5 fields, or 6 with seconds), read in time_zone, instead of every
  ADD COLUMN cron text,
  ADD COLUMN time_zone text,
  -- about how far apart its slots are (every, or the gap between a cron pattern's next
  -- two slots): a schedule is overdue when it has not succeeded for two of them
  ADD COLUMN period interval,
  ALTER COLUMN every DROP NOT NULL;
UPDATE pgsingleton.schedules SET period = every;
ALTER TABLE pgsingleton.schedules
  ADD CONSTRAINT schedules_every_or_cron CHECK ((every IS NULL) <> (cron IS NULL));

ALTER TABLE pgsingleton.cleanup_runs
  ADD COLUMN kind text NOT NULL DEFAULT 'cleanup' CHECK (kind IN ('cleanup', 'task'));

-- One row per holdership. The bump that starts a term closes the one before it if its
-- holder could not (it crashed, or was cut off): closed_by 'successor', reason 'lost'. A
-- holder that learns later why its term ended (it fenced itself, or found its epoch
-- superseded) gives its own reason; the end time stays the earliest recorded.
CREATE TABLE pgsingleton.terms (
  name text NOT NULL,
  epoch bigint NOT NULL,
  node_id text NOT NULL,
  acquired_at timestamptz NOT NULL,
  ended_at timestamptz,
  end_reason text CHECK (end_reason IN ('released', 'lost', 'fenced', 'superseded')),
  closed_by text CHECK (closed_by IN ('holder', 'successor')),
  detail text,
  PRIMARY KEY (name, epoch)
);
CREATE INDEX terms_open ON pgsingleton.terms (name) WHERE ended_at IS NULL;
CREATE INDEX terms_acquired_at ON pgsingleton.terms (acquired_at);

CREATE OR REPLACE FUNCTION pgsingleton.bump_epoch(p_singleton text, p_node_id text,
  OUT epoch bigint, OUT acquired_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM 1 FROM pgsingleton.leases l WHERE l.name = p_singleton FOR UPDATE;
  -- The clock, not now(): in a wait slice, now() is when the slice began.
  INSERT INTO pgsingleton.leases AS l (name, epoch, node_id, backend_pid, acquired_at, heartbeat_at)
  VALUES (p_singleton, 1, p_node_id, pg_backend_pid(), clock_timestamp(), clock_timestamp())
  ON CONFLICT (name) DO UPDATE
    SET epoch = l.epoch + 1, node_id = excluded.node_id, backend_pid = excluded.backend_pid,
        acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at
  RETURNING l.epoch, l.acquired_at INTO epoch, acquired_at;
  UPDATE pgsingleton.terms t
     SET ended_at = bump_epoch.acquired_at, end_reason = 'lost', closed_by = 'successor',
         detail = format('closed by %s, which took over at epoch %s', p_node_id, bump_epoch.epoch)
   WHERE t.name = p_singleton AND t.ended_at IS NULL;
  -- A holder's own account may have committed after this bump read the clock: no term
  -- ends after the next began.
  UPDATE pgsingleton.terms t SET ended_at = bump_epoch.acquired_at
   WHERE t.name = p_singleton AND t.epoch < bump_epoch.epoch AND t.ended_at > bump_epoch.acquired_at;
  INSERT INTO pgsingleton.terms (name, epoch, node_id, acquired_at)
  VALUES (p_singleton, bump_epoch.epoch, p_node_id, bump_epoch.acquired_at)
  ON CONFLICT DO NOTHING;
  PERFORM pg_notify('pgsingleton',
    json_build_object('singleton', p_singleton, 'epoch', bump_epoch.epoch, 'node', p_node_id)::text);
END $$;

-- The holder's own account of how its term ended. It wins over a successor's 'lost'
-- (the holder knows better), never over another account of its own; the end time stays
-- the earliest one recorded.
CREATE FUNCTION pgsingleton.end_term(p_singleton text, p_epoch bigint, p_reason text, p_detail text)
RETURNS void LANGUAGE sql VOLATILE AS $$
  UPDATE pgsingleton.terms t
     SET ended_at = coalesce(t.ended_at, clock_timestamp()), end_reason = p_reason,
         closed_by = 'holder', detail = p_detail
   WHERE t.name = p_singleton AND t.epoch = p_epoch
     AND (t.ended_at IS NULL OR t.closed_by = 'successor');
  SELECT pg_notify('pgsingleton', json_build_object('singleton', p_singleton, 'epoch', p_epoch, 'ended', p_reason)::text);
$$;

-- The fenced transaction of a task's run, opened in the caller's transaction: the checks
-- of a cleanup batch (epoch, attempt, live node, agreement, pause), then the run marked
-- done. NULL when the caller may go on: what it writes in this transaction then commits
-- with the run's completion, or not at all. Otherwise what stopped it ('fenced',
-- 'superseded', 'not live', 'disagree', 'paused', or 'done already' when another run
-- completed the same occurrence).
CREATE FUNCTION pgsingleton.task_fence(p_run bigint, p_attempt integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  g record;
BEGIN
  SELECT * INTO g FROM pgsingleton.guard_run(p_run, p_attempt);
  IF g.outcome IS NOT NULL THEN
    RETURN g.outcome;
  END IF;
  IF (g.run).kind <> 'task' THEN
    RAISE EXCEPTION 'pgsingleton.task_fence: run % is not a task''s', p_run;
  END IF;
  BEGIN
    UPDATE pgsingleton.cleanup_runs SET status = 'done', finished_at = now(), batches = batches + 1
     WHERE id = p_run;
  EXCEPTION WHEN unique_violation THEN
    RETURN 'done already';
  END;
  RETURN NULL;
END $$;

-- A policy or task, its kind and schedule, beside what the nodes hold of it.
DROP VIEW pgsingleton.policy_status;
CREATE VIEW pgsingleton.policy_status AS
WITH live AS MATERIALIZED (SELECT singleton, node_id FROM pgsingleton.live_nodes),
policies AS (
  SELECT singleton, policy FROM pgsingleton.schedules
  UNION
  SELECT singleton, policy FROM pgsingleton.policy_controls
  UNION
  SELECT np.singleton, np.policy FROM pgsingleton.node_policies np
    JOIN live l ON l.singleton = np.singleton AND l.node_id = np.node_id
),
held AS (
  SELECT p.singleton, p.policy, l.node_id, np.fingerprint, np.definition
    FROM policies p
    JOIN live l ON l.singleton = p.singleton
    LEFT JOIN pgsingleton.node_policies np
      ON np.singleton = p.singleton AND np.node_id = l.node_id AND np.policy = p.policy
),
agreement AS (
  SELECT singleton, policy,
         CASE WHEN count(fingerprint) = count(*) AND count(DISTINCT fingerprint) = 1
              THEN 'agree' ELSE 'disagree' END AS agreement,
         count(*)::integer AS live_nodes,
         jsonb_agg(jsonb_build_object('node_id', node_id, 'fingerprint', fingerprint, 'definition', definition)
                   ORDER BY node_id) AS node_definitions,
         max(definition->>'kind') AS kind
    FROM held GROUP BY singleton, policy
)
SELECT p.singleton,
       p.policy,
       coalesce(c.paused, false) AS paused,
       coalesce(a.agreement, 'no live node') AS agreement,
       coalesce(a.live_nodes, 0) AS live_nodes,
       CASE WHEN a.agreement = 'agree' THEN a.node_definitions -> 0 -> 'definition' END AS definition,
       CASE WHEN a.agreement = 'disagree' THEN a.node_definitions END AS node_definitions,
       s.every,
       s.next_run_at,
       c.run_now_at,
       o.status AS open_run_status,
       o.retry_at,
       last.status AS last_status,
       last.finished_at AS last_run_at,
       last.rows_deleted AS last_rows_deleted,
       last.rows_skipped AS last_rows_skipped,
       ok.finished_at AS last_success_at,
       err.error AS last_error,
       err.finished_at AS last_error_at,
       coalesce(day.rows, 0) AS rows_deleted_24h,
       coalesce(NOT coalesce(c.paused, false)
                AND coalesce(ok.finished_at, s.created_at) < now() - 2 * coalesce(s.period, s.every), false) AS overdue,
       coalesce(s.kind, a.kind, 'cleanup') AS kind,
       s.cron,
       s.time_zone AS cron_time_zone
  FROM policies p
  LEFT JOIN agreement a ON a.singleton = p.singleton AND a.policy = p.policy
  LEFT JOIN pgsingleton.schedules s ON s.singleton = p.singleton AND s.policy = p.policy
  LEFT JOIN pgsingleton.policy_controls c ON c.singleton = p.singleton AND c.policy = p.policy
  LEFT JOIN LATERAL (
    SELECT r.status, r.retry_at FROM pgsingleton.cleanup_runs r
     WHERE r.singleton = p.singleton AND r.policy = p.policy
       AND r.status IN ('scheduled', 'running', 'failed')
  ) o ON true
  LEFT JOIN LATERAL (
    SELECT r.status, r.finished_at, r.rows_deleted, r.rows_skipped FROM pgsingleton.cleanup_runs r
     WHERE r.singleton = p.singleton AND r.policy = p.policy AND r.finished_at IS NOT NULL
       AND r.status IN ('done', 'failed', 'exhausted')
     ORDER BY r.finished_at DESC LIMIT 1
  ) last ON true
  LEFT JOIN LATERAL (
    SELECT r.finished_at FROM pgsingleton.cleanup_runs r
     WHERE r.singleton = p.singleton AND r.policy = p.policy AND r.status = 'done'
     ORDER BY r.finished_at DESC LIMIT 1
  ) ok ON true
  LEFT JOIN LATERAL (
    SELECT r.error, r.finished_at FROM pgsingleton.cleanup_runs r
     WHERE r.singleton = p.singleton AND r.policy = p.policy AND r.finished_at IS NOT NULL
       AND r.status IN ('done', 'failed', 'exhausted') AND r.error IS NOT NULL
     ORDER BY r.finished_at DESC LIMIT 1
  ) err ON true
  LEFT JOIN LATERAL (
    SELECT sum(b.rows_deleted)::bigint AS rows FROM pgsingleton.cleanup_runs r
      JOIN pgsingleton.cleanup_batches b ON b.run_id = r.id
     WHERE r.singleton = p.singleton AND r.policy = p.policy
       AND (r.finished_at IS NULL OR r.finished_at > now() - interval '24 hours')
       AND b.ended_at > now() - interval '24 hours'
  ) day ON true;

-- A holder from before this schema loses its epoch now: its next heartbeat fences it, and
-- it cannot bump again until upgraded. FOR UPDATE first, as every epoch bump does.
SELECT 1 FROM pgsingleton.leases FOR UPDATE;
UPDATE pgsingleton.leases SET epoch = epoch + 1;
$pgsingleton_step$;
  IF EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('pgsingleton.meta') AND attname = 'revision' AND NOT attisdropped) THEN
    EXECUTE 'UPDATE pgsingleton.meta SET revision = 3';
  END IF;
END $pgsingleton_migration$;
