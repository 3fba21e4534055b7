import type pg from 'pg'
import { quoteIdent, quoteQualified } from '../config/identifier.js'
import type { ResolvedPolicy } from '../config/policy.js'

export type BatchOutcome =
  | { kind: 'deleted'; rows: number }
  /** The epoch moved on: a newer holder exists and this run must stop. */
  | { kind: 'fenced' }
  /** The run is no longer `running` (a newer holder superseded it). */
  | { kind: 'superseded' }

/**
 * The delete of one batch, built once per policy. Identifiers are always quoted; the
 * cut-off is `now() - olderThan` by the database clock of this very transaction, and
 * the outer predicate re-checks it on the row actually deleted.
 *
 * The victims are gathered into an array of TIDs first. The tempting
 * `WHERE ctid IN (SELECT ctid ... LIMIT n)` (or a CTE joined back) may be planned as a
 * semi-join that does not honour the LIMIT as written; `= ANY(ARRAY(subquery))` is an
 * init-plan, run once, so a batch deletes at most `batchSize` rows.
 */
export function deleteStatement(policy: ResolvedPolicy): string {
  const table = quoteQualified(policy.table)
  const column = quoteIdent(policy.column)
  return `DELETE FROM ${table}
           WHERE ctid = ANY (ARRAY(
                   SELECT ctid FROM ${table}
                    WHERE ${column} < now() - $1::interval
                    LIMIT $2))
             AND ${column} < now() - $1::interval`
}

export interface BatchTarget {
  readonly runId: string
  readonly singleton: string
  readonly epoch: number
  readonly statement: string
  readonly policy: ResolvedPolicy
}

/**
 * One fenced batch, inside a transaction the caller opened. The fence is a FOR KEY
 * SHARE lock on the lease row at the job's epoch: it lets the holder's heartbeat (a
 * non-key update) through, and makes the next holder's epoch bump (FOR UPDATE) wait
 * until this batch has committed. So batches of different epochs never overlap, and
 * after a bump no batch of an older epoch gets past this check.
 */
export async function deleteBatch(
  client: pg.PoolClient,
  target: BatchTarget,
): Promise<BatchOutcome> {
  const { rows: checks } = await client.query<{ held: boolean | null; status: string | null }>(
    `SELECT (SELECT true FROM pgsingleton.leases WHERE name = $1 AND epoch = $2 FOR KEY SHARE) AS held,
            (SELECT status FROM pgsingleton.cleanup_runs WHERE id = $3 FOR UPDATE) AS status`,
    [target.singleton, target.epoch, target.runId],
  )
  if (checks[0]?.held !== true) return { kind: 'fenced' }
  if (checks[0]?.status !== 'running') return { kind: 'superseded' }
  const deleted = await client.query(target.statement, [
    target.policy.olderThan,
    target.policy.batchSize,
  ])
  const rows = deleted.rowCount ?? 0
  const progress = await client.query<{ batches: number }>(
    `UPDATE pgsingleton.cleanup_runs SET rows_deleted = rows_deleted + $2, batches = batches + 1
      WHERE id = $1 RETURNING batches`,
    [target.runId, rows],
  )
  const batch = progress.rows[0]?.batches
  await client.query(
    `INSERT INTO pgsingleton.cleanup_batches (run_id, batch, epoch, began_at, ended_at, rows_deleted)
     VALUES ($1, $2, $3, now(), clock_timestamp(), $4)`,
    [target.runId, batch, target.epoch, rows],
  )
  return { kind: 'deleted', rows }
}
