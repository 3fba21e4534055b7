import type { PgBoss } from 'pg-boss'
import { type CleanupJob, queueName } from '../schedule/queue.js'
import { type CleanupDeps, prepareStatements, type RunReport, runCleanup } from './run-cleanup.js'

/**
 * The queue's policy is pg-boss's `singleton` with the policy name as `singletonKey`:
 * at most one active job per retention policy across the whole cluster, however many
 * nodes work the queue, while a re-issued occurrence can still queue behind it.
 */
export async function ensureQueue(boss: PgBoss, singleton: string): Promise<void> {
  const name = queueName(singleton)
  if (await boss.getQueue(name)) return
  await boss.createQueue(name, {
    policy: 'singleton',
    retryLimit: 5,
    retryDelay: 1,
    retryBackoff: true,
    retryDelayMax: 60,
    // Workers heartbeat their job, so pg-boss can fail the job of a worker that died
    // (the holder closes such runs and cancels their jobs sooner, on its next tick).
    heartbeatSeconds: 10,
    // A run is batches of milliseconds each; an hour bounds one that is stuck.
    expireInSeconds: 3600,
    notify: true,
  })
}

export interface CleanupWorkerHooks {
  onRun(report: RunReport): void
  onError(error: unknown): void
}

/** Works the singleton's cleanup queue on this node (any node may; the fence decides). */
export class CleanupWorker {
  readonly #boss: PgBoss
  readonly #deps: CleanupDeps
  readonly #hooks: CleanupWorkerHooks
  readonly #singleton: string
  readonly #pollingIntervalSeconds: number
  readonly #stopping = new AbortController()
  readonly #statements
  #workerId: string | undefined

  constructor(
    boss: PgBoss,
    singleton: string,
    deps: CleanupDeps,
    pollingIntervalSeconds: number,
    hooks: CleanupWorkerHooks,
  ) {
    this.#boss = boss
    this.#singleton = singleton
    this.#deps = deps
    this.#hooks = hooks
    this.#pollingIntervalSeconds = pollingIntervalSeconds
    this.#statements = prepareStatements(deps.policies)
  }

  async start(): Promise<void> {
    this.#workerId = await this.#boss.work<CleanupJob>(
      queueName(this.#singleton),
      {
        batchSize: 1,
        pollingIntervalSeconds: this.#pollingIntervalSeconds,
        notifyPollingIntervalSeconds: 5,
      },
      async (jobs) => {
        for (const job of jobs) {
          const signal = AbortSignal.any([job.signal, this.#stopping.signal])
          try {
            const report = await runCleanup(this.#deps, this.#statements, job.data, signal)
            this.#hooks.onRun(report)
          } catch (error) {
            this.#hooks.onError(error)
            throw error // pg-boss retries the job, on this node or another
          }
        }
      },
    )
  }

  /** Lets the batch in flight commit, then stops taking jobs. */
  async stop(): Promise<void> {
    this.#stopping.abort('the node is stopping')
    if (this.#workerId)
      await this.#boss.offWork(queueName(this.#singleton), { id: this.#workerId, wait: true })
  }
}
