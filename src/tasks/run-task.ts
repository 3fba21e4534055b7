import type pg from 'pg'
import type { RunReport } from '../cleanup/run-cleanup.js'
import type { TaskDefinition } from '../config/definition.js'
import type { TaskContext } from '../config/task.js'
import { withClient } from '../db/transaction.js'
import { errorMessage, SingletonError } from '../errors.js'
import { localSettings, type TransactionLimits } from '../runs/fence.js'
import * as runs from '../runs/runs.js'

export interface TaskDeps {
  readonly pool: pg.Pool
  readonly nodeId: string
  readonly limits: TransactionLimits
  /** This node's handlers, by task name. */
  readonly handlers: ReadonlyMap<string, (context: TaskContext) => unknown>
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

  let state = 'unused' as 'unused' | 'open' | 'committed' | 'refused'
  let refusal: string | undefined
  const fenced: TaskContext['fenced'] = async (fn) => {
    if (state !== 'unused') {
      throw new SingletonError(
        'FENCED_ONCE',
        `task "${run.policy}": fenced() runs once per run, and this run already called it (its transaction ${state === 'committed' ? 'committed' : state === 'open' ? 'is open' : 'was refused'}); put all of the occurrence's writes in one fenced transaction.`,
      )
    }
    state = 'open'
    return withClient(deps.pool, async (client, drop) => {
      await client.query(`BEGIN; ${localSettings(deps.limits, { utc: false })}`)
      try {
        const { rows } = await client.query<{ outcome: string | null }>(
          'SELECT pgsingleton.task_fence($1, $2) AS outcome',
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
        await client.query('COMMIT')
        state = 'committed'
        return result
      } catch (error) {
        if (state === 'open') {
          state = 'refused'
          await client.query('ROLLBACK').catch(drop)
        }
        throw error
      }
    })
  }

  const context: TaskContext = {
    name: run.policy,
    scheduledFor: run.scheduledFor,
    epoch: run.epoch,
    nodeId: deps.nodeId,
    signal,
    fenced,
  }
  let failure: unknown
  try {
    await handler(context)
  } catch (error) {
    failure = error
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
  if (failure !== undefined) {
    const interrupted = signal.aborted
    const reason = interrupted
      ? `interrupted: ${String(signal.reason ?? 'stopping')} (${errorMessage(failure)})`
      : `task "${run.policy}" failed: ${errorMessage(failure)}`
    const recorded = await runs.fail(deps.pool, run, reason, !interrupted)
    return { ...report, status: recorded?.status ?? 'fenced', reason, interrupted }
  }
  const completed = await runs.complete(deps.pool, deps.limits, run)
  if (completed.status === 'fenced')
    return { ...report, status: 'fenced', reason: completed.reason }
  return { ...report, status: 'done' }
}
