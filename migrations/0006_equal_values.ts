/**
 * Schema revision 6: a batch among many rows of one value reads about its own rows.
 *
 * - `pgsingleton.cleanup_batch` (same signature, same outcomes, same rule for what goes):
 *   - on a plain table, where more outdated rows than the limit share the value the walk
 *     reaches next (rows written by one bulk insert share `now()`; a `date` column's rows
 *     share their day), a batch deletes up to the limit of the rows from the cursor to that
 *     value, in index order, and the cursor stays where it is. Revision 4 took them in ctid
 *     order, which no index gives: each batch read and sorted every row left of that value,
 *     so a group of n rows cost n²/limit rows read, and batches slowed as the group drained
 *     (the pacer then made them smaller, which made it worse). The batch passes no row; a
 *     row it picked that another transaction changed meanwhile counts as skipped all the
 *     same (moved to an earlier value, it may lie behind the cursor), as revision 4 counted
 *     it. A batch whose delete takes none falls back to the walk in ctid order, which passes
 *     them, and counts the rows it picked as skipped with what that walk does. So does a
 *     batch whose range delete (revision 4's) takes none of the rows it counted. The cursor counts the rows taken where it stands (`taken`), so it still moves
 *     with each batch, as a node's check that a batch moved on requires.
 *   - a cursor at a value's start (`(v, '(0,0)')`, where range deletes leave it) is read as
 *     `column >= v`, which it equals (no row has tid (0,0)), so the bound query can read
 *     the index alone, where the row comparison needed every row's heap tuple.
 * - Nodes of revision 5 run on it unchanged (`schema_version` stays 3), and this version's
 *   nodes need revision 6.
 *
 * Derived from revision 4's function by the edits below, each of which must apply.
 */
import { UP as REVISION_4 } from './0004_faster_batches.js'
import { excerpt } from './excerpt.js'

const FUNCTION_4 = excerpt(
  REVISION_4,
  'CREATE OR REPLACE FUNCTION pgsingleton.cleanup_batch(',
  'END $fn$;',
)

/** Replaces `from` by `to` in `text`, where `from` occurs exactly once. */
function edit(text: string, from: string, to: string): string {
  const at = text.indexOf(from)
  if (at < 0 || text.indexOf(from, at + 1) >= 0)
    throw new Error(`revision 4's cleanup_batch has not exactly one ${JSON.stringify(from)}`)
  return text.slice(0, at) + to + text.slice(at + from.length)
}

const CURSOR_4 = `    after_cursor := CASE WHEN pos IS NULL THEN ''
      ELSE format(`

const CURSOR_6 = `    after_cursor := CASE WHEN pos IS NULL THEN ''
      -- At a value's start: (column, ctid) > (v, '(0,0)') is column >= v, since no row has
      -- tid (0,0); said so, the bound query can read the index alone.
      WHEN pos->>1 = '(0,0)' THEN format('AND %1$I >= ($2->>0)::%2$s', col, cast_to)
      ELSE format(`

const BY_CTID_4 = `      IF selected = 0 THEN
        -- By ctid: the selection and its delete in one statement.`

const ONE_VALUE_6 = `      IF selected = 0 AND ahead > lim AND one_value THEN
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
${BY_CTID_4}`

const POS_4 = `  pos jsonb := p_cursor->'at';`

// A cursor left at the start by a batch among one value's rows says 'at': null.
const POS_6 = `  pos jsonb := nullif(p_cursor->'at', 'null'::jsonb);`

const DECLARE_4 = `  done_fast boolean := false;
BEGIN`

const DECLARE_6 = `  done_fast boolean := false;
  taken bigint;
  carried integer := 0;
BEGIN`

const NEXT_CURSOR_4 = `    next_cursor := jsonb_build_object('at', pos, 'xids', '[]'::jsonb);`

// (No 'at' where the cursor is still at the start: revision 5's function reads none as the
// start, where it would read 'at': null as the end.)
const NEXT_CURSOR_6 = `    next_cursor := jsonb_build_object('xids', '[]'::jsonb)
      || CASE WHEN pos IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('at', pos) END
      || CASE WHEN taken IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('taken', taken) END;`

const RANGE_END_4 = `              pos := jsonb_build_array(bound, '(0,0)');
            END IF;
          END IF;
        EXCEPTION WHEN SQLSTATE 'PS001' THEN`

const RANGE_END_6 = `              pos := jsonb_build_array(bound, '(0,0)');
            END IF;
          ELSE
            -- None of the rows it counted went: other transactions changed them meanwhile,
            -- perhaps to an earlier value, behind the cursor. They count as skipped with
            -- what the walk by ctid below does (revision 4 lost them from the count).
            carried := CASE WHEN ahead <= lim THEN ahead ELSE ahead - at_bound END;
          END IF;
        EXCEPTION WHEN SQLSTATE 'PS001' THEN`

const BY_CTID_END_4 = `        leaf_done := selected < lim;
        IF selected = 0 THEN
          RETURN;
        END IF;
      END IF;
      done_fast := true;
      skipped := selected - deleted;`

const BY_CTID_END_6 = `        leaf_done := selected < lim;
        IF selected = 0 AND carried = 0 THEN
          RETURN;
        END IF;
      END IF;
      done_fast := true;
      selected := selected + carried;
      skipped := selected - deleted;`

const FUNCTION_6 = [
  [POS_4, POS_6],
  [DECLARE_4, DECLARE_6],
  [CURSOR_4, CURSOR_6],
  [BY_CTID_4, ONE_VALUE_6],
  [NEXT_CURSOR_4, NEXT_CURSOR_6],
  [RANGE_END_4, RANGE_END_6],
  [BY_CTID_END_4, BY_CTID_END_6],
].reduce((text, [from, to]) => edit(text, from as string, to as string), FUNCTION_4)

export const UP = `
-- One batch of a run: revision 4's function, where many rows share one value, reading
-- about its own rows (see migrations/0006_equal_values.ts).
${FUNCTION_6}
`

export const DOWN = `
${FUNCTION_4}
`
