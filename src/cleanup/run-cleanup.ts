import type pg from 'pg'
import type { ResolvedPolicy } from '../config/policy.js'
import { SQLSTATE, sqlState } from '../db/sqlstate.js'
import { inTransaction, type TransactionLimits } from '../db/transaction.js'
import { errorMessage, SingletonError } from '../errors.js'
import type { CleanupJob } from '../schedule/queue.js'
import { sleep } from '../wait.js'
import { type BatchTarget, deleteBatch, deleteStatement } from './delete-batch.js'

export type RunStatus = 'done' | 'fenced' | 'skipped'

export interface RunReport {
  runId: string
  policy: string
  epoch: number
  status: RunStatus
  rowsDeleted: number
  batches: number
  reason?: string
}

export interface BatchReport {
  runId: string
  policy: string
  epoch: number
  rows: number
}

export interface CleanupDeps {
  readonly pool: pg.Pool
  readonly nodeId: string
  readonly policies: readonly ResolvedPolicy[]
  readonly limits: TransactionLimits
  readonly batchPauseMs: number
  onBatch(batch: BatchReport): void
}

/** Prepared per policy once: the quoted delete statement never changes. */
export function prepareStatements(
  policies: readonly ResolvedPolicy[],
): Map<string, { policy: ResolvedPolicy; statement: string }> {
  return new Map(
    policies.map((policy) => [policy.name, { policy, statement: deleteStatement(policy) }]),
  )
}

/**
 * Works one cleanup job: batches until a batch comes back short, each its own fenced
 * transaction. Stops between batches when `signal` aborts (the node is stopping or the
 * job expired) and leaves the run `failed` for pg-boss to retry; stops for good, as
 * `fenced`, when the epoch has moved on.
 */
export async function runCleanup(
  deps: CleanupDeps,
  statements: ReturnType<typeof prepareStatements>,
  job: CleanupJob,
  signal: AbortSignal,
): Promise<RunReport> {
  const base = { runId: job.runId, policy: job.policy, epoch: job.epoch }
  const prepared = statements.get(job.policy)
  if (!prepared) {
    const error = new SingletonError(
      'CLEANUP_FAILED',
      `policy "${job.policy}" is not in this node's configuration; another node must run it`,
    )
    await markFailed(deps.pool, job.runId, error)
    throw error
  }
  const claimed = await deps.pool.query<{ rows_deleted: string; batches: number }>(
    `UPDATE pgsingleton.cleanup_runs
        SET status = 'running', node_id = $3, started_at = coalesce(started_at, now()), finished_at = NULL, error = NULL
      WHERE id = $1 AND singleton = $2 AND status IN ('scheduled', 'running', 'failed')
      RETURNING rows_deleted, batches`,
    [job.runId, job.singleton, deps.nodeId],
  )
  const claim = claimed.rows[0]
  if (!claim)
    return {
      ...base,
      status: 'skipped',
      rowsDeleted: 0,
      batches: 0,
      reason: 'the run is already finished',
    }

  const target: BatchTarget = {
    runId: job.runId,
    singleton: job.singleton,
    epoch: job.epoch,
    ...prepared,
  }
  let rowsDeleted = Number(claim.rows_deleted)
  let batches = claim.batches
  for (;;) {
    if (signal.aborted) {
      const error = new SingletonError(
        'CLEANUP_FAILED',
        `interrupted between batches: ${String(signal.reason ?? 'stopping')}`,
      )
      await markFailed(deps.pool, job.runId, error)
      throw error
    }
    let outcome: Awaited<ReturnType<typeof deleteBatch>>
    try {
      outcome = await inTransaction(deps.pool, deps.limits, (client) => deleteBatch(client, target))
    } catch (error) {
      const failure = new SingletonError(
        'CLEANUP_FAILED',
        `policy "${job.policy}", run ${job.runId}: batch failed: ${errorMessage(error)}`,
        { cause: error },
      )
      await markFailed(deps.pool, job.runId, failure)
      throw failure
    }
    if (outcome.kind === 'fenced') {
      const reason = `epoch ${job.epoch} is no longer current: a newer holder took over`
      await markFenced(deps.pool, job.runId, reason)
      return { ...base, status: 'fenced', rowsDeleted, batches, reason }
    }
    if (outcome.kind === 'superseded') {
      return {
        ...base,
        status: 'fenced',
        rowsDeleted,
        batches,
        reason: 'superseded by a newer holder',
      }
    }
    rowsDeleted += outcome.rows
    batches += 1
    deps.onBatch({ ...base, rows: outcome.rows })
    if (outcome.rows < prepared.policy.batchSize) break
    if (deps.batchPauseMs > 0) await sleep(deps.batchPauseMs, signal)
  }
  return finish(deps, job, { ...base, status: 'done', rowsDeleted, batches })
}

/** Marks the run done under the same fence as its batches: a stale holder cannot complete it. */
async function finish(deps: CleanupDeps, job: CleanupJob, report: RunReport): Promise<RunReport> {
  try {
    const done = await inTransaction(deps.pool, deps.limits, async (client) => {
      const result = await client.query(
        `UPDATE pgsingleton.cleanup_runs SET status = 'done', finished_at = now()
          WHERE id = $1 AND status = 'running'
            AND EXISTS (SELECT 1 FROM pgsingleton.leases WHERE name = $2 AND epoch = $3 FOR KEY SHARE)`,
        [job.runId, job.singleton, job.epoch],
      )
      return result.rowCount === 1
    })
    if (done) return report
    const reason = `epoch ${job.epoch} is no longer current: the run could not be completed`
    await markFenced(deps.pool, job.runId, reason)
    return { ...report, status: 'fenced', reason }
  } catch (error) {
    if (sqlState(error) !== SQLSTATE.UNIQUE_VIOLATION) throw error
    const reason = 'this occurrence was already completed by another run'
    await markFenced(deps.pool, job.runId, reason)
    return { ...report, status: 'fenced', reason }
  }
}

async function markFenced(pool: pg.Pool, runId: string, reason: string): Promise<void> {
  await pool.query(
    `UPDATE pgsingleton.cleanup_runs SET status = 'fenced', finished_at = now(), error = $2
      WHERE id = $1 AND status IN ('scheduled', 'running', 'failed')`,
    [runId, reason],
  )
}

async function markFailed(pool: pg.Pool, runId: string, error: Error): Promise<void> {
  await pool
    .query(
      `UPDATE pgsingleton.cleanup_runs SET status = 'failed', finished_at = now(), error = $2
        WHERE id = $1 AND status IN ('scheduled', 'running')`,
      [runId, error.message],
    )
    .catch(() => {}) // the run stays as it was; the job's own retry or the next holder takes it over
}
