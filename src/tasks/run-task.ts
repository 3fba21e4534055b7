import type pg from 'pg'
import type { RunReport } from '../cleanup/run-cleanup.js'
import { type TaskDefinition, taskTimeoutSeconds } from '../config/definition.js'
import type { TaskContext } from '../config/task.js'
import { destroySocket } from '../db/client.js'
import { withClient } from '../db/transaction.js'
import { errorMessage, SingletonError } from '../errors.js'
import { localSettings, type TransactionLimits } from '../runs/fence.js'
import * as runs from '../runs/runs.js'
import { pausedSql } from '../runs/statuses.js'

export interface TaskDeps {
  readonly pool: pg.Pool
  readonly nodeId: string
  readonly limits: TransactionLimits
  /** This node's handlers, by task name. */
  readonly handlers: ReadonlyMap<string, (context: TaskContext) => unknown>
  /**
   * A run passed its limit and was recorded failed (or closed meanwhile): told at once,
   * not when its handler returns, which may be much later.
   */
  onTimedOut?(error: SingletonError, run: { runId: string; policy: string; status: string }): void
}

/** Why a fenced transaction may not go on, as `pgsingleton.task_fence` says it. */
const FENCE_REASONS: Record<string, string> = {
  fenced: 'its epoch is no longer current: a newer holder took over',
  superseded: 'a holder closed the run before it finished',
  'not live': 'its node is not live (its lock session is gone or reconnecting)',
  disagree: 'the live nodes no longer all hold this definition of the task',
  paused: 'the task was paused',
  'done already': 'this occurrence was already completed by another run',
}

/**
 * Works a task's run (claimed): calls this node's handler with the run's context. The
 * handler's `fenced(fn)` is the run's one fenced transaction, which also completes the
 * run; a handler that never calls it has its run completed (fenced) when it returns. A
 * handler that throws before its fenced transaction committed fails the run, which the
 * holder retries with backoff; one that throws after has done its occurrence (it stays
 * done, and the error is reported with it).
 */
export async function runTask(
  deps: TaskDeps,
  run: runs.Claim<TaskDefinition>,
  signal: AbortSignal,
  /**
   * How long pg-boss lets the run's job stay active. A job sent by this version expires a
   * minute after the run's limit; one sent by a holder of an earlier version, after the
   * queue's hour, and then the run ends a little before it, so that its failure is recorded
   * here rather than the run being closed as lost and issued again at once.
   */
  jobExpiresInSeconds?: number,
): Promise<RunReport> {
  const report: RunReport = {
    runId: run.runId,
    policy: run.policy,
    epoch: run.epoch,
    kind: 'task',
    status: 'running',
    rowsDeleted: 0,
    rowsSkipped: 0,
    batches: run.batches,
  }
  const handler = deps.handlers.get(run.policy)
  if (!handler) {
    const reason = `task "${run.policy}": node ${deps.nodeId} has no handler for it`
    const recorded = await runs.fail(deps.pool, run, reason, true)
    return { ...report, status: recorded?.status ?? 'fenced', reason }
  }

  // A run claimed while its task is paused (issued just before the pause, its job already
  // queued) does not start its handler: it ends fenced, and its occurrence is issued again
  // after the resume, as a cleanup run stops at its first batch. A pause after this look
  // is still met by fenced(), which refuses to commit.
  const { rows: look } = await deps.pool.query<{ paused: boolean }>(
    `SELECT ${pausedSql('$1', '$2')} AS paused`,
    [run.singleton, run.policy],
  )
  if (look[0]?.paused) {
    const reason = `task "${run.policy}": ${FENCE_REASONS.paused}; the occurrence runs again after resume`
    await runs.fence(deps.pool, run, reason)
    // An operator's pause, not an error.
    return { ...report, status: 'fenced', reason, interrupted: true }
  }

  // A fenced transaction is for the occurrence's writes: it gets a batch's statement
  // timeout as its whole life.
  const deadlineMs = deps.limits.statementTimeoutMs
  let state = 'unused' as 'unused' | 'open' | 'committed' | 'refused' | 'timed out'
  let refusal: string | undefined
  /** Why the fenced transaction did not commit, when the database did not refuse it. */
  let rolledBack: unknown
  let inFlight: Promise<unknown> | undefined
  const fenced: TaskContext['fenced'] = (fn) => {
    if (state === 'timed out' && timedOut) {
      return Promise.reject(
        new SingletonError('TASK_TIMEOUT', `${timedOut.message}; its fenced() may no longer run.`),
      )
    }
    if (state !== 'unused') {
      return Promise.reject(
        new SingletonError(
          'FENCED_ONCE',
          `task "${run.policy}": fenced() runs once per run, and this run already called it (its transaction ${state === 'committed' ? 'committed' : state === 'open' ? 'is open' : 'did not commit'}); put all of the occurrence's writes in one fenced transaction.`,
        ),
      )
    }
    state = 'open'
    const transaction = withClient(deps.pool, async (client, drop) => {
      // The fenced transaction holds the lease row (FOR KEY SHARE): the next holder's epoch
      // bump waits for it. It gets the deadline of a batch, after which the connection is
      // destroyed and the server rolls it back.
      let expired: Error | undefined
      const deadline = setTimeout(() => {
        const error = new SingletonError(
          'TASK_FAILED',
          `task "${run.policy}": the fenced transaction took longer than ${deadlineMs} ms (batchStatementTimeoutMs); its connection was closed and it rolled back.`,
        )
        expired = error
        drop(error)
        destroySocket(client) // fails the query in flight
      }, deadlineMs)
      try {
        await client.query(`BEGIN; ${localSettings(deps.limits, { utc: false })}`)
        // Committed with its flush, even where the role or database has synchronous_commit
        // off (any other value is left alone): a commit the handler is told of, and may act
        // on outside the database, is not taken back by a server crash.
        const { rows } = await client.query<{ outcome: string | null; xid: string }>(
          `SELECT pgsingleton.task_fence($1, $2) AS outcome, txid_current()::text AS xid,
                  CASE WHEN current_setting('synchronous_commit') = 'off'
                       THEN set_config('synchronous_commit', 'on', true) END AS durable`,
          [run.runId, run.attempt],
        )
        const outcome = rows[0]?.outcome ?? null
        if (outcome !== null) {
          await client.query('ROLLBACK')
          state = 'refused'
          refusal = outcome
          throw new SingletonError(
            'FENCED',
            `task "${run.policy}", epoch ${run.epoch}: the fenced transaction may not commit: ${FENCE_REASONS[outcome] ?? outcome}.`,
          )
        }
        const result = await fn(client)
        // Still the transaction the fence opened: fn neither ended it (its later writes
        // would not be fenced) nor left it aborted (COMMIT would roll it back quietly).
        const { rows: same } = await client.query<{ xid: string | null }>(
          'SELECT txid_current_if_assigned()::text AS xid',
        )
        if (same[0]?.xid !== rows[0]?.xid) {
          throw new SingletonError(
            'TASK_FAILED',
            `task "${run.policy}": the function given to fenced() ended its transaction itself (COMMIT or ROLLBACK inside it); what it wrote after that was not fenced.`,
          )
        }
        const commit = await client.query('COMMIT')
        if (commit.command !== 'COMMIT') {
          throw new SingletonError(
            'TASK_FAILED',
            `task "${run.policy}": PostgreSQL rolled the fenced transaction back at COMMIT.`,
          )
        }
        state = 'committed'
        return result
      } catch (error) {
        if (state === 'open') {
          state = 'refused'
          rolledBack = expired ?? error
          await client.query('ROLLBACK').catch(drop)
        }
        throw expired ?? error
      } finally {
        clearTimeout(deadline)
      }
    })
    inFlight = transaction.catch(() => {})
    return transaction
  }

  // The run's time limit. At it the handler is told to stop, and a run whose fenced
  // transaction has not begun is recorded failed at once (so it is retried, with backoff,
  // whatever the handler does next, and a fenced() it calls later runs nothing). One in
  // its fenced transaction ends by that transaction's own deadline.
  const timeoutSeconds = Math.min(
    taskTimeoutSeconds(run.definition),
    jobExpiresInSeconds !== undefined && jobExpiresInSeconds > 10
      ? jobExpiresInSeconds - 5
      : Number.POSITIVE_INFINITY,
  )
  const limit = new AbortController()
  let timedOut: SingletonError | undefined
  let failedAtTimeout: ReturnType<typeof runs.fail> | undefined
  const timer = setTimeout(() => {
    timedOut = new SingletonError(
      'TASK_TIMEOUT',
      `task "${run.policy}": the run took longer than its timeout (${seconds(timeoutSeconds)}) and was told to stop (ctx.signal)`,
    )
    limit.abort(timedOut)
    if (state !== 'unused') return
    state = 'timed out'
    const error = timedOut
    failedAtTimeout = runs.fail(deps.pool, run, timedOut.message, true)
    failedAtTimeout
      .then((recorded) =>
        deps.onTimedOut?.(error, {
          runId: run.runId,
          policy: run.policy,
          status: recorded?.status ?? 'fenced',
        }),
      )
      // A failed write is awaited below, once the handler has returned; a report that
      // throws (a user's logger) must not end the process.
      .catch(() => {})
  }, timeoutSeconds * 1000)

  const context: TaskContext = {
    name: run.policy,
    scheduledFor: run.scheduledFor,
    coalesced: run.coalesced,
    reissued: run.reissued,
    runId: run.runId,
    attempt: run.attempt,
    epoch: run.epoch,
    nodeId: deps.nodeId,
    signal: AbortSignal.any([signal, limit.signal]),
    fenced,
  }
  let failure: unknown
  try {
    await handler(context)
  } catch (error) {
    failure = error
  } finally {
    clearTimeout(timer)
  }
  // A fenced() the handler did not await ends before the run is judged.
  await inFlight

  if (state === 'timed out' && timedOut && failedAtTimeout) {
    // Recorded at the limit. Not recorded: the run was closed meanwhile (a holder fenced it).
    const recorded = await failedAtTimeout
    return {
      ...report,
      status: recorded?.status ?? 'fenced',
      reason: timedOut.message,
      timedOut: true,
      // Reported as an error when it was recorded (onTimedOut), not again now.
      reported: true,
    }
  }

  if (state === 'committed') {
    return failure === undefined
      ? { ...report, status: 'done' }
      : {
          ...report,
          status: 'done',
          reason: `the handler threw after its fenced transaction committed (the occurrence is done): ${errorMessage(failure)}`,
        }
  }
  if (refusal !== undefined) {
    const reason = `task "${run.policy}": ${FENCE_REASONS[refusal] ?? refusal}`
    if (refusal !== 'superseded') await runs.fence(deps.pool, run, reason)
    return { ...report, status: 'fenced', reason }
  }
  // The fenced transaction rolled back (its function threw, or the commit failed) and the
  // handler went on: the occurrence's writes are not there, so the run is not done.
  if (failure === undefined && state === 'refused') failure = rolledBack
  if (failure !== undefined) {
    // A run past its limit whose fenced transaction did not commit failed; one stopped for
    // the node's own reasons (it is stopping, the run was fenced) did not.
    const interrupted = signal.aborted && !timedOut
    const reason = timedOut
      ? `${timedOut.message} (${errorMessage(failure)})`
      : interrupted
        ? `interrupted: ${String(signal.reason ?? 'stopping')} (${errorMessage(failure)})`
        : `task "${run.policy}" failed: ${errorMessage(failure)}`
    const recorded = await runs.fail(deps.pool, run, reason, !interrupted)
    if (!recorded) {
      // No longer this attempt's running run. It may be done: a function that committed
      // the fenced transaction itself committed the run's completion with it.
      const { rows } = await deps.pool.query<{ status: string }>(
        'SELECT status FROM pgsingleton.cleanup_runs WHERE id = $1',
        [run.runId],
      )
      if (rows[0]?.status === 'done') return { ...report, status: 'done', reason }
    }
    return {
      ...report,
      status: recorded?.status ?? 'fenced',
      reason,
      interrupted,
      ...(timedOut ? { timedOut: true } : {}),
    }
  }
  const completed = await runs.complete(deps.pool, deps.limits, run)
  if (completed.status !== 'done') return { ...report, status: 'fenced', reason: completed.reason }
  return { ...report, status: 'done' }
}

/** A limit in seconds as a person would say it: `90 s`, `2 hours`, `1 hour 30 minutes`. */
function seconds(total: number): string {
  if (total < 60 || total % 60 !== 0) return `${total} s`
  const hours = Math.floor(total / 3600)
  const minutes = (total % 3600) / 60
  const parts = [
    ...(hours > 0 ? [`${hours} hour${hours === 1 ? '' : 's'}`] : []),
    ...(minutes > 0 ? [`${minutes} minute${minutes === 1 ? '' : 's'}`] : []),
  ]
  return parts.join(' ')
}
