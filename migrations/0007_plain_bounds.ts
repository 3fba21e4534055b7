/**
 * Schema revision 7: the bound of a range delete read without materializing the rows.
 *
 * - `pgsingleton.cleanup_batch` (same signature, same outcomes, same rule for what goes,
 *   same counts): on a plain table, the query that bounds an index batch (how many
 *   outdated rows lie ahead of the cursor, up to the limit and one, the value of the last
 *   of them, whether they all share it, and how many lie below it) reads them as two plain
 *   index scans in one statement, one snapshot: the value at the limit's position
 *   (`OFFSET limit LIMIT 1`), then an aggregate over the rows up to it. Revision 6 put the
 *   rows in a materialized CTE and read it twice; on PostgreSQL 15 here that took about
 *   9.5 ms for 20,001 rows where the two scans took about 5.5 ms, and the delete of those
 *   rows itself 8.5 ms (scratch measurements, each the median of a few, on a table of
 *   1,000,000 rows in time order). Where each row's heap visit is a random page that the
 *   visibility map does not cover (rows in random order, not vacuumed), each scan pays it,
 *   and the two cost more than revision 6's one: a review measured 34 to 40 ms against 29
 *   to 35 ms for 20,001 of 300,000 such rows. Runs walk such tables in page order once a
 *   larger share is outdated (the node's choice, not this function's).
 *   - The rows it passes are read in the same statement (revision 6 computed the same
 *     number twice, from the rows at the bound, in two places).
 * - Nodes of revision 5 and 6 run on it unchanged (`schema_version` stays 3), and this
 *   version's nodes need revision 7.
 *
 * Derived from revision 6's function by the edits below, each of which must apply once.
 */
import { UP as REVISION_6 } from './0006_equal_values.js'
import { excerpt } from './excerpt.js'

const FUNCTION_6 = excerpt(
  REVISION_6,
  'CREATE OR REPLACE FUNCTION pgsingleton.cleanup_batch(',
  'END $fn$;',
)

/** Replaces `from` by `to` in `text`, where `from` occurs exactly once. */
function edit(text: string, from: string, to: string): string {
  const at = text.indexOf(from)
  if (at < 0 || text.indexOf(from, at + 1) >= 0)
    throw new Error(`revision 6's cleanup_batch has not exactly one ${JSON.stringify(from)}`)
  return text.slice(0, at) + to + text.slice(at + from.length)
}

const DECLARE_6 = `  at_bound integer;`

const DECLARE_7 = `  passed integer;`

export const BOUND_6 = `      EXECUTE format(
        'WITH s AS MATERIALIZED (
           SELECT rel.%1$I AS v FROM ONLY %2$s AS rel WHERE %3$s %4$s ORDER BY rel.%1$I LIMIT $3 + 1)
         SELECT count(*)::int, to_jsonb(max(s.v)), min(s.v) = max(s.v),
                count(*) FILTER (WHERE s.v = top.v)::int
           FROM s, (SELECT max(v) AS v FROM s) top',
        col, leaf_sql, pred, after_cursor)
        INTO ahead, bound, one_value, at_bound
        USING cutoff, pos, lim;`

// Two scans of the index in one snapshot: b.v, the value of the (limit + 1)th row (NULL
// when no more than the limit remain), is the largest of the rows s reads, so the rows
// below it are the ones a delete bounded by it passes.
export const BOUND_7 = `      EXECUTE format(
        'SELECT count(*)::int, to_jsonb(max(s.v)), min(s.v) = max(s.v),
                (CASE WHEN count(*) <= $3 THEN count(*) ELSE count(*) FILTER (WHERE s.v < b.v) END)::int
           FROM (SELECT rel.%1$I AS v FROM ONLY %2$s AS rel WHERE %3$s %4$s ORDER BY rel.%1$I LIMIT $3 + 1) s,
                (SELECT (SELECT rel.%1$I FROM ONLY %2$s AS rel WHERE %3$s %4$s
                          ORDER BY rel.%1$I OFFSET $3 LIMIT 1) AS v) b',
        col, leaf_sql, pred, after_cursor)
        INTO ahead, bound, one_value, passed
        USING cutoff, pos, lim;`

const SELECTED_6 = `            selected := greatest(deleted, CASE WHEN ahead <= lim THEN ahead ELSE ahead - at_bound END);`

const SELECTED_7 = `            selected := greatest(deleted, passed);`

const CARRIED_6 = `            carried := CASE WHEN ahead <= lim THEN ahead ELSE ahead - at_bound END;`

const CARRIED_7 = `            carried := passed;`

const FUNCTION_7 = [
  [DECLARE_6, DECLARE_7],
  [BOUND_6, BOUND_7],
  [SELECTED_6, SELECTED_7],
  [CARRIED_6, CARRIED_7],
].reduce((text, [from, to]) => edit(text, from as string, to as string), FUNCTION_6)

export const UP = `
-- One batch of a run: revision 6's function, its bound read by two plain index scans
-- (see migrations/0007_plain_bounds.ts).
${FUNCTION_7}
`

export const DOWN = `
${FUNCTION_6}
`
