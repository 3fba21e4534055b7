-- pg-singleton schema step 2 (pgsingleton_0002_safe_deletes).
-- Safe to run by any route, any number of times, at the same moment as another route:
-- it applies only on top of step 1 and records 2 in pgsingleton.meta.
DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(-7089759982357046742);
  IF to_regclass('pgsingleton.meta') IS NOT NULL THEN
    EXECUTE 'SELECT CASE WHEN m.schema_version >= 3
  THEN greatest(coalesce((to_jsonb(m)->>''revision'')::integer, 0), m.schema_version) ELSE m.schema_version END FROM pgsingleton.meta m' INTO found;
  END IF;
  IF found >= 2 THEN
    RETURN; -- applied already, by this route or another
  END IF;
  IF found < 1 THEN
    RAISE EXCEPTION 'pg-singleton: schema step 2 needs step 1 first; the database has %', found;
  END IF;
  EXECUTE $pgsingleton_step$
-- What the nodes must speak: a lock session declares pgsingleton.protocol, and the epoch
-- bump of a node that speaks less is refused with a message that says to upgrade it.
ALTER TABLE pgsingleton.meta ADD COLUMN protocol integer NOT NULL DEFAULT 2;
UPDATE pgsingleton.meta SET schema_version = 2, protocol = 2;
SELECT set_config('pgsingleton.protocol', '2', true);

CREATE OR REPLACE FUNCTION pgsingleton.leases_epoch_never_decreases() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  required integer;
  spoken integer;
BEGIN
  IF TG_OP = 'UPDATE' AND NEW.epoch < OLD.epoch THEN
    RAISE EXCEPTION 'pgsingleton.leases: epoch of % may only increase (% -> %)',
      OLD.name, OLD.epoch, NEW.epoch;
  END IF;
  IF TG_OP = 'INSERT' OR NEW.epoch <> OLD.epoch THEN
    SELECT m.protocol INTO required FROM pgsingleton.meta m;
    spoken := coalesce(nullif(current_setting('pgsingleton.protocol', true), '')::integer, 1);
    IF spoken < required THEN
      RAISE EXCEPTION USING
        ERRCODE = 'object_not_in_prerequisite_state',
        MESSAGE = format('pg-singleton: node %s speaks protocol %s, but this database (pgsingleton schema version %s) requires protocol %s',
                         NEW.node_id, spoken, (SELECT schema_version FROM pgsingleton.meta), required),
        HINT = 'Upgrade pg-singleton on this node; until then it cannot hold the singleton.';
    END IF;
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER epoch_never_decreases ON pgsingleton.leases;
CREATE TRIGGER epoch_never_decreases BEFORE INSERT OR UPDATE ON pgsingleton.leases
FOR EACH ROW EXECUTE FUNCTION pgsingleton.leases_epoch_never_decreases();
-- A holder from before this schema loses its epoch now: its next heartbeat fences it.
-- FOR UPDATE first, as every epoch bump does: it waits for a batch in flight (which holds
-- the lease FOR KEY SHARE), which a plain UPDATE of a non-key column would not.
SELECT 1 FROM pgsingleton.leases FOR UPDATE;
UPDATE pgsingleton.leases SET epoch = epoch + 1;

-- The cut-off of an interval: the database's now() minus the interval, counted in UTC
-- (a day is 24 hours, a month a calendar month in UTC). No text zone name is read (a
-- name given to AT TIME ZONE is looked up among the session's timezone_abbreviations
-- first, which a database or role can redefine): the arithmetic runs with the TimeZone
-- setting at UTC, which only ever reads the zone database, and the caller's setting is
-- put back.
CREATE FUNCTION pgsingleton.cutoff(older_than interval) RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  caller text := current_setting('TimeZone');
  result timestamptz;
BEGIN
  PERFORM set_config('TimeZone', 'UTC', true);
  result := (now()::timestamp - older_than)::timestamptz;
  PERFORM set_config('TimeZone', caller, true);
  RETURN result;
END $$;

-- The one definition of "outdated", as SQL text over $1 (the cut-off, timestamptz), to
-- run with the TimeZone setting at the policy's zone (pgsingleton.cleanup_batch sets it
-- for its transaction). The first term of each is a plain range on the column (an index
-- serves it); the second is the exact rule. A timestamp is read in the zone; where a wall
-- time is ambiguous (clocks going back) PostgreSQL reads it as the later instant, so the
-- row is judged younger. A date goes only once its whole day, in the zone, is older than
-- the cut-off.
CREATE FUNCTION pgsingleton.outdated_predicate(column_name text, column_type text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  RETURN CASE column_type
    WHEN 'timestamp with time zone' THEN
      format('%1$I < $1', column_name)
    WHEN 'timestamp without time zone' THEN
      format('%1$I < $1::timestamp AND %1$I::timestamptz < $1', column_name)
    WHEN 'date' THEN
      format('%1$I < $1::date AND (%1$I + 1)::timestamptz <= $1', column_name)
  END;
END $$;

-- The fence: takes the lease row FOR KEY SHARE at the given epoch and says whether it is
-- current. Every protected write calls it first in its transaction; the next holder's
-- epoch bump (FOR UPDATE) waits for such a transaction, and no transaction of an older
-- epoch passes it once the bump has committed.
CREATE FUNCTION pgsingleton.fence(p_singleton text, p_epoch bigint) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
  SELECT EXISTS (SELECT 1 FROM pgsingleton.leases WHERE name = p_singleton AND epoch = p_epoch FOR KEY SHARE)
$$;

-- The holder's new epoch, the fencing token of its holdership, bumped by the session that
-- holds the lock. Locks the lease row FOR UPDATE first, which waits for any cleanup batch
-- of the previous epoch that still holds its FOR KEY SHARE fence; once this commits, no
-- batch of an older epoch passes its fence check. Sessions that LISTEN on channel
-- pgsingleton hear of it at the commit: {"singleton", "epoch", "node"} as JSON.
CREATE FUNCTION pgsingleton.bump_epoch(p_singleton text, p_node_id text,
  OUT epoch bigint, OUT acquired_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  PERFORM 1 FROM pgsingleton.leases l WHERE l.name = p_singleton FOR UPDATE;
  INSERT INTO pgsingleton.leases AS l (name, epoch, node_id, backend_pid, acquired_at, heartbeat_at)
  -- The clock, not now(): in a wait slice, now() is when the slice began.
  VALUES (p_singleton, 1, p_node_id, pg_backend_pid(), clock_timestamp(), clock_timestamp())
  ON CONFLICT (name) DO UPDATE
    SET epoch = l.epoch + 1, node_id = excluded.node_id, backend_pid = excluded.backend_pid,
        acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at
  RETURNING l.epoch, l.acquired_at INTO epoch, acquired_at;
  PERFORM pg_notify('pgsingleton',
    json_build_object('singleton', p_singleton, 'epoch', epoch, 'node', p_node_id)::text);
END $$;

-- One slice of a standby's wait for the singleton's lock: 'acquired', 'waiting' when the
-- slice ran out, or 'moved' when this statement runs on another server session than the
-- one that holds the node's membership lock (a transaction pooler moves statements
-- between server connections; a lock taken through it would stay on one of them). The
-- lock_timeout of the slice is caught here, so a standby that waits for hours writes no
-- ERROR into the server log; and each slice answers, so the node notices a connection
-- that died without a word. Once acquired, the epoch is bumped in the same statement, so
-- a takeover does not wait for the node to wake up and ask; epoch is NULL when a batch of
-- the old epoch held the lease row all slice long (the node then bumps it itself).
CREATE FUNCTION pgsingleton.wait_for_lock(p_singleton text, p_node_id text, p_slice_ms integer,
  OUT slice text, OUT epoch bigint, OUT acquired_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
  IF NOT EXISTS (
      SELECT 1 FROM pg_locks l
       WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid = pg_backend_pid()
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
         AND ((l.classid::bigint << 32) | l.objid::bigint) = pgsingleton.member_key(p_singleton, p_node_id)) THEN
    slice := 'moved';
    RETURN;
  END IF;
  PERFORM set_config('lock_timeout', greatest(p_slice_ms, 1)::text, true);
  BEGIN
    PERFORM pg_advisory_lock(pgsingleton.lock_key(p_singleton));
  EXCEPTION WHEN lock_not_available THEN
    slice := 'waiting';
    RETURN;
  END;
  -- A session-level advisory lock outlives the rollback of what follows.
  slice := 'acquired';
  BEGIN
    SELECT b.epoch, b.acquired_at INTO epoch, acquired_at
      FROM pgsingleton.bump_epoch(p_singleton, p_node_id) b;
  EXCEPTION WHEN lock_not_available THEN
    NULL;
  END;
END $$;

-- What operators decide per policy, whether or not a node has run it yet: paused (no run
-- is issued, and a run in flight stops at its next batch), and a run asked for now.
CREATE TABLE pgsingleton.policy_controls (
  singleton text NOT NULL,
  policy text NOT NULL,
  paused boolean NOT NULL DEFAULT false,
  changed_at timestamptz NOT NULL DEFAULT now(),
  changed_by text,
  run_now_at timestamptz,
  PRIMARY KEY (singleton, policy)
);
-- When a policy's schedule began: a policy that never succeeded is overdue from then.
ALTER TABLE pgsingleton.schedules ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();

-- Nodes and the definitions they hold. A node is live while its lock session holds its
-- membership lock (pgsingleton.member_key), read from pg_locks: the server's truth,
-- visible to every role, gone the moment the session is.
CREATE FUNCTION pgsingleton.member_key(singleton text, node_id text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT pgsingleton.lock_key(singleton || E'\n' || node_id) $$;

CREATE TABLE pgsingleton.nodes (
  singleton text NOT NULL,
  node_id text NOT NULL,
  -- the lock session that holds the membership lock; a stale row never matches a live lock
  backend_pid integer NOT NULL,
  member_key bigint NOT NULL,
  registered_at timestamptz NOT NULL DEFAULT now(),
  package_version text,
  PRIMARY KEY (singleton, node_id)
);
CREATE TABLE pgsingleton.node_policies (
  singleton text NOT NULL,
  node_id text NOT NULL,
  policy text NOT NULL,
  fingerprint text NOT NULL,
  definition jsonb NOT NULL,
  PRIMARY KEY (singleton, node_id, policy),
  FOREIGN KEY (singleton, node_id) REFERENCES pgsingleton.nodes ON DELETE CASCADE
);

CREATE VIEW pgsingleton.live_nodes AS
WITH held AS MATERIALIZED (
  SELECT l.pid, (l.classid::bigint << 32) | l.objid::bigint AS key
    FROM pg_locks l
   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT n.singleton, n.node_id, n.backend_pid, n.registered_at, n.package_version
  FROM pgsingleton.nodes n
  JOIN held h ON h.pid = n.backend_pid AND h.key = n.member_key;

-- The fingerprint all live nodes share for a policy, or NULL when they do not all have
-- it with the same definition (or no node is live).
CREATE FUNCTION pgsingleton.agreed_fingerprint(p_singleton text, p_policy text) RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT CASE WHEN count(*) > 0 AND count(np.fingerprint) = count(*)
                   AND count(DISTINCT np.fingerprint) = 1
              THEN min(np.fingerprint) END
    FROM pgsingleton.live_nodes l
    LEFT JOIN pgsingleton.node_policies np
      ON np.singleton = l.singleton AND np.node_id = l.node_id AND np.policy = p_policy
   WHERE l.singleton = p_singleton
$$;

-- Runs: the definition they were issued with, an ownership token, retries, a final status
-- for retries that ran out, and skipped rows.
UPDATE pgsingleton.cleanup_runs
   SET status = 'fenced', finished_at = now(),
       error = 'closed by the upgrade to pgsingleton schema 2; a holder issues the occurrence again'
 WHERE status IN ('scheduled', 'running', 'failed');
ALTER TABLE pgsingleton.cleanup_runs
  DROP CONSTRAINT cleanup_runs_status_check,
  ADD CONSTRAINT cleanup_runs_status_check
    CHECK (status IN ('scheduled', 'running', 'failed', 'done', 'fenced', 'exhausted')),
  ADD COLUMN definition jsonb,
  ADD COLUMN fingerprint text,
  -- claimed by attempt n; every later write of the run names its attempt
  ADD COLUMN attempt integer NOT NULL DEFAULT 0,
  ADD COLUMN failures integer NOT NULL DEFAULT 0,
  ADD COLUMN retry_at timestamptz,
  ADD COLUMN rows_skipped bigint NOT NULL DEFAULT 0,
  -- Runs written by a node of schema 1 carry no definition; new ones must.
  ADD CONSTRAINT cleanup_runs_definition_recorded
    CHECK (definition IS NOT NULL AND fingerprint IS NOT NULL) NOT VALID;
-- A policy never has more than one open run.
CREATE UNIQUE INDEX cleanup_runs_one_open_per_policy
  ON pgsingleton.cleanup_runs (singleton, policy) WHERE status IN ('scheduled', 'running', 'failed');
CREATE INDEX cleanup_runs_policy_finished
  ON pgsingleton.cleanup_runs (singleton, policy, finished_at);

ALTER TABLE pgsingleton.cleanup_batches
  ADD COLUMN rows_skipped integer NOT NULL DEFAULT 0,
  ADD COLUMN cutoff timestamptz,
  ADD COLUMN relation text,
  -- how the rows went: 'delete' (a batch of row deletes), 'drop' or 'detach' (a whole partition)
  ADD COLUMN action text NOT NULL DEFAULT 'delete' CHECK (action IN ('delete', 'drop', 'detach')),
  -- A batch of a schema-1 node records no cut-off: the insert fails and its delete rolls back.
  ADD CONSTRAINT cleanup_batches_cutoff_recorded CHECK (cutoff IS NOT NULL AND relation IS NOT NULL) NOT VALID;

-- The tables a policy's rows live in: the table itself and every table that inherits from
-- it (partitions at any depth, inheritance children), without partitioned parents, which
-- hold no rows, and without partitions being detached (DETACH ... CONCURRENTLY), which
-- queries through the parent no longer see. A batch works on one of them with DELETE FROM
-- ONLY, so a ctid means one row.
CREATE FUNCTION pgsingleton.cleanup_leaves(p_table regclass, p_column text)
RETURNS TABLE (leaf oid, relation text, relkind "char", strategy text, tuples_per_page float8, can_delete boolean)
LANGUAGE sql STABLE AS $$
  WITH RECURSIVE tree(relid) AS (
    SELECT p_table::oid
    UNION
    SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.relid
     WHERE NOT i.inhdetachpending
  )
  SELECT c.oid,
         format('%I.%I', n.nspname, c.relname),
         c.relkind,
         -- an index whose first column is the policy's column serves a walk in column order;
         -- without one, the batches walk the table's pages in order instead
         CASE WHEN EXISTS (
                SELECT 1 FROM pg_index x
                  JOIN pg_class ic ON ic.oid = x.indexrelid
                  JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'btree'
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = p_column AND a.attnum = x.indkey[0]
                 WHERE x.indrelid = c.oid AND x.indisvalid AND x.indpred IS NULL)
              THEN 'index' ELSE 'tidrange' END,
         CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages END,
         has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'DELETE')
    FROM tree
    JOIN pg_class c ON c.oid = tree.relid
    JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'f')
   ORDER BY c.oid
$$;

-- Nodes register their definitions under this lock, exclusively; batches check the
-- agreement under it, shared. A node that registers while a batch is in flight waits for
-- it, and every batch after sees the node.
CREATE FUNCTION pgsingleton.agreement_key(singleton text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT pgsingleton.lock_key(singleton || E'\nagreement') $$;

-- The checks every write of a worker's batch passes first, in its own transaction: the
-- fence (the run's epoch is current), the owner (the run is running under this attempt),
-- the node (the one that claimed it is live), the agreement (every live node holds the
-- run's definition, read under the agreement lock so a node that registers waits), and the
-- operator (the policy is not paused). NULL when all pass; otherwise what stopped it.
-- The run row is locked FOR UPDATE on the way.
CREATE FUNCTION pgsingleton.guard_run(p_run bigint, p_attempt integer,
  OUT outcome text, OUT run pgsingleton.cleanup_runs)
LANGUAGE plpgsql AS $$
BEGIN
  SELECT * INTO run FROM pgsingleton.cleanup_runs r WHERE r.id = p_run;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgsingleton: there is no run %', p_run;
  END IF;
  IF NOT pgsingleton.fence(run.singleton, run.epoch) THEN
    outcome := 'fenced';
    RETURN;
  END IF;
  SELECT * INTO run FROM pgsingleton.cleanup_runs r WHERE r.id = p_run FOR UPDATE;
  IF run.status <> 'running' OR run.attempt <> p_attempt THEN
    outcome := 'superseded';
    RETURN;
  END IF;
  PERFORM pg_advisory_xact_lock_shared(pgsingleton.agreement_key(run.singleton));
  IF NOT EXISTS (SELECT 1 FROM pgsingleton.live_nodes l
                  WHERE l.singleton = run.singleton AND l.node_id = run.node_id) THEN
    outcome := 'not live';
    RETURN;
  END IF;
  IF pgsingleton.agreed_fingerprint(run.singleton, run.policy) IS DISTINCT FROM run.fingerprint THEN
    outcome := 'disagree';
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pgsingleton.policy_controls c
              WHERE c.singleton = run.singleton AND c.policy = run.policy AND c.paused) THEN
    outcome := 'paused';
    RETURN;
  END IF;
END $$;

-- The run's definition checked against the database again, for one leaf: the table
-- exists, the leaf is it or one of its partitions or children (and holds rows), and the
-- column still has the type the policy was checked with. Sets this transaction's TimeZone
-- to the policy's zone (a zone name there only ever reads the zone database, never the
-- session's timezone_abbreviations): timestamp and date values are read in it.
CREATE FUNCTION pgsingleton.resolve_leaf(run pgsingleton.cleanup_runs, p_leaf oid,
  OUT leaf_sql text, OUT parent regclass, OUT cast_to text, OUT pred text, OUT cut timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  def jsonb := run.definition;
  col text := def->>'column';
  col_type text := def->>'columnType';
BEGIN
  parent := to_regclass(format('%I.%I', def->>'schema', def->>'table'));
  IF parent IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_table',
      MESSAGE = format('policy %s: table %I.%I no longer exists', run.policy, def->>'schema', def->>'table');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pgsingleton.cleanup_leaves(parent, col) l WHERE l.leaf = p_leaf AND l.relkind = 'r') THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('policy %s: relation %s is not a table of %s that holds rows (the table itself, or one of its partitions or children)', run.policy, p_leaf::regclass, parent);
  END IF;
  SELECT format('%I.%I', n.nspname, c.relname) INTO leaf_sql
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_leaf;
  IF (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
       WHERE a.attrelid = p_leaf AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped)
     IS DISTINCT FROM col_type THEN
    RAISE EXCEPTION USING ERRCODE = 'datatype_mismatch',
      MESSAGE = format('policy %s: column %I of %s is no longer %s', run.policy, col, leaf_sql, col_type);
  END IF;
  cast_to := CASE col_type WHEN 'timestamp with time zone' THEN 'timestamptz'
                           WHEN 'timestamp without time zone' THEN 'timestamp'
                           WHEN 'date' THEN 'date' END;
  IF cast_to IS NULL OR (col_type <> 'timestamp with time zone' AND def->>'timeZone' IS NULL) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('policy %s: a %s column needs a time zone in the definition', run.policy, col_type);
  END IF;
  cut := pgsingleton.cutoff((def->>'olderThan')::interval);
  PERFORM set_config('TimeZone', coalesce(def->>'timeZone', 'UTC'), true);
  pred := pgsingleton.outdated_predicate(col, col_type);
END $$;

-- A partition whose every row is outdated, removed whole (a policy with "partitions":
-- "drop" or "detach"), in the caller's transaction. Only a partition of a range-partitioned
-- table whose partition key is the policy's column, whose upper bound is at or below the
-- cut-off, and whose rows are all outdated by the same rule as row deletes: checked here,
-- under the lock the removal takes, so no row can come in between. Never a partition that
-- holds a row to keep, never one that a foreign key references (its rows may be held), and
-- never one with DELETE triggers (they would not fire): those are cleaned row by row.
-- The locks are taken parent first, as DROP and DETACH take them (the other order could
-- deadlock with the app's queries), and waited for only briefly (200 ms): an ACCESS
-- EXCLUSIVE request queues the app's queries on the table behind it. A busy partition is
-- kept for a later run. outcome: a guard outcome, 'dropped', 'detached' or 'kept' (reason
-- says why).
CREATE FUNCTION pgsingleton.remove_partition(p_run bigint, p_attempt integer, p_leaf oid,
  OUT outcome text, OUT removed bigint, OUT reason text, OUT cutoff timestamptz, OUT batch integer)
LANGUAGE plpgsql AS $fn$
DECLARE
  g record;
  run pgsingleton.cleanup_runs;
  leaf record;
  mode text;
  col text;
  bound text;
  upper_bound text;
  due boolean;
  all_outdated boolean;
BEGIN
  removed := 0;
  SELECT * INTO g FROM pgsingleton.guard_run(p_run, p_attempt);
  IF g.outcome IS NOT NULL THEN
    outcome := g.outcome;
    RETURN;
  END IF;
  run := g.run;
  mode := run.definition->>'partitions';
  col := run.definition->>'column';
  IF mode IS NULL OR mode NOT IN ('drop', 'detach') THEN
    RAISE EXCEPTION 'pgsingleton.remove_partition: policy % deletes rows, it does not remove partitions', run.policy;
  END IF;
  SELECT * INTO leaf FROM pgsingleton.resolve_leaf(run, p_leaf);
  cutoff := leaf.cut;
  outcome := 'kept';
  SELECT i.inhparent AS parent_oid, format('%I.%I', pn.nspname, pc.relname) AS parent,
         pt.partstrat = 'r' AND pt.partnatts = 1
         AND pt.partattrs[0] = (SELECT a.attnum FROM pg_attribute a
                                 WHERE a.attrelid = i.inhparent AND a.attname = col) AS ok,
         pg_get_expr(c.relpartbound, c.oid) AS bound
    INTO g
    FROM pg_inherits i
    JOIN pg_partitioned_table pt ON pt.partrelid = i.inhparent
    JOIN pg_class pc ON pc.oid = i.inhparent
    JOIN pg_namespace pn ON pn.oid = pc.relnamespace
    JOIN pg_class c ON c.oid = i.inhrelid
   WHERE i.inhrelid = p_leaf AND c.relispartition;
  IF NOT FOUND OR NOT g.ok THEN
    reason := 'it is not a partition of a table partitioned by range on the policy''s column';
    RETURN;
  END IF;
  bound := g.bound;
  -- A default partition (no bound) and one open above (MAXVALUE) are never due.
  upper_bound := substring(bound FROM 'TO \((.*)\)$');
  IF upper_bound IS NULL OR upper_bound ILIKE '%MAXVALUE%' THEN
    reason := format('its bound (%s) has no upper end', bound);
    RETURN;
  END IF;
  -- The bound as PostgreSQL prints it is a quoted literal of the column's type; read in the
  -- policy's zone, like the rows. Every row is below it.
  EXECUTE format('SELECT (%s)::%s::timestamptz <= $1', upper_bound, leaf.cast_to) INTO due USING leaf.cut;
  IF NOT due THEN
    reason := format('its upper bound %s is after the cut-off', upper_bound);
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_constraint k
              WHERE k.contype = 'f' AND k.confrelid IN (p_leaf, g.parent_oid)) THEN
    reason := 'a foreign key references the table, so its rows are deleted one by one (a referenced row stays)';
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_trigger t
              WHERE t.tgrelid IN (p_leaf, g.parent_oid) AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                AND (t.tgtype & 8) <> 0) THEN
    reason := 'it has DELETE triggers, which a removal would not fire, so its rows are deleted one by one';
    RETURN;
  END IF;
  -- Counted before the lock (this read blocks no one): the rows the removal takes.
  EXECUTE format('SELECT count(*) FROM ONLY %s', leaf.leaf_sql) INTO removed;
  PERFORM set_config('lock_timeout', '200', true);
  BEGIN
    EXECUTE format('LOCK TABLE ONLY %s, ONLY %s IN ACCESS EXCLUSIVE MODE', g.parent, leaf.leaf_sql);
    -- Under the lock: the newest value is outdated, and the rule is monotonic in the value
    -- (a later value is never more outdated), so every row is. A range partition holds no
    -- NULL key. The newest value comes off the column's index when there is one.
    EXECUTE format('SELECT coalesce((%s), m.%I IS NULL) FROM (SELECT max(%I) AS %I FROM ONLY %s) m',
                   leaf.pred, col, col, col, leaf.leaf_sql)
      INTO all_outdated USING leaf.cut;
    IF NOT all_outdated THEN
      reason := 'it holds rows younger than the cut-off';
      removed := 0;
      RETURN;
    END IF;
    IF mode = 'drop' THEN
      EXECUTE format('DROP TABLE %s', leaf.leaf_sql);
      outcome := 'dropped';
    ELSE
      EXECUTE format('ALTER TABLE %s DETACH PARTITION %s', g.parent, leaf.leaf_sql);
      outcome := 'detached';
    END IF;
  EXCEPTION
    WHEN lock_not_available THEN
      reason := 'it is busy (its lock was not granted within 200 ms); a later run tries again';
      removed := 0;
      RETURN;
    WHEN dependent_objects_still_exist OR foreign_key_violation THEN
      reason := format('it cannot be removed whole (%s), so its rows are deleted one by one', SQLERRM);
      removed := 0;
      RETURN;
  END;
  UPDATE pgsingleton.cleanup_runs r
     SET rows_deleted = r.rows_deleted + removed, batches = r.batches + 1
   WHERE r.id = p_run
  RETURNING r.batches INTO batch;
  INSERT INTO pgsingleton.cleanup_batches
    (run_id, batch, epoch, began_at, ended_at, rows_deleted, rows_skipped, cutoff, relation, action)
  VALUES (p_run, batch, run.epoch, now(), clock_timestamp(), removed, 0, leaf.cut, leaf.leaf_sql, mode);
END $fn$;

-- The planner's estimate of the share of a leaf's rows that are outdated now (NULL without
-- statistics): a run walks a leaf in page order when the share is large (every page is
-- read once, as a bulk DELETE would), and along the index when it is small.
CREATE FUNCTION pgsingleton.outdated_share(p_leaf oid, p_definition jsonb) RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
  plan jsonb;
  total real;
  leaf_sql text;
BEGIN
  SELECT format('%I.%I', n.nspname, c.relname), c.reltuples INTO leaf_sql, total
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_leaf;
  IF total IS NULL OR total <= 0 THEN
    RETURN NULL;
  END IF;
  PERFORM set_config('TimeZone', coalesce(p_definition->>'timeZone', 'UTC'), true);
  EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM ONLY %s WHERE %s', leaf_sql,
                 pgsingleton.outdated_predicate(p_definition->>'column', p_definition->>'columnType'))
    INTO plan USING pgsingleton.cutoff((p_definition->>'olderThan')::interval);
  RETURN least(1, (plan->0->'Plan'->>'Plan Rows')::double precision / total);
END $$;

-- One batch of a run, in the caller's transaction (one statement: the caller sets
-- lock_timeout and statement_timeout LOCAL in the same message).
--
-- outcome: 'deleted' (progress recorded), 'fenced' (the run's epoch is no longer current),
-- 'superseded' (the run is not running under this attempt), 'disagree' (the live nodes no
-- longer all hold the run's definition), 'not live' (the node that claimed the run holds
-- no membership lock), 'paused' (an operator paused the policy). Only 'deleted' writes
-- anything.
--
-- strategy 'index' walks the leaf in (column, ctid) order from the cursor (p_cursor->'at',
-- the last row's column value and ctid); 'tidrange' walks its pages from the cursor (a
-- tid), p_span pages at a time. Neither takes more than the definition's batchSize rows,
-- and both move past every row they selected, deleted or not. A row version this run's
-- own batches made (a soft-delete trigger that updates the row it refuses to delete moves
-- it further along the walk) is not taken again: p_cursor->'xids' lists the transactions
-- of the batches that left rows in place.
--
-- p_careful: lock only rows no one else holds (FOR UPDATE SKIP LOCKED) and, when the
-- delete fails for reasons tied to rows (a foreign key, a check, a trigger, a lock held on
-- a referencing row), find those rows by trial deletes that are rolled back, skip them,
-- and delete the rest. Rows the delete leaves without an error (a trigger that returns
-- NULL, a rule, a row security policy) are counted as skipped too. The first reason is
-- recorded on the run.
CREATE FUNCTION pgsingleton.cleanup_batch(
  p_run bigint, p_attempt integer, p_leaf oid, p_strategy text, p_cursor jsonb,
  p_limit integer, p_span integer, p_careful boolean,
  OUT outcome text, OUT selected integer, OUT deleted integer, OUT skipped integer,
  OUT next_cursor jsonb, OUT leaf_done boolean, OUT first_error text,
  OUT cutoff timestamptz, OUT batch integer, OUT elapsed_ms double precision, OUT pages integer)
LANGUAGE plpgsql AS $fn$
DECLARE
  g record;
  leaf record;
  run pgsingleton.cleanup_runs;
  def jsonb;
  leaf_sql text;
  col text;
  cast_to text;
  pred text;
  lim integer;
  tids tid[] := '{}';
  gone tid[] := '{}';
  kept tid[];
  still tid[];
  lockable tid[];
  good tid[] := '{}';
  bad tid[] := '{}';
  chunk tid[];
  los integer[];
  his integer[];
  lo integer;
  hi integer;
  mid integer;
  pos jsonb := p_cursor->'at';
  xids xid[] := ARRAY(SELECT x::xid FROM jsonb_array_elements_text(coalesce(p_cursor->'xids', '[]')) AS x);
  from_tid tid;
  to_tid tid;
  last_tid tid;
  blocks bigint;
  delete_sql text;
  message text;
  detail text;
  span integer := greatest(p_span, 1);
  plain boolean;
  done_fast boolean := false;
BEGIN
  outcome := 'deleted'; selected := 0; deleted := 0; skipped := 0; leaf_done := false;
  next_cursor := p_cursor;
  IF cardinality(xids) > 10000 THEN
    -- Ten thousand batches each left rows in place: give this table up until the next run.
    leaf_done := true;
    RETURN;
  END IF;

  SELECT * INTO g FROM pgsingleton.guard_run(p_run, p_attempt);
  IF g.outcome IS NOT NULL THEN
    outcome := g.outcome;
    RETURN;
  END IF;
  run := g.run;
  def := run.definition;
  col := def->>'column';
  SELECT * INTO leaf FROM pgsingleton.resolve_leaf(run, p_leaf);
  leaf_sql := leaf.leaf_sql;
  cast_to := leaf.cast_to;
  pred := leaf.pred;
  cutoff := leaf.cut;

  lim := least(p_limit, (def->>'batchSize')::integer);
  IF lim IS NULL OR lim < 1 THEN
    RAISE EXCEPTION 'pgsingleton.cleanup_batch: the batch limit must be at least 1';
  END IF;
  -- A foreign key that is checked at commit would fail the batch after the fact, where
  -- the rows that hold it can no longer be found; check every constraint per statement.
  SET CONSTRAINTS ALL IMMEDIATE;

  IF p_strategy = 'index' THEN
    -- (column, ctid) order: the cursor passes every row it selected, even where many rows
    -- share one value and some of them stay.
    EXECUTE format(
      'SELECT coalesce(array_agg(ctid ORDER BY v, ctid), ''{}''), count(*)::int,
              (array_agg(jsonb_build_array(to_jsonb(v), ctid::text) ORDER BY v DESC, ctid DESC))[1]
         FROM (SELECT ctid, %1$I AS v FROM ONLY %2$s
                WHERE %3$s %4$s AND xmin <> ALL ($4)
                ORDER BY %1$I, ctid LIMIT $3) picked',
      col, leaf_sql, pred,
      CASE WHEN pos IS NULL THEN ''
           ELSE format('AND %1$I >= ($2->>0)::%2$s AND (%1$I, ctid) > (($2->>0)::%2$s, ($2->>1)::tid)', col, cast_to) END)
      INTO tids, selected, pos
      USING cutoff, pos, lim, xids;
    IF selected = 0 THEN
      pos := p_cursor->'at';
    END IF;
    leaf_done := selected < lim;
  ELSIF p_strategy = 'tidrange' THEN
    from_tid := coalesce((pos #>> '{}')::tid, '(0,0)'::tid);
    blocks := pg_relation_size(p_leaf) / current_setting('block_size')::bigint;
    IF (from_tid::text::point)[0] >= blocks THEN
      leaf_done := true;
      RETURN;
    END IF;
    -- A plain table (no DELETE trigger, no row security, nothing held back before) is
    -- deleted from by page range in one statement, as a bulk DELETE reads it: a TID Range
    -- Scan, each row read once. When the range held more rows than the limit, the delete
    -- is rolled back and the range shrunk, so no batch ever deletes more than the limit.
    plain := NOT p_careful AND cardinality(xids) = 0
      AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                       WHERE t.tgrelid = p_leaf AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                         AND (t.tgtype & 8) <> 0)
      AND NOT (SELECT c.relrowsecurity FROM pg_class c WHERE c.oid = p_leaf);
    WHILE plain AND NOT done_fast LOOP
      to_tid := format('(%s,0)', least((from_tid::text::point)[0]::bigint + span, 4294967295))::tid;
      BEGIN
        EXECUTE format('DELETE FROM ONLY %1$s WHERE ctid >= $2 AND ctid < $3 AND %2$s', leaf_sql, pred)
          USING cutoff, from_tid, to_tid;
        GET DIAGNOSTICS deleted = ROW_COUNT;
        IF deleted > lim THEN
          RAISE SQLSTATE 'PS001';
        END IF;
        done_fast := true;
      EXCEPTION WHEN SQLSTATE 'PS001' THEN
        -- (deleted still holds the count of the rolled-back delete)
        IF span = 1 THEN
          plain := false; -- one page holds more than the limit: row by row below
        ELSE
          span := greatest(1, least(span / 2, (span::bigint * lim / greatest(deleted, 1))::integer));
        END IF;
        deleted := 0;
      END;
    END LOOP;
    IF done_fast THEN
      selected := deleted;
      pages := span;
      pos := to_jsonb(to_tid::text);
      leaf_done := (to_tid::text::point)[0] >= blocks;
      next_cursor := jsonb_build_object('at', pos, 'xids', '[]'::jsonb);
      IF deleted > 0 THEN
        UPDATE pgsingleton.cleanup_runs r
           SET rows_deleted = r.rows_deleted + deleted, batches = r.batches + 1
         WHERE r.id = p_run
        RETURNING r.batches INTO batch;
        INSERT INTO pgsingleton.cleanup_batches
          (run_id, batch, epoch, began_at, ended_at, rows_deleted, rows_skipped, cutoff, relation)
        VALUES (p_run, batch, run.epoch, now(), clock_timestamp(), deleted, 0, cutoff, leaf_sql);
      END IF;
      elapsed_ms := extract(epoch FROM clock_timestamp() - now()) * 1000;
      RETURN;
    END IF;
    to_tid := format('(%s,0)', least((from_tid::text::point)[0]::bigint + span, 4294967295))::tid;
    pages := span;
    EXECUTE format(
      'SELECT coalesce(array_agg(ctid ORDER BY ctid), ''{}''), count(*)::int
         FROM (SELECT ctid FROM ONLY %1$s WHERE ctid >= $2 AND ctid < $3 AND %2$s AND xmin <> ALL ($5)
                ORDER BY ctid LIMIT $4) s',
      leaf_sql, pred)
      INTO tids, selected
      USING cutoff, from_tid, to_tid, lim, xids;
    IF selected >= lim THEN
      last_tid := tids[selected];
      from_tid := format('(%s,%s)', (last_tid::text::point)[0]::bigint, (last_tid::text::point)[1]::bigint + 1)::tid;
    ELSE
      from_tid := to_tid;
    END IF;
    pos := to_jsonb(from_tid::text);
    leaf_done := (from_tid::text::point)[0] >= blocks;
  ELSE
    RAISE EXCEPTION 'pgsingleton.cleanup_batch: unknown strategy %', p_strategy;
  END IF;

  next_cursor := jsonb_build_object('at', pos, 'xids', coalesce(p_cursor->'xids', '[]'));
  IF selected = 0 THEN
    RETURN;
  END IF;

  delete_sql := format(
    'WITH d AS (DELETE FROM ONLY %s WHERE ctid = ANY (ARRAY(SELECT unnest($2::tid[]))) AND %s RETURNING ctid)
     SELECT coalesce(array_agg(ctid), ''{}'') FROM d', leaf_sql, pred);
  IF NOT p_careful THEN
    EXECUTE delete_sql INTO gone USING cutoff, tids;
  ELSE
    -- Rows still outdated, and of those the ones no other transaction holds.
    EXECUTE format('SELECT coalesce(array_agg(ctid), ''{}'') FROM ONLY %s WHERE ctid = ANY (ARRAY(SELECT unnest($2::tid[]))) AND %s', leaf_sql, pred)
      INTO still USING cutoff, tids;
    EXECUTE format('SELECT coalesce(array_agg(ctid), ''{}'') FROM (SELECT ctid FROM ONLY %s WHERE ctid = ANY (ARRAY(SELECT unnest($2::tid[]))) AND %s FOR UPDATE SKIP LOCKED) s', leaf_sql, pred)
      INTO lockable USING cutoff, still;
    bad := ARRAY(SELECT unnest(still) EXCEPT SELECT unnest(lockable));
    IF cardinality(bad) > 0 THEN
      first_error := format('%s row(s) of %s were locked by other transactions; they are left for a later run', cardinality(bad), leaf_sql);
    END IF;
    -- Locks held on referencing rows (checked by foreign keys) are waited for only briefly here.
    PERFORM set_config('lock_timeout',
      CASE WHEN current_setting('lock_timeout') = '0' THEN '100'
           ELSE least(100, ceil(extract(epoch FROM current_setting('lock_timeout')::interval) * 1000))::text END,
      true);
    BEGIN
      EXECUTE delete_sql INTO gone USING cutoff, lockable;
    EXCEPTION
      WHEN integrity_constraint_violation OR raise_exception OR assert_failure OR lock_not_available
        OR deadlock_detected OR data_exception OR triggered_action_exception OR triggered_data_change_violation THEN
        GET STACKED DIAGNOSTICS message = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
        first_error := coalesce(first_error, message || coalesce(' (' || nullif(detail, '') || ')', ''));
        -- Halve until the rows that fail are alone. Each trial is rolled back (PS000), so
        -- the transaction never collects committed subtransactions; then the good rows go
        -- in one delete.
        los := ARRAY[]::integer[]; his := ARRAY[]::integer[];
        IF cardinality(lockable) = 1 THEN
          bad := bad || lockable;
        ELSE
          mid := cardinality(lockable) / 2;
          los := ARRAY[1, mid + 1]; his := ARRAY[mid, cardinality(lockable)];
        END IF;
        WHILE cardinality(los) > 0 LOOP
          lo := los[cardinality(los)]; hi := his[cardinality(his)];
          los := los[1:cardinality(los) - 1]; his := his[1:cardinality(his) - 1];
          chunk := lockable[lo:hi];
          BEGIN
            EXECUTE delete_sql USING cutoff, chunk;
            RAISE SQLSTATE 'PS000';
          EXCEPTION
            WHEN SQLSTATE 'PS000' THEN
              good := good || chunk;
            WHEN integrity_constraint_violation OR raise_exception OR assert_failure OR lock_not_available
              OR deadlock_detected OR data_exception OR triggered_action_exception OR triggered_data_change_violation THEN
              IF lo = hi THEN
                bad := bad || chunk;
              ELSE
                mid := (lo + hi) / 2;
                los := los || ARRAY[lo, mid + 1]; his := his || ARRAY[mid, hi];
              END IF;
          END;
        END LOOP;
        IF cardinality(good) > 0 THEN
          BEGIN
            EXECUTE delete_sql INTO gone USING cutoff, good;
          EXCEPTION
            WHEN integrity_constraint_violation OR raise_exception OR assert_failure OR lock_not_available
              OR deadlock_detected OR data_exception OR triggered_action_exception OR triggered_data_change_violation THEN
              bad := bad || good;
          END;
        END IF;
    END;
  END IF;
  deleted := cardinality(gone);
  -- Selected, not refused with an error, yet not deleted: kept by a trigger that returned
  -- NULL (a soft delete, which may also have moved the row), a rule or a row security
  -- policy, or changed by another transaction since it was selected.
  kept := ARRAY(SELECT unnest(tids) EXCEPT SELECT unnest(gone) EXCEPT SELECT unnest(bad));
  IF cardinality(kept) > 0 THEN
    first_error := coalesce(first_error, format('%s row(s) of %s were left in place by the delete itself (a trigger, a rule or a row security policy), or changed by another transaction meanwhile, without an error', cardinality(kept), leaf_sql));
    next_cursor := jsonb_set(next_cursor, '{xids}',
      (next_cursor->'xids') || to_jsonb(xid(pg_current_xact_id())::text));
  END IF;
  skipped := cardinality(bad) + cardinality(kept);

  UPDATE pgsingleton.cleanup_runs r
     SET rows_deleted = r.rows_deleted + deleted,
         rows_skipped = r.rows_skipped + skipped,
         batches = r.batches + 1,
         error = coalesce(r.error, first_error)
   WHERE r.id = p_run
  RETURNING r.batches INTO batch;
  INSERT INTO pgsingleton.cleanup_batches
    (run_id, batch, epoch, began_at, ended_at, rows_deleted, rows_skipped, cutoff, relation)
  VALUES (p_run, batch, run.epoch, now(), clock_timestamp(), deleted, skipped, cutoff, leaf_sql);
  elapsed_ms := extract(epoch FROM clock_timestamp() - now()) * 1000;
END $fn$;

-- One row per policy: whether the live nodes agree on it, whether it is paused, its
-- schedule, its last run, its last success and error, what it deleted in the last day,
-- and whether it is overdue (no success for more than twice its interval). Times are
-- timestamptz. pgsingleton.status stays lean for tight polling loops; this is the
-- per-policy view.
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
                   ORDER BY node_id) AS node_definitions
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
                AND coalesce(ok.finished_at, s.created_at) < now() - 2 * s.every, false) AS overdue
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

-- What a policy would delete now, table by table, without deleting: the exact count of
-- outdated rows, the oldest, and how the batches would find them (the plan of the
-- batch's own selection). Run it in a read-only transaction; it sets TimeZone to the
-- policy's zone for that transaction, as batches do.
CREATE FUNCTION pgsingleton.plan_leaf(p_leaf oid, p_definition jsonb, p_strategy text,
  OUT outdated bigint, OUT oldest text, OUT access text)
LANGUAGE plpgsql AS $fn$
DECLARE
  leaf_sql text;
  col text := p_definition->>'column';
  pred text := pgsingleton.outdated_predicate(p_definition->>'column', p_definition->>'columnType');
  cut timestamptz := pgsingleton.cutoff((p_definition->>'olderThan')::interval);
  plan jsonb;
BEGIN
  SELECT format('%I.%I', n.nspname, c.relname) INTO leaf_sql
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_leaf;
  PERFORM set_config('TimeZone', coalesce(p_definition->>'timeZone', 'UTC'), true);
  EXECUTE format('SELECT count(*), min(%1$I)::text FROM ONLY %2$s WHERE %3$s', col, leaf_sql, pred)
    INTO outdated, oldest USING cut;
  EXECUTE format(
    'EXPLAIN (FORMAT JSON) SELECT ctid FROM ONLY %2$s WHERE %3$s %4$s LIMIT %5$s',
    col, leaf_sql, pred,
    CASE WHEN p_strategy = 'index' THEN format('ORDER BY %I, ctid', col)
         ELSE format('AND ctid >= %L::tid AND ctid < %L::tid ORDER BY ctid', '(0,0)', '(32,0)') END,
    (p_definition->>'batchSize')::integer)
    INTO plan USING cut;
  SELECT string_agg(DISTINCT CASE WHEN n ? 'Index Name' THEN format('%s on %s', n->>'Node Type', n->>'Index Name')
                                  ELSE n->>'Node Type' END, ', ')
    INTO access
    FROM jsonb_path_query(plan, 'strict $.**') AS n
   WHERE jsonb_typeof(n) = 'object' AND n ? 'Node Type'
     AND n->>'Node Type' IN ('Index Scan', 'Index Only Scan', 'Bitmap Index Scan', 'Seq Scan', 'Tid Range Scan', 'Tid Scan');
END $fn$;
$pgsingleton_step$;
  IF EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('pgsingleton.meta') AND attname = 'revision' AND NOT attisdropped) THEN
    EXECUTE 'UPDATE pgsingleton.meta SET revision = 2';
  END IF;
END $pgsingleton_migration$;
