/**
 * Schema revision 9: a leaf is locked before it is judged, and judged again in each batch.
 *
 * - `pgsingleton.resolve_leaf` (same signature; cleanup_batch calls it first) locks the
 *   leaf (ROW EXCLUSIVE, what the batch's DELETE takes anyway, within the batch's
 *   lock_timeout) before it checks that the leaf still belongs to the policy's table.
 *   Revision 8 checked first: a partition detached by a transaction not yet committed still
 *   looked attached, the batch then waited for its lock, and deleted from what had become a
 *   table of its own by the time it ran. Under the lock no DETACH, DROP, NO INHERIT, ADD
 *   FOREIGN KEY or CREATE RULE on the leaf can commit before the batch does, so what it
 *   checks holds until its commit. The lock is taken by the leaf's name and the name read
 *   back to the same OID, so a rename in between locks nothing it does not check.
 * - Under that lock, every batch checks what start-up checked once: no foreign key that
 *   references the leaf deletes or changes rows (ON DELETE CASCADE, SET NULL, SET DEFAULT)
 *   unless the policy says allowCascade (found through the keys' triggers on the leaf, an
 *   index lookup), and no DELETE rule on the leaf or on the tables between it and the
 *   policy's table. A key added by the
 *   app's migration while nodes run (a rolling deploy) stopped the new nodes at start but
 *   not the running holder, whose batches went on cascading into young rows. Keys declared
 *   on a sub-partition that is itself partitioned are caught too: their clones reference
 *   the leaf.
 * - Row-level security: a batch deletes FROM ONLY the leaf, which applies the leaf's own
 *   policies and not those of the tables above it. A leaf with an ancestor (on any path:
 *   a second parent, the tables above the policy's table) whose row security applies to
 *   the current role is refused (the rows its DELETE policy keeps would go); start-up
 *   refuses the same, read from every leaf.
 * - `pgsingleton.remove_partition` judges the partition first with no lock of its own (the
 *   count's ACCESS SHARE, as in revision 2), takes its ACCESS EXCLUSIVE locks parent first,
 *   and only then checks, under them, that both tables are still the ones it named, that
 *   the partition is attached to that parent and not being detached, and what a batch
 *   checks (resolve_leaf). It keeps a partition whose rows row-level security applies to
 *   for the current role (a DELETE policy may keep some; row deletes honour it). And the
 *   newest value being outdated no longer stands for every value of a `timestamp` read in
 *   a zone: a wall time inside a daylight-saving gap, which never happened, reads as a
 *   later instant than the values just above it (02:45 in New York's gap as 07:45 UTC,
 *   after 03:10's 07:10). The minutes of the two days below the newest value that do not
 *   exist in the zone (or border on a gap that starts or ends inside a minute, as the
 *   historical ones from local mean time do) are found by arithmetic, and the rows in them
 *   read off the index; without an index, one pass over the partition checks each value
 *   that does not exist. No zone's clocks ever jumped by a day, so a gap value further
 *   down reads earlier than the newest value. An infinite newest value has no gap. A first version of this revision locked the leaf before the removal's
 *   own locks (an app's CREATE INDEX on the table could then deadlock with it) and scanned
 *   every row of those two days under the table's ACCESS EXCLUSIVE lock (1.5 to 1.9 s for
 *   a daily partition of 5,000,000 rows, where revision 8 took 0.2 s); a review measured
 *   both, and neither is in this revision. A second review found the probe's first form
 *   looping on an infinite value, scanning the partition once per missing minute without
 *   an index, and missing a gap that starts inside a minute; all three are mended here.
 * - `pgsingleton.schedules.anchor` (new, NULL where an earlier version wrote the row): an
 *   every grid's first slot. A calendar interval (months, years) counts its slots from it,
 *   `anchor + k * every`: added slot after slot, a grid started on the 31st stuck at the
 *   28th after February, and a year from the 29th of February at the 28th. Nodes of
 *   earlier revisions leave it alone and advance as before.
 * - `pgsingleton.leaf_rule` (new): a run's rule (its cut-off, the predicate, the zone its
 *   values are read in), for the checks made before any lock.
 * - Nodes of revision 5 to 8 run on it unchanged (`schema_version` stays 3), and get the
 *   same checks; this version's nodes need revision 9.
 *
 * Raw SQL on purpose, as in 0001.
 */
import { UP as REVISION_2 } from './0002_safe_deletes.js'
import { excerpt } from './excerpt.js'

const RESOLVE_2 = excerpt(
  REVISION_2,
  'CREATE FUNCTION pgsingleton.resolve_leaf(',
  'END $$;',
).replace('CREATE FUNCTION', 'CREATE OR REPLACE FUNCTION')

const REMOVE_2 = excerpt(
  REVISION_2,
  'CREATE FUNCTION pgsingleton.remove_partition(',
  'END $fn$;',
).replace('CREATE FUNCTION', 'CREATE OR REPLACE FUNCTION')

const LEAF_RULE_9 = `CREATE OR REPLACE FUNCTION pgsingleton.leaf_rule(run pgsingleton.cleanup_runs,
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
END $$;`

const RESOLVE_9 = `CREATE OR REPLACE FUNCTION pgsingleton.resolve_leaf(run pgsingleton.cleanup_runs, p_leaf oid,
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
END $$;`

const REMOVE_9 = `CREATE OR REPLACE FUNCTION pgsingleton.remove_partition(p_run bigint, p_attempt integer, p_leaf oid,
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
  upper_bound := substring(bound FROM 'TO \\((.*)\\)$');
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
END $fn$;`

export const UP = `
-- A leaf locked before it is judged, and judged again in each batch (see
-- migrations/0009_locked_leaves.ts).
${LEAF_RULE_9}

-- An every grid's first slot: a calendar interval (months, years) counts its slots from it.
ALTER TABLE pgsingleton.schedules ADD COLUMN IF NOT EXISTS anchor timestamptz;

${RESOLVE_9}

${REMOVE_9}
`

export const DOWN = `
${RESOLVE_2}

${REMOVE_2}

DROP FUNCTION IF EXISTS pgsingleton.leaf_rule(pgsingleton.cleanup_runs);
ALTER TABLE pgsingleton.schedules DROP COLUMN IF EXISTS anchor;
`
