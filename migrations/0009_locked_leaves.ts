/**
 * Schema revision 9: a leaf is locked before it is judged, and judged again in each batch.
 *
 * - `pgsingleton.resolve_leaf` (same signature; cleanup_batch and remove_partition call it
 *   first) locks the leaf (ROW EXCLUSIVE, what the batch's DELETE takes anyway, within the
 *   batch's lock_timeout) before it checks that the leaf still belongs to the policy's
 *   table. Revision 8 checked first: a partition detached by a transaction not yet
 *   committed still looked attached, the batch then waited for its lock, and deleted from
 *   (or remove_partition dropped) what had become a table of its own by the time it ran.
 *   Under the lock no DETACH, DROP, NO INHERIT, ADD FOREIGN KEY or CREATE RULE on the leaf
 *   can commit before the batch does, so what it checks holds until its commit. The lock
 *   is taken by the leaf's name and the name read back to the same OID, so a rename in
 *   between locks nothing it does not check.
 * - Under that lock, every batch checks what start-up checked once: no foreign key that
 *   references the leaf deletes or changes rows (ON DELETE CASCADE, SET NULL, SET DEFAULT)
 *   unless the policy says allowCascade, and no DELETE rule. A key added by the app's
 *   migration while nodes run (a rolling deploy) stopped the new nodes at start but not
 *   the running holder, whose batches went on cascading into young rows. Foreign keys on
 *   a sub-partition that is itself partitioned are caught too: their clones reference the
 *   leaf.
 * - Row-level security: a batch deletes FROM ONLY the leaf, which applies the leaf's own
 *   policies and not those of the tables above it. A leaf with an ancestor whose row
 *   security applies to the current role is refused (the rows its DELETE policy keeps
 *   would go).
 * - `pgsingleton.remove_partition` keeps a partition whose rows row-level security
 *   applies to for the current role (a DELETE policy may keep some; row deletes honour
 *   it), checks again under its ACCESS EXCLUSIVE lock that the partition is attached to
 *   the parent it read (and not being detached), and checks the newest day of values row
 *   by row: the rule is monotonic in the value except inside a daylight-saving gap, where
 *   a wall time that does not exist is read as a later instant than values just above it
 *   (02:45 in New York's gap reads as 07:45 UTC, after 03:10's 07:10), so a `timestamp`
 *   partition whose newest value is outdated could hold one that is not. No zone ever
 *   moved its clocks by more than a day at once, so rows more than two days below the
 *   newest value are outdated when it is.
 * - Nodes of revision 5 to 8 run on it unchanged (`schema_version` stays 3), and get the
 *   same checks; this version's nodes need revision 9.
 *
 * Raw SQL on purpose, as in 0001; remove_partition is derived from revision 2's by the
 * edits below, each of which must apply once.
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

/** Replaces `from` by `to` in `text`, where `from` occurs exactly once. */
function edit(text: string, from: string, to: string): string {
  const at = text.indexOf(from)
  if (at < 0 || text.indexOf(from, at + 1) >= 0)
    throw new Error(`revision 2's remove_partition has not exactly one ${JSON.stringify(from)}`)
  return text.slice(0, at) + to + text.slice(at + from.length)
}

const RESOLVE_9 = `CREATE OR REPLACE FUNCTION pgsingleton.resolve_leaf(run pgsingleton.cleanup_runs, p_leaf oid,
  OUT leaf_sql text, OUT parent regclass, OUT cast_to text, OUT pred text, OUT cut timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  def jsonb := run.definition;
  col text := def->>'column';
  col_type text := def->>'columnType';
  held text;
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
  SELECT string_agg(format('%s (%s)', k.conname, k.conrelid::regclass), ', ') INTO held
    FROM pg_constraint k
   WHERE k.contype = 'f' AND k.confrelid = p_leaf AND k.confdeltype IN ('c', 'n', 'd');
  IF held IS NOT NULL AND NOT coalesce((def->>'allowCascade')::boolean, false) THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('policy %s: foreign keys that reference %s delete or change rows of other tables when its rows go (%s); nothing was deleted. Say "allowCascade": true if young rows of those tables may go with them, or drop the keys', run.policy, leaf_sql, held);
  END IF;
  IF EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = p_leaf AND r.ev_type = '4') THEN
    RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
      MESSAGE = format('policy %s: %s has a DELETE rule, which could do anything; nothing was deleted', run.policy, leaf_sql);
  END IF;
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
END $$;`

const REMOVE_9 = [
  [
    `  IF EXISTS (SELECT 1 FROM pg_trigger t`,
    `  IF row_security_active(p_leaf) OR row_security_active(g.parent_oid) THEN
    reason := 'row-level security applies to it for this role (a DELETE policy may keep some of its rows), so its rows are deleted one by one';
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_trigger t`,
  ],
  [
    `    EXECUTE format('LOCK TABLE ONLY %s, ONLY %s IN ACCESS EXCLUSIVE MODE', g.parent, leaf.leaf_sql);
`,
    `    EXECUTE format('LOCK TABLE ONLY %s, ONLY %s IN ACCESS EXCLUSIVE MODE', g.parent, leaf.leaf_sql);
    -- Still a partition of the parent read before the lock, and not being detached.
    IF NOT EXISTS (SELECT 1 FROM pg_inherits i
                    WHERE i.inhrelid = p_leaf AND i.inhparent = g.parent_oid AND NOT i.inhdetachpending) THEN
      reason := 'it was detached or moved while the run waited for it';
      removed := 0;
      RETURN;
    END IF;
`,
  ],
  [
    `    IF NOT all_outdated THEN`,
    `    -- The rule is not monotonic inside a daylight-saving gap (a wall time that does not
    -- exist reads as a later instant than those just above it): the newest two days of
    -- values are checked row by row, off the column's index when there is one.
    IF all_outdated THEN
      EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM ONLY %s WHERE %I >= (SELECT max(%I) FROM ONLY %s) - interval ''2 days'' AND NOT coalesce((%s), false))',
                     leaf.leaf_sql, col, col, leaf.leaf_sql, leaf.pred)
        INTO all_outdated USING leaf.cut;
    END IF;
    IF NOT all_outdated THEN`,
  ],
].reduce((text, [from, to]) => edit(text, from as string, to as string), REMOVE_2)

export const UP = `
-- A leaf locked before it is judged, and judged again in each batch (see
-- migrations/0009_locked_leaves.ts).
${RESOLVE_9}

${REMOVE_9}
`

export const DOWN = `
${RESOLVE_2}

${REMOVE_2}
`
