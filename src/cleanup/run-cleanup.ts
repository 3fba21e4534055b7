import type pg from 'pg'
import type { PolicyDefinition } from '../config/definition.js'
import { mayBeTiedToRows } from '../db/sqlstate.js'
import { errorMessage, SingletonError } from '../errors.js'
import type { CleanupJob } from '../queue/cleanup-queue.js'
import type { TransactionLimits } from '../runs/fence.js'
import * as runs from '../runs/runs.js'
import type { RunStatus } from '../runs/statuses.js'
import { sleep } from '../wait.js'

export interface RunReport {
  runId: string
  policy: string
  epoch: number
  /** What the run ended as; `skipped` when it was not waiting for a worker. */
  status: RunStatus | 'skipped'
  rowsDeleted: number
  /** Rows it could not delete (held by other transactions, refused by a constraint or trigger). */
  rowsSkipped: number
  batches: number
  /** Why it did not finish, or the first reason rows were skipped. */
  reason?: string
  /** The node was stopping: the run waits to be retried, and this is no error. */
  interrupted?: boolean
}

export interface BatchReport {
  runId: string
  policy: string
  epoch: number
  relation: string
  rows: number
  skipped: number
  cutoff: Date | null
}

export interface CleanupDeps {
  readonly pool: pg.Pool
  readonly nodeId: string
  readonly limits: TransactionLimits
  readonly batchPauseMs: number
  onBatch(batch: BatchReport): void
}

interface Leaf {
  leaf: number
  relation: string
  relkind: string
  strategy: 'index' | 'tidrange'
  tuples_per_page: number | null
  can_delete: boolean
}

/** Pages a TID-range batch spans when the table has no statistics yet. */
const DEFAULT_SPAN_PAGES = 32
/** And at most: a table left nearly empty could otherwise ask for billions of pages. */
const MAX_SPAN_PAGES = 131_072

/**
 * Works one job: claims its run, then deletes by the definition the run carries (never by
 * this node's own config), table by table (a partitioned or inheritance parent is worked
 * partition by partition) and batch by batch, each batch one fenced statement. A batch
 * that fails for reasons tied to its rows is done again carefully; while careful batches
 * keep finding such rows, the next ones stay careful. Stops between batches when
 * `signal` aborts. Failures are recorded on the run (which the holder retries), never
 * thrown, except when the database cannot be reached to record them.
 */
export async function runCleanup(
  deps: CleanupDeps,
  job: CleanupJob,
  signal: AbortSignal,
): Promise<RunReport> {
  const run = await runs.claim(deps.pool, job.runId, deps.nodeId)
  if (run === 'not live') {
    // This node's lock session is reconnecting: it may not delete now. The job fails, and
    // the holder gives the run a new job at its next tick, for whichever node is live.
    throw new SingletonError(
      'NODE_NOT_LIVE',
      `run ${job.runId}: node ${deps.nodeId} is not live yet (its lock session is reconnecting); the holder hands the run to a new job`,
    )
  }
  if (run === 'not waiting') {
    return {
      runId: job.runId,
      policy: job.policy,
      epoch: job.epoch,
      status: 'skipped',
      rowsDeleted: 0,
      rowsSkipped: 0,
      batches: 0,
      reason: 'the run is not waiting for a worker',
    }
  }
  const report: RunReport = {
    runId: run.runId,
    policy: run.policy,
    epoch: run.epoch,
    status: 'running',
    rowsDeleted: run.rowsDeleted,
    rowsSkipped: run.rowsSkipped,
    batches: run.batches,
  }
  const failed = async (reason: string, counts: boolean): Promise<RunReport> => {
    const recorded = await runs.fail(deps.pool, run, reason, counts)
    return { ...report, status: recorded?.status ?? 'fenced', reason, interrupted: !counts }
  }

  let leaves: Leaf[]
  try {
    leaves = await listLeaves(deps.pool, run.definition)
  } catch (error) {
    return failed(`policy "${run.policy}": ${errorMessage(error)}`, true)
  }

  for (const leaf of leaves) {
    const tuplesPerPage = leaf.tuples_per_page ?? 0
    const request: runs.BatchRequest = {
      leaf: leaf.leaf,
      strategy: leaf.strategy,
      cursor: null,
      limit: run.definition.batchSize,
      span:
        tuplesPerPage > 0
          ? Math.min(
              MAX_SPAN_PAGES,
              Math.max(1, Math.ceil(run.definition.batchSize / tuplesPerPage)),
            )
          : DEFAULT_SPAN_PAGES,
      careful: false,
    }
    let next = request
    for (;;) {
      if (signal.aborted) {
        return failed(`interrupted between batches: ${String(signal.reason ?? 'stopping')}`, false)
      }
      let batch: runs.BatchResult
      try {
        batch = await runs.recordBatch(deps.pool, deps.limits, run, next)
      } catch (error) {
        if (!next.careful && mayBeTiedToRows(error)) {
          next = { ...next, careful: true }
          continue
        }
        return failed(
          `policy "${run.policy}", ${leaf.relation}: batch failed: ${errorMessage(error)}`,
          true,
        )
      }
      if (batch.outcome === 'superseded') {
        return { ...report, status: 'fenced', reason: 'a holder closed the run before it finished' }
      }
      if (batch.outcome !== 'deleted') {
        const reason =
          batch.outcome === 'fenced'
            ? `epoch ${run.epoch} is no longer current: a newer holder took over`
            : batch.outcome === 'disagree'
              ? `the live nodes no longer all hold this definition of policy "${run.policy}"; it is held back until they agree`
              : batch.outcome === 'paused'
                ? `policy "${run.policy}" was paused; the occurrence runs again after resume`
                : `node ${deps.nodeId} is not live (its lock session is gone or reconnecting), so it may not delete`
        await runs.fence(deps.pool, run, reason)
        return { ...report, status: 'fenced', reason }
      }
      if (batch.selected > 0) {
        report.batches += 1
        report.rowsDeleted += batch.deleted
        report.rowsSkipped += batch.skipped
        report.reason ??= batch.firstError ?? undefined
        deps.onBatch({
          runId: run.runId,
          policy: run.policy,
          epoch: run.epoch,
          relation: leaf.relation,
          rows: batch.deleted,
          skipped: batch.skipped,
          cutoff: batch.cutoff,
        })
      }
      if (batch.leafDone) break
      // Every batch moves its cursor past what it selected; one that did not would loop.
      if (batch.selected > 0 && JSON.stringify(batch.cursor) === JSON.stringify(next.cursor)) {
        return failed(`policy "${run.policy}", ${leaf.relation}: the batch did not move on`, true)
      }
      next = {
        ...next,
        cursor: batch.cursor,
        careful: next.careful && batch.skipped > 0,
      }
      if (deps.batchPauseMs > 0) await sleep(deps.batchPauseMs, signal)
    }
  }

  const completed = await runs.complete(deps.pool, deps.limits, run)
  if (completed.status === 'fenced')
    return { ...report, status: 'fenced', reason: completed.reason }
  return { ...report, status: 'done' }
}

/**
 * The tables the run deletes from, with what each allows. Refuses foreign-table
 * partitions and tables this role may not delete from, naming them.
 */
async function listLeaves(pool: pg.Pool, definition: PolicyDefinition): Promise<Leaf[]> {
  const { rows: tables } = await pool.query<{ t: string | null }>(
    `SELECT to_regclass(format('%I.%I', $1::text, $2::text))::oid AS t`,
    [definition.schema, definition.table],
  )
  const table = tables[0]?.t
  if (!table) throw new Error(`table "${definition.schema}"."${definition.table}" no longer exists`)
  const { rows } = await pool.query<Leaf & { leaf: string }>(
    'SELECT * FROM pgsingleton.cleanup_leaves($1, $2)',
    [table, definition.column],
  )
  const unusable = rows.filter((leaf) => leaf.relkind !== 'r' || !leaf.can_delete)
  if (unusable.length > 0) {
    throw new Error(
      `cannot delete from ${unusable.map((l) => l.relation).join(', ')} (a foreign table, or this role lacks SELECT and DELETE on it)`,
    )
  }
  return rows.map((row) => ({ ...row, leaf: Number(row.leaf) }))
}
