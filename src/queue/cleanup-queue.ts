import type pg from 'pg'
import type { PgBoss } from 'pg-boss'
import { isTask, type RunDefinition, taskTimeoutSeconds } from '../config/definition.js'

/**
 * Everything that touches pg-boss: the queue's name and options, sending and cancelling
 * jobs inside our own transactions, and working the queue. pg-boss only delivers: the
 * run's state, its retries and its definition live in `pgsingleton.cleanup_runs`.
 */

/**
 * The queue of one singleton's cleanup runs. `/` cannot appear in a singleton's name, so
 * no name maps to another's queue; and nodes from before schema 2 work the old
 * `pgsingleton.<name>` queue, so they never receive a job of this protocol.
 */
export function queueName(singleton: string): string {
  return `pgsingleton/cleanup/${singleton}`
}

/** What a job carries: which run to work, and the fingerprint of its definition. */
export interface CleanupJob {
  runId: string
  singleton: string
  policy: string
  epoch: number
  fingerprint: string
}

/**
 * pg-boss's `singleton` policy keyed by the policy name: at most one active job per policy
 * across the cluster. No retries of its own (`retryLimit: 0`): a failed run is retried by
 * the holder, with backoff, from what the database recorded. Applied to an existing
 * queue too, so options set by an older version do not linger.
 */
export async function ensureQueue(boss: PgBoss, singleton: string): Promise<void> {
  const name = queueName(singleton)
  const options = {
    retryLimit: 0,
    // Workers heartbeat their job, so pg-boss can fail the job of a worker that died
    // (the holder closes such runs and re-issues them sooner, on its next tick).
    heartbeatSeconds: 10,
    // A run is batches of milliseconds each; an hour bounds one that is stuck.
    expireInSeconds: 3600,
    notify: true,
  }
  if (await boss.getQueue(name)) {
    const { heartbeatSeconds: _fixed, ...updatable } = options
    await boss.updateQueue(name, updatable)
    return
  }
  await boss.createQueue(name, { policy: 'singleton', ...options })
}

type Tx = Pick<pg.PoolClient, 'query'>

const through = (tx: Tx) => ({
  executeSql: (text: string, values?: unknown[]) => tx.query(text, values),
})

/**
 * How long pg-boss lets the job of a run of `definition` stay active: a task's run a
 * minute longer than its own limit, so that the worker's timeout, which records the run
 * failed, comes first; a cleanup run the queue's hour.
 */
export function jobExpirySeconds(definition: RunDefinition | undefined): number | undefined {
  if (!definition || !isTask(definition)) return undefined
  return Math.ceil(taskTimeoutSeconds(definition)) + 60
}

/** Inserts the job through `tx`: the job exists if and only if the run does. */
export async function sendJob(
  boss: PgBoss,
  tx: Tx,
  job: CleanupJob,
  expireInSeconds?: number,
): Promise<string> {
  const id = await boss.send(queueName(job.singleton), job, {
    singletonKey: job.policy,
    db: through(tx),
    ...(expireInSeconds === undefined ? {} : { expireInSeconds }),
  })
  if (!id) throw new Error(`pg-boss refused the job for policy "${job.policy}"`)
  return id
}

/**
 * Cancels jobs of runs a holder closed: a job left `active` by a killed worker would hold
 * the policy's singleton slot until it expires, and the re-issued run would queue behind it.
 */
export async function cancelJobs(
  boss: PgBoss,
  tx: Tx,
  singleton: string,
  ids: readonly string[],
): Promise<void> {
  if (ids.length > 0) await boss.cancel(queueName(singleton), [...ids], { db: through(tx) })
}

/** The state pg-boss has for a job of this singleton's queue, or null when it has none. */
export async function jobState(
  boss: PgBoss,
  tx: Tx,
  singleton: string,
  id: string,
): Promise<string | null> {
  const job = await boss.getJobById(queueName(singleton), id, { db: through(tx) })
  return job?.state ?? null
}

/** Works the queue, one job at a time; returns the worker's id for `stopWorking`. */
export function workJobs(
  boss: PgBoss,
  singleton: string,
  pollingIntervalSeconds: number,
  /** `expireInSeconds`: how long pg-boss lets the job stay active (a task's run ends before). */
  handle: (job: CleanupJob, signal: AbortSignal, expireInSeconds: number) => Promise<void>,
): Promise<string> {
  return boss.work<CleanupJob>(
    queueName(singleton),
    { batchSize: 1, pollingIntervalSeconds, notifyPollingIntervalSeconds: 5 },
    async (jobs) => {
      for (const job of jobs) await handle(job.data, job.signal, job.expireInSeconds)
    },
  )
}

/** Stops taking jobs and waits for the job in hand. */
export async function stopWorking(boss: PgBoss, singleton: string, id: string): Promise<void> {
  await boss.offWork(queueName(singleton), { id, wait: true })
}
