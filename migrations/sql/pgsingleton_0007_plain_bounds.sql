-- pg-singleton schema step 7 (pgsingleton_0007_plain_bounds).
-- Safe to run by any route, any number of times, at the same moment as another route:
-- it applies only on top of step 6 and records 7 in pgsingleton.meta.
DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(-7089759982357046742);
  IF to_regclass('pgsingleton.meta') IS NOT NULL THEN
    EXECUTE 'SELECT CASE WHEN m.schema_version >= 3
  THEN greatest(coalesce((to_jsonb(m)->>''revision'')::integer, 0), m.schema_version) ELSE m.schema_version END FROM pgsingleton.meta m' INTO found;
  END IF;
  IF found >= 7 THEN
    RETURN; -- applied already, by this route or another
  END IF;
  IF found < 6 THEN
    RAISE EXCEPTION 'pg-singleton: schema step 7 needs step 6 first; the database has %', found;
  END IF;
  EXECUTE $pgsingleton_step$
-- One batch of a run: revision 6's function, its bound read by two plain index scans
-- (see migrations/0007_plain_bounds.ts).
CREATE OR REPLACE FUNCTION pgsingleton.cleanup_batch(
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
  good_lo integer[] := '{}';
  good_hi integer[] := '{}';
  bad tid[] := '{}';
  chunk tid[];
  los integer[];
  his integer[];
  lo integer;
  hi integer;
  mid integer;
  pos jsonb := nullif(p_cursor->'at', 'null'::jsonb);
  last_value jsonb;
  after_cursor text;
  ahead integer;
  passed integer;
  bound jsonb;
  one_value boolean;
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
  taken bigint;
  carried integer := 0;
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
  -- A plain table: no DELETE trigger, DELETE rule or row security, not careful, and no row
  -- held back by an earlier batch. What such a table's delete leaves in place was changed
  -- by another transaction meanwhile, never by the delete itself.
  plain := NOT p_careful AND cardinality(xids) = 0
    AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                     WHERE t.tgrelid = p_leaf AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                       AND (t.tgtype & 8) <> 0)
    AND NOT EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = p_leaf AND r.ev_type = '4')
    AND NOT (SELECT c.relrowsecurity FROM pg_class c WHERE c.oid = p_leaf);

  IF p_strategy = 'index' THEN
    -- (column, ctid) order: the cursor passes every row it selected, even where many rows
    -- share one value and some of them stay.
    after_cursor := CASE WHEN pos IS NULL THEN ''
      -- At a value's start: (column, ctid) > (v, '(0,0)') is column >= v, since no row has
      -- tid (0,0); said so, the bound query can read the index alone.
      WHEN pos->>1 = '(0,0)' THEN format('AND %1$I >= ($2->>0)::%2$s', col, cast_to)
      ELSE format('AND %1$I >= ($2->>0)::%2$s AND (%1$I, ctid) > (($2->>0)::%2$s, ($2->>1)::tid)', col, cast_to) END;
    IF plain THEN
      -- A range of values, deleted as a bulk DELETE would delete it: the value of the
      -- (limit + 1)th outdated row after the cursor bounds the batch, so the rows below it
      -- are at most the limit; the next batch starts at that value. Where no more than
      -- the limit remain, the largest of them bounds it (a bound keeps the planner on the
      -- index even with statistics from before the cleanup). Where all of those rows share
      -- one value, or the delete meets more rows than it should (rows written since), the
      -- batch picks its rows by ctid instead. (Columns are qualified in ORDER BY: there a
      -- bare name that is also an output column's means the output column.)
      EXECUTE format(
        'SELECT count(*)::int, to_jsonb(max(s.v)), min(s.v) = max(s.v),
                (CASE WHEN count(*) <= $3 THEN count(*) ELSE count(*) FILTER (WHERE s.v < b.v) END)::int
           FROM (SELECT rel.%1$I AS v FROM ONLY %2$s AS rel WHERE %3$s %4$s ORDER BY rel.%1$I LIMIT $3 + 1) s,
                (SELECT (SELECT rel.%1$I FROM ONLY %2$s AS rel WHERE %3$s %4$s
                          ORDER BY rel.%1$I OFFSET $3 LIMIT 1) AS v) b',
        col, leaf_sql, pred, after_cursor)
        INTO ahead, bound, one_value, passed
        USING cutoff, pos, lim;
      IF ahead = 0 THEN
        leaf_done := true;
        RETURN;
      END IF;
      IF ahead <= lim OR NOT one_value THEN
        BEGIN
          EXECUTE format('DELETE FROM ONLY %1$s WHERE %2$s %3$s AND %4$I %5$s ($4 #>> ''{}'')::%6$s',
                         leaf_sql, pred, after_cursor, col,
                         CASE WHEN ahead <= lim THEN '<=' ELSE '<' END, cast_to)
            USING cutoff, pos, lim, bound;
          GET DIAGNOSTICS deleted = ROW_COUNT;
          IF deleted > lim THEN
            RAISE SQLSTATE 'PS001';
          END IF;
          IF deleted > 0 THEN
            -- The rows the batch passes: all that remained, or those below the bound.
            selected := greatest(deleted, passed);
            IF ahead <= lim THEN
              leaf_done := true;
            ELSE
              -- Every row below the bound is passed: the next batch starts at it.
              pos := jsonb_build_array(bound, '(0,0)');
            END IF;
          ELSE
            -- None of the rows it counted went: other transactions changed them meanwhile,
            -- perhaps to an earlier value, behind the cursor. They count as skipped with
            -- what the walk by ctid below does (revision 4 lost them from the count).
            carried := passed;
          END IF;
        EXCEPTION WHEN SQLSTATE 'PS001' THEN
          deleted := 0;
        END;
      END IF;
      IF selected = 0 AND ahead > lim AND one_value THEN
        -- More rows than the limit share one value: the batch deletes up to the limit of the
        -- rows from the cursor to that value, in index order, and leaves the cursor where it
        -- is (in ctid order, each batch would read and sort every row left of the value).
        -- It passes no row: a row it picks that another transaction changed meanwhile is
        -- counted as skipped all the same (changed to an earlier value, it may now lie behind
        -- the cursor), and one still ahead is taken by a later batch. Should the delete take
        -- none, the walk by ctid below passes them.
        EXECUTE format(
          'WITH picked AS MATERIALIZED (
             SELECT rel.ctid AS row_tid FROM ONLY %2$s AS rel
              WHERE %3$s %5$s AND rel.%1$I <= ($4 #>> ''{}'')::%4$s ORDER BY rel.%1$I LIMIT $3),
           gone AS (
             DELETE FROM ONLY %2$s WHERE ctid = ANY (ARRAY(SELECT row_tid FROM picked)) AND %3$s RETURNING 1)
           SELECT (SELECT count(*) FROM picked)::int, (SELECT count(*) FROM gone)::int',
          col, leaf_sql, pred, cast_to, after_cursor)
          INTO selected, deleted
          USING cutoff, pos, lim, bound;
        IF deleted > 0 THEN
          -- The cursor moves all the same: it counts the rows taken where it stands, which a
          -- node's check that each batch moves on sees (nodes of revision 5 included).
          taken := deleted + coalesce((p_cursor->>'taken')::bigint, 0);
        ELSE
          -- Every row it picked was changed meanwhile: they count as skipped with what the
          -- walk by ctid below does, even if it finds nothing.
          carried := selected;
          selected := 0;
        END IF;
      END IF;
      IF selected = 0 THEN
        -- By ctid: the selection and its delete in one statement.
        EXECUTE format(
          'WITH picked AS MATERIALIZED (
             SELECT rel.ctid AS row_tid, rel.%1$I AS row_value FROM ONLY %2$s AS rel
              WHERE %3$s %4$s ORDER BY rel.%1$I, rel.ctid LIMIT $3),
           gone AS (
             DELETE FROM ONLY %2$s WHERE ctid = ANY (ARRAY(SELECT row_tid FROM picked)) AND %3$s RETURNING 1)
           SELECT (SELECT count(*) FROM picked)::int, (SELECT count(*) FROM gone)::int,
                  (SELECT jsonb_build_array(to_jsonb(last.row_value), last.row_tid::text)
                     FROM (SELECT p.row_value, p.row_tid FROM picked p
                            ORDER BY p.row_value DESC, p.row_tid DESC LIMIT 1) last)',
          col, leaf_sql, pred, after_cursor)
          INTO selected, deleted, pos
          USING cutoff, pos, lim;
        leaf_done := selected < lim;
        IF selected = 0 AND carried = 0 THEN
          RETURN;
        END IF;
      END IF;
      done_fast := true;
      selected := selected + carried;
      skipped := selected - deleted;
      IF skipped > 0 THEN
        first_error := format('%s row(s) of %s were changed by another transaction meanwhile; they are left for a later run', skipped, leaf_sql);
      END IF;
    ELSE
      -- The cursor is the last row in (column, ctid) order: the largest value, and the
      -- last ctid of the ordered array.
      EXECUTE format(
        'SELECT coalesce(array_agg(picked.row_tid ORDER BY picked.row_value, picked.row_tid), ''{}''),
                count(*)::int, to_jsonb(max(picked.row_value))
           FROM (SELECT rel.ctid AS row_tid, rel.%1$I AS row_value FROM ONLY %2$s AS rel
                  WHERE %3$s %4$s AND rel.xmin <> ALL ($4)
                  ORDER BY rel.%1$I, rel.ctid LIMIT $3) picked',
        col, leaf_sql, pred, after_cursor)
        INTO tids, selected, last_value
        USING cutoff, pos, lim, xids;
      IF selected = 0 THEN
        pos := p_cursor->'at';
      ELSE
        pos := jsonb_build_array(last_value, tids[selected]::text);
      END IF;
      leaf_done := selected < lim;
    END IF;
  ELSIF p_strategy = 'tidrange' THEN
    from_tid := coalesce((pos #>> '{}')::tid, '(0,0)'::tid);
    blocks := pg_relation_size(p_leaf) / current_setting('block_size')::bigint;
    IF (from_tid::text::point)[0] >= blocks THEN
      leaf_done := true;
      RETURN;
    END IF;
    -- A plain table is deleted from by page range in one statement, as a bulk DELETE
    -- reads it: a TID Range Scan, each row read once. When the range held more rows than
    -- the limit, the delete is rolled back and the range shrunk, so no batch ever deletes
    -- more than the limit.
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
    ELSE
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
    END IF;
  ELSE
    RAISE EXCEPTION 'pgsingleton.cleanup_batch: unknown strategy %', p_strategy;
  END IF;

  IF done_fast THEN
    -- One statement did the batch: nothing it left can be its own doing.
    next_cursor := jsonb_build_object('xids', '[]'::jsonb)
      || CASE WHEN pos IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('at', pos) END
      || CASE WHEN taken IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('taken', taken) END;
    IF selected = 0 THEN
      elapsed_ms := extract(epoch FROM clock_timestamp() - now()) * 1000;
      RETURN;
    END IF;
  ELSE
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
                good_lo := good_lo || lo;
                good_hi := good_hi || hi;
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
          good := ARRAY(SELECT lockable[i] FROM unnest(good_lo, good_hi) AS good_range(from_i, to_i), generate_series(good_range.from_i, good_range.to_i) AS s(i));
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
    -- (Every selected row deleted: none kept, and no set difference to compute.)
    kept := CASE WHEN cardinality(gone) >= selected THEN '{}'
                 ELSE ARRAY(SELECT unnest(tids) EXCEPT SELECT unnest(gone) EXCEPT SELECT unnest(bad)) END;
    IF cardinality(kept) > 0 THEN
      first_error := coalesce(first_error, format('%s row(s) of %s were left in place by the delete itself (a trigger, a rule or a row security policy), or changed by another transaction meanwhile, without an error', cardinality(kept), leaf_sql));
      next_cursor := jsonb_set(next_cursor, '{xids}',
        (next_cursor->'xids') || to_jsonb(xid(pg_current_xact_id())::text));
    END IF;
    skipped := cardinality(bad) + cardinality(kept);
  END IF;

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
$pgsingleton_step$;
  IF EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('pgsingleton.meta') AND attname = 'revision' AND NOT attisdropped) THEN
    EXECUTE 'UPDATE pgsingleton.meta SET revision = 7';
  END IF;
END $pgsingleton_migration$;
