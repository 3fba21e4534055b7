-- pg-singleton schema step 9 (pgsingleton_0009_locked_leaves).
-- Safe to run by any route, any number of times, at the same moment as another route:
-- it applies only on top of step 8 and records 9 in pgsingleton.meta.
DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(-7089759982357046742);
  IF to_regclass('pgsingleton.meta') IS NOT NULL THEN
    EXECUTE 'SELECT CASE WHEN m.schema_version >= 3
  THEN greatest(coalesce((to_jsonb(m)->>''revision'')::integer, 0), m.schema_version) ELSE m.schema_version END FROM pgsingleton.meta m' INTO found;
  END IF;
  IF found >= 9 THEN
    RETURN; -- applied already, by this route or another
  END IF;
  IF found < 8 THEN
    RAISE EXCEPTION 'pg-singleton: schema step 9 needs step 8 first; the database has %', found;
  END IF;
  EXECUTE $pgsingleton_step$
-- A leaf locked before it is judged, and judged again in each batch (see
-- migrations/0009_locked_leaves.ts).
CREATE OR REPLACE FUNCTION pgsingleton.leaf_rule(run pgsingleton.cleanup_runs,
  OUT cast_to text, OUT pred text, OUT cut timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  def jsonb := run.definition;
  col_type text := def->>'columnType';
BEGIN
  cast_to := CASE col_type WHEN 'timestamp with time zone' THEN 'timestamptz'
                           WHEN 'timestamp without time zone' THEN 'timestamp'
                           WHEN 'date' THEN 'date' END;
  IF cast_to IS NULL OR (col_type <> 'timestamp with time zone' AND def->>'timeZone' IS NULL) THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('policy %s: a %s column needs a time zone in the definition', run.policy, col_type);
  END IF;
  cut := pgsingleton.cutoff((def->>'olderThan')::interval);
  PERFORM set_config('TimeZone', coalesce(def->>'timeZone', 'UTC'), true);
  pred := pgsingleton.outdated_predicate(def->>'column', col_type);
END $$;

-- An every grid's first slot: a calendar interval (months, years) counts its slots from it.
ALTER TABLE pgsingleton.schedules ADD COLUMN IF NOT EXISTS anchor timestamptz;

CREATE OR REPLACE FUNCTION pgsingleton.resolve_leaf(run pgsingleton.cleanup_runs, p_leaf oid,
  OUT leaf_sql text, OUT parent regclass, OUT cast_to text, OUT pred text, OUT cut timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  def jsonb := run.definition;
  col text := def->>'column';
  col_type text := def->>'columnType';
  held text;
  between_tables oid[];
BEGIN
  parent := to_regclass(format('%I.%I', def->>'schema', def->>'table'));
  IF parent IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'undefined_table',
      MESSAGE = format('policy %s: table %I.%I no longer exists', run.policy, def->>'schema', def->>'table');
  END IF;
  SELECT format('%I.%I', n.nspname, c.relname) INTO leaf_sql
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_leaf;
  IF leaf_sql IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('policy %s: relation %s no longer exists', run.policy, p_leaf);
  END IF;
  -- Locked before it is judged: what is checked below cannot change before the commit.
  EXECUTE format('LOCK TABLE ONLY %s IN ROW EXCLUSIVE MODE', leaf_sql);
  IF to_regclass(leaf_sql) IS DISTINCT FROM p_leaf THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('policy %s: relation %s was renamed or replaced while the batch waited for it', run.policy, leaf_sql);
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pgsingleton.cleanup_leaves(parent, col) l WHERE l.leaf = p_leaf AND l.relkind = 'r') THEN
    RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
      MESSAGE = format('policy %s: relation %s is not a table of %s that holds rows (the table itself, or one of its partitions or children)', run.policy, leaf_sql, parent);
  END IF;
  -- Foreign keys that act on a delete, found through their triggers on the leaf (an index
  -- lookup; pg_constraint has none on the referenced table).
  SELECT string_agg(DISTINCT format('%s (%s)', k.conname, k.conrelid::regclass), ', ') INTO held
    FROM pg_trigger t JOIN pg_constraint k ON k.oid = t.tgconstraint
   WHERE t.tgrelid = p_leaf AND k.contype = 'f' AND k.confrelid = p_leaf AND k.confdeltype IN ('c', 'n', 'd');
  IF held IS NOT NULL AND NOT coalesce((def->>'allowCascade')::boolean, false) THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('policy %s: foreign keys that reference %s delete or change rows of other tables when its rows go (%s); nothing was deleted. Say "allowCascade": true if young rows of those tables may go with them, or drop the keys', run.policy, leaf_sql, held);
  END IF;
  -- DELETE rules: the leaf's, and those of the tables from its parent up to the policy's
  -- table, on every path between them (a delete through the policy's table would fire
  -- that table's; one from the leaf fires none of theirs).
  WITH RECURSIVE up(relid, path) AS (
    SELECT i.inhparent, ARRAY[i.inhparent] FROM pg_inherits i WHERE i.inhrelid = p_leaf AND p_leaf <> parent
    UNION ALL
    SELECT i.inhparent, up.path || i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.relid
     WHERE up.relid <> parent
  )
  SELECT array_agg(DISTINCT above) INTO between_tables
    FROM up, unnest(up.path) AS above WHERE up.relid = parent;
  SELECT string_agg(format('%s (%s)', r.rulename, r.ev_class::regclass), ', ') INTO held
    FROM pg_rewrite r
   WHERE r.ev_type = '4' AND (r.ev_class = p_leaf OR r.ev_class = ANY (coalesce(between_tables, '{}')));
  IF held IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('policy %s: DELETE rules on %s or the tables above it (%s) could do anything; nothing was deleted', run.policy, leaf_sql, held);
  END IF;
  -- Row security: every table above the leaf, on any path (a second parent outside the
  -- policy's tree too, and the tables above the policy's table): each one's policies guard
  -- the leaf's rows when they are read or deleted through it, and a delete from the leaf
  -- skips them all. Start-up refuses the same set.
  WITH RECURSIVE up(relid) AS (
    SELECT i.inhparent FROM pg_inherits i WHERE i.inhrelid = p_leaf
    UNION
    SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.relid
  )
  SELECT string_agg(up.relid::regclass::text, ', ') INTO held FROM up WHERE row_security_active(up.relid);
  IF held IS NOT NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('policy %s: row-level security on %s applies to this role, and pg-singleton deletes from %s directly, where those policies would not apply; nothing was deleted. Clean with a role they do not apply to (the owner, or BYPASSRLS), or put the policies on the partitions', run.policy, held, leaf_sql);
  END IF;
  IF (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
       WHERE a.attrelid = p_leaf AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped)
     IS DISTINCT FROM col_type THEN
    RAISE EXCEPTION USING ERRCODE = 'datatype_mismatch',
      MESSAGE = format('policy %s: column %I of %s is no longer %s', run.policy, col, leaf_sql, col_type);
  END IF;
  SELECT r.cast_to, r.pred, r.cut INTO cast_to, pred, cut FROM pgsingleton.leaf_rule(run) r;
END $$;

CREATE OR REPLACE FUNCTION pgsingleton.remove_partition(p_run bigint, p_attempt integer, p_leaf oid,
  OUT outcome text, OUT removed bigint, OUT reason text, OUT cutoff timestamptz, OUT batch integer)
LANGUAGE plpgsql AS $fn$
DECLARE
  g record;
  run pgsingleton.cleanup_runs;
  rule record;
  leaf record;
  leaf_name text;
  mode text;
  col text;
  bound text;
  upper_bound text;
  due boolean;
  all_outdated boolean;
  newest text;
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
  -- Judged first with no lock of its own (the count's ACCESS SHARE at most, which no app
  -- DDL queues behind), then again under the removal's locks, taken parent first.
  SELECT * INTO rule FROM pgsingleton.leaf_rule(run);
  cutoff := rule.cut;
  outcome := 'kept';
  SELECT format('%I.%I', n.nspname, c.relname) INTO leaf_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_leaf;
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
   WHERE i.inhrelid = p_leaf AND c.relispartition AND NOT i.inhdetachpending;
  IF leaf_name IS NULL OR NOT FOUND OR NOT g.ok THEN
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
  EXECUTE format('SELECT (%s)::%s::timestamptz <= $1', upper_bound, rule.cast_to) INTO due USING rule.cut;
  IF NOT due THEN
    reason := format('its upper bound %s is after the cut-off', upper_bound);
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_constraint k
              WHERE k.contype = 'f' AND k.confrelid IN (p_leaf, g.parent_oid)) THEN
    reason := 'a foreign key references the table, so its rows are deleted one by one (a referenced row stays)';
    RETURN;
  END IF;
  IF row_security_active(p_leaf) OR row_security_active(g.parent_oid) THEN
    reason := 'row-level security applies to it for this role (a DELETE policy may keep some of its rows), so its rows are deleted one by one';
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_trigger t
              WHERE t.tgrelid IN (p_leaf, g.parent_oid) AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                AND (t.tgtype & 8) <> 0) THEN
    reason := 'it has DELETE triggers, which a removal would not fire, so its rows are deleted one by one';
    RETURN;
  END IF;
  -- Counted before the lock (this read blocks no one): the rows the removal takes.
  EXECUTE format('SELECT count(*) FROM ONLY %s', leaf_name) INTO removed;
  PERFORM set_config('lock_timeout', '200', true);
  BEGIN
    EXECUTE format('LOCK TABLE ONLY %s, ONLY %s IN ACCESS EXCLUSIVE MODE', g.parent, leaf_name);
    -- Under the lock: the same tables by the same names, the partition still attached to
    -- that table and not being detached, and what a batch checks (the policy's table, keys,
    -- rules, row security).
    IF to_regclass(g.parent) IS DISTINCT FROM g.parent_oid OR to_regclass(leaf_name) IS DISTINCT FROM p_leaf
       OR NOT EXISTS (SELECT 1 FROM pg_inherits i
                       WHERE i.inhrelid = p_leaf AND i.inhparent = g.parent_oid AND NOT i.inhdetachpending) THEN
      reason := 'it was detached, moved or renamed while the run waited for it';
      removed := 0;
      RETURN;
    END IF;
    SELECT * INTO leaf FROM pgsingleton.resolve_leaf(run, p_leaf);
    -- The newest value is outdated, and the rule is monotonic in the value (a later value
    -- is never more outdated), so every row is. A range partition holds no NULL key. The
    -- newest value comes off the column's index when there is one.
    EXECUTE format('SELECT coalesce((%s), m.%I IS NULL), m.%I::text FROM (SELECT max(%I) AS %I FROM ONLY %s) m',
                   leaf.pred, col, col, col, col, leaf.leaf_sql)
      INTO all_outdated, newest USING leaf.cut;
    -- Not quite, for a timestamp read in a zone: a wall time inside a daylight-saving gap,
    -- which never happened, reads as a later instant than the values just above it (02:45
    -- in New York's gap as 07:45 UTC, after 03:10's 07:10). Such values within two days
    -- below the newest are checked, gap by gap, off the index: no zone's clocks ever jumped
    -- by a day, so a gap value further down reads earlier than the newest value.
    IF all_outdated AND newest IS NOT NULL AND leaf.cast_to = 'timestamp' AND isfinite(newest::timestamp) THEN
      IF EXISTS (SELECT 1 FROM pgsingleton.cleanup_leaves(leaf.parent, col) l
                  WHERE l.leaf = p_leaf AND l.strategy = 'index') THEN
        -- Off the index, minute by minute: the minutes that do not exist in the zone, the
        -- minute before one (a gap that starts inside it), and those the offset changes
        -- within (a gap shorter than a minute).
        EXECUTE format(
          'SELECT NOT EXISTS (
             SELECT 1 FROM generate_series(date_trunc(''minute'', $2::timestamp) - interval ''2 days'', $2::timestamp,
                                           interval ''1 minute'') AS pgs_gap_minutes(pgs_minute)
              CROSS JOIN LATERAL (SELECT 1 FROM ONLY %s AS pgs_leaf
                                   WHERE pgs_leaf.%I >= pgs_gap_minutes.pgs_minute
                                     AND pgs_leaf.%I < pgs_gap_minutes.pgs_minute + interval ''1 minute''
                                     AND NOT coalesce((%s), false) LIMIT 1) AS pgs_younger
              WHERE pgs_gap_minutes.pgs_minute::timestamptz::timestamp <> pgs_gap_minutes.pgs_minute
                 OR (pgs_gap_minutes.pgs_minute + interval ''1 minute'')::timestamptz::timestamp
                    <> pgs_gap_minutes.pgs_minute + interval ''1 minute''
                 OR (pgs_gap_minutes.pgs_minute + interval ''1 minute'')::timestamptz
                    - pgs_gap_minutes.pgs_minute::timestamptz <> interval ''1 minute'')',
          leaf.leaf_sql, col, col, leaf.pred)
          INTO all_outdated USING leaf.cut, newest;
      ELSE
        -- No index: one pass over the partition, as the newest value's own read was.
        EXECUTE format(
          'SELECT NOT EXISTS (SELECT 1 FROM ONLY %s
                               WHERE %I >= $2::timestamp - interval ''2 days''
                                 AND %I::timestamptz::timestamp <> %I AND NOT coalesce((%s), false))',
          leaf.leaf_sql, col, col, col, leaf.pred)
          INTO all_outdated USING leaf.cut, newest;
      END IF;
    END IF;
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
$pgsingleton_step$;
  IF EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('pgsingleton.meta') AND attname = 'revision' AND NOT attisdropped) THEN
    EXECUTE 'UPDATE pgsingleton.meta SET revision = 9';
  END IF;
END $pgsingleton_migration$;
