import type pg from 'pg'
import { isTask, type PolicyDefinition, type TaskDefinition } from '../config/definition.js'
import { mayBeTiedToRows, SQLSTATE, sqlState } from '../db/sqlstate.js'
import { errorMessage, SingletonError } from '../errors.js'
import type { CleanupJob } from '../queue/cleanup-queue.js'
import type { TransactionLimits } from '../runs/fence.js'
import * as runs from '../runs/runs.js'
import type { RunStatus } from '../runs/statuses.js'
import { runTask, type TaskDeps } from '../tasks/run-task.js'
import { sleep } from '../wait.js'
import { type Layout, type LearnedSizes, Pacer, pagesTouched } from './pacing.js'

export interface RunReport {
  runId: string
  /** The policy's or task's name. */
  policy: string
  epoch: number
  kind: 'cleanup' | 'task'
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
  /** A task's run that took longer than its timeout: recorded failed, and retried. */
  timedOut?: boolean
  /** Its error was reported already, when it happened (a timeout). */
  reported?: boolean
  /** How long the run took on this node, from its claim to its end. */
  durationMs?: number
}

export interface BatchReport {
  runId: string
  policy: string
  epoch: number
  relation: string
  rows: number
  skipped: number
  cutoff: Date | null
  /** The batch's transaction, by the server's clock (0 for a partition removed whole). */
  elapsedMs: number
}

export interface CleanupDeps {
  readonly pool: pg.Pool
  readonly nodeId: string
  readonly limits: TransactionLimits
  readonly batchPauseMs: number
  /** The time budget of one batch's transaction; the batch size follows it. */
  readonly batchTargetMs: number
  /** With replicas: wait between batches while any replica replays more than this behind. 0: off. */
  readonly maxReplicaLagMs: number
  /** This node's task handlers, by name. */
  readonly handlers: TaskDeps['handlers']
  /** A task's run passed its limit: reported when it is recorded. */
  onTimedOut?: TaskDeps['onTimedOut']
  /** The batch sizes this node's runs left, so that the next run of a leaf starts there. */
  readonly sizes?: LearnedSizes
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

/**
 * A leaf with an index on the column is still walked in page order when at least this
 * share of its rows is outdated: every page is read once, in order, as a bulk DELETE
 * would, instead of jumping between pages along the index.
 */
const PAGE_ORDER_SHARE = 0.1
/**
 * Or when the outdated rows are expected on at least this share of its pages (a smaller
 * share of rows scattered over the table): the walk along the index would visit nearly
 * every page anyway, in no order, and each of them again in later batches. Measured on
 * PostgreSQL 15 with 1,000,000 rows in random order and a node kept between runs: at 5 %
 * outdated (expected on 95 % of the pages) the page walk took 401 to 797 ms where the
 * index walk took 612 to 887; at 1 % (46 % of the pages) the index walk took 221 to 457 ms
 * and the page walk 328 to 543.
 */
const PAGE_ORDER_PAGES = 0.75

/**
 * How a run walks a leaf: in page order where it has no index on the column, or where the
 * planner expects a large share of its rows outdated, or those rows on most of its pages;
 * else along the index, with what its statistics say of its layout (for the first batch's
 * size). Only a choice of path: without statistics, the index.
 */
export async function chooseWalk(
  pool: pg.Pool | pg.PoolClient,
  leaf: Pick<Leaf, 'leaf' | 'strategy' | 'tuples_per_page'>,
  definition: PolicyDefinition,
): Promise<{ strategy: 'index' | 'tidrange'; layout?: Layout }> {
  if (leaf.strategy !== 'index') return { strategy: leaf.strategy }
  // One statement: two side by side on a pool could open a second connection, whose
  // first batch would pay for its cold caches.
  const { share, layout } = await runs
    .leafStatistics(pool, leaf.leaf, definition)
    .catch(() => ({ share: null, layout: undefined }))
  if (share === null) return { strategy: 'index', layout }
  if (share >= PAGE_ORDER_SHARE) return { strategy: 'tidrange' }
  const tuplesPerPage = leaf.tuples_per_page ?? 0
  if (layout && layout.pages > 0 && layout.correlation !== null && tuplesPerPage > 0) {
    const touched = pagesTouched(share * layout.pages * tuplesPerPage, tuplesPerPage, layout)
    if (touched >= PAGE_ORDER_PAGES * layout.pages) return { strategy: 'tidrange' }
  }
  return { strategy: 'index', layout }
}

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
  /** How long pg-boss lets the job stay active, when known: a task's run ends before. */
  jobExpiresInSeconds?: number,
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
      kind: 'cleanup',
      status: 'skipped',
      rowsDeleted: 0,
      rowsSkipped: 0,
      batches: 0,
      reason: 'the run is not waiting for a worker',
    }
  }
  if (isTask(run.definition))
    return runTask(deps, run as runs.Claim<TaskDefinition>, signal, jobExpiresInSeconds)
  return clean(deps, run as runs.Claim<PolicyDefinition>, signal)
}

/** A cleanup run, claimed: leaf by leaf, batch by batch. */
async function clean(
  deps: CleanupDeps,
  run: runs.Claim<PolicyDefinition>,
  signal: AbortSignal,
): Promise<RunReport> {
  const report: RunReport = {
    runId: run.runId,
    policy: run.policy,
    epoch: run.epoch,
    kind: 'cleanup',
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

  const stopped = async (outcome: Exclude<runs.BatchResult['outcome'], 'deleted'>) => {
    if (outcome === 'superseded')
      return {
        ...report,
        status: 'fenced' as const,
        reason: 'a holder closed the run before it finished',
      }
    const reason =
      outcome === 'fenced'
        ? `epoch ${run.epoch} is no longer current: a newer holder took over`
        : outcome === 'disagree'
          ? `the live nodes no longer all hold this definition of policy "${run.policy}"; it is held back until they agree`
          : outcome === 'paused'
            ? `policy "${run.policy}" was paused; the occurrence runs again after resume`
            : `node ${deps.nodeId} is not live (its lock session is gone or reconnecting), so it may not delete`
    await runs.fence(deps.pool, run, reason)
    return { ...report, status: 'fenced' as const, reason }
  }
  const recorded = (
    relation: string,
    rows: number,
    skipped: number,
    cutoff: Date | null,
    elapsedMs: number,
  ) => {
    report.batches += 1
    report.rowsDeleted += rows
    report.rowsSkipped += skipped
    deps.onBatch({
      runId: run.runId,
      policy: run.policy,
      epoch: run.epoch,
      relation,
      rows,
      skipped,
      cutoff,
      elapsedMs,
    })
  }

  for (const leaf of leaves) {
    if (signal.aborted) {
      return failed(`interrupted between batches: ${String(signal.reason ?? 'stopping')}`, false)
    }
    // A partition wholly outdated goes whole, when the policy says so.
    if (run.definition.partitions !== 'delete') {
      let removal: runs.PartitionResult
      try {
        removal = await runs.removePartition(deps.pool, deps.limits, run, leaf.leaf)
      } catch (error) {
        return failed(
          `policy "${run.policy}", ${leaf.relation}: removing it failed: ${errorMessage(error)}`,
          true,
        )
      }
      if (removal.outcome === 'dropped' || removal.outcome === 'detached') {
        recorded(leaf.relation, removal.removed, 0, removal.cutoff, 0)
        continue
      }
      if (removal.outcome !== 'kept' && removal.outcome !== 'deleted')
        return stopped(removal.outcome)
    }
    const { strategy, layout } = await chooseWalk(deps.pool, leaf, run.definition)
    // The same leaf, walked the same way under the same bounds: the size it was left at.
    const sizeKey = JSON.stringify([
      run.policy,
      leaf.leaf,
      run.definition.column,
      strategy,
      run.definition.batchSize,
      deps.batchTargetMs,
    ])
    const pacer = new Pacer(
      run.definition.batchSize,
      deps.batchTargetMs,
      leaf.tuples_per_page ?? 0,
      deps.batchPauseMs,
      strategy,
      layout,
      deps.sizes?.recall(sizeKey),
    )
    let cursor: unknown = null
    let careful = false
    /**
     * A batch of this leaf ran out of its statement_timeout: its rows cost more than their
     * number says (rows ON DELETE CASCADE takes with them, a trigger's work, a cold disk).
     * The rest of the leaf goes carefully, which takes at most the limit: a plain batch in
     * page order deletes all its pages' rows before it counts them.
     */
    let limited = false
    for (;;) {
      if (signal.aborted) {
        return failed(`interrupted between batches: ${String(signal.reason ?? 'stopping')}`, false)
      }
      const request: runs.BatchRequest = {
        leaf: leaf.leaf,
        strategy,
        cursor,
        limit: pacer.limit,
        span: pacer.span,
        careful,
      }
      let batch: runs.BatchResult
      const sentAt = performance.now()
      try {
        batch = await runs.recordBatch(deps.pool, deps.limits, run, request)
      } catch (error) {
        // Cancelled by its statement_timeout (not by an operator's pg_cancel_backend, the
        // same SQLSTATE, which comes sooner and fails the run as before): it rolled back
        // whole, and is tried again from the same cursor, smaller and carefully, after a
        // pause as long as it took, as after any batch far over its budget.
        const timedOut =
          sqlState(error) === SQLSTATE.QUERY_CANCELED &&
          performance.now() - sentAt >= deps.limits.statementTimeoutMs * 0.9
        if (timedOut && (pacer.shrink() || !limited)) {
          // The next run starts from the first size again, not where this one was cancelled.
          deps.sizes?.forget(sizeKey)
          limited = true
          careful = true
          await sleep(deps.limits.statementTimeoutMs, signal)
          if (deps.maxReplicaLagMs > 0) await waitForReplicas(deps, signal)
          continue
        }
        if (timedOut) {
          return failed(
            `policy "${run.policy}", ${leaf.relation}: a batch of ${pacer.limit === 1 ? 'one row' : `at most ${pacer.limit} rows`} did not finish within batchStatementTimeoutMs (${deps.limits.statementTimeoutMs} ms), even at the smallest size (raise it for this table): ${errorMessage(error)}`,
            true,
          )
        }
        if (!careful && mayBeTiedToRows(error)) {
          careful = true
          pacer.careful()
          continue
        }
        return failed(
          `policy "${run.policy}", ${leaf.relation}: batch failed: ${errorMessage(error)}`,
          true,
        )
      }
      if (batch.outcome !== 'deleted') return stopped(batch.outcome)
      if (batch.selected > 0) {
        recorded(leaf.relation, batch.deleted, batch.skipped, batch.cutoff, batch.elapsedMs)
        report.reason ??= batch.firstError ?? undefined
      }
      if (batch.leafDone) {
        // Not a size careful batches left: they start small, and say nothing of plain ones.
        // Nor a page-order walk's, which the pacer does not start from (see Pacer).
        if (!careful && !limited && strategy === 'index') deps.sizes?.remember(sizeKey, pacer.limit)
        break
      }
      // Every batch moves its cursor past what it selected; one that did not would loop.
      if (batch.selected > 0 && JSON.stringify(batch.cursor) === JSON.stringify(cursor)) {
        return failed(`policy "${run.policy}", ${leaf.relation}: the batch did not move on`, true)
      }
      cursor = batch.cursor
      careful = limited || (careful && batch.skipped > 0)
      const pauseMs = pacer.after(batch)
      if (pauseMs > 0) await sleep(pauseMs, signal)
      if (deps.maxReplicaLagMs > 0) await waitForReplicas(deps, signal)
    }
  }

  const completed = await runs.complete(deps.pool, deps.limits, run, {
    rowsDeleted: report.rowsDeleted,
    rowsSkipped: report.rowsSkipped,
    batches: report.batches,
  })
  // Counted as a failure, though a crash is not the policy's doing: were the counts ever
  // to differ for another reason, the run would end exhausted, not loop.
  if (completed.status === 'retaken') {
    // The report tells what stayed deleted, as the record does, not what the batches that
    // were taken back had returned.
    Object.assign(report, completed.record)
    return failed(completed.reason, true)
  }
  if (completed.status === 'fenced')
    return { ...report, status: 'fenced', reason: completed.reason }
  return { ...report, status: 'done' }
}

/**
 * With replicas, a cleanup should not outrun their replay: while any replica replays more
 * than `maxReplicaLagMs` behind (pg_stat_replication; the role needs pg_monitor to see it),
 * the next batch waits.
 */
async function waitForReplicas(deps: CleanupDeps, signal: AbortSignal): Promise<void> {
  while (!signal.aborted) {
    const { rows } = await deps.pool.query<{ lag: number | null }>(
      `SELECT max(extract(epoch FROM replay_lag) * 1000)::float8 AS lag FROM pg_stat_replication`,
    )
    if ((rows[0]?.lag ?? 0) <= deps.maxReplicaLagMs) return
    await sleep(Math.min(1000, deps.maxReplicaLagMs), signal)
  }
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
