import type { PgBoss } from 'pg-boss'
import { stopWorking, workJobs } from '../queue/cleanup-queue.js'
import { type CleanupDeps, type RunReport, runCleanup } from './run-cleanup.js'

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
  #workerId: string | undefined
  #starting: Promise<void> | undefined

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
  }

  /** Idempotent; after stop() it does nothing. */
  start(): Promise<void> {
    this.#starting ??= this.#start()
    return this.#starting
  }

  async #start(): Promise<void> {
    if (this.#stopping.signal.aborted) return
    this.#workerId = await workJobs(
      this.#boss,
      this.#singleton,
      this.#pollingIntervalSeconds,
      async (job, jobSignal) => {
        const signal = AbortSignal.any([jobSignal, this.#stopping.signal])
        try {
          this.#hooks.onRun(await runCleanup(this.#deps, job, signal))
        } catch (error) {
          // The run could not even be claimed or recorded (this node is not live, or the
          // database is unreachable): the job fails, and the holder, seeing the run outlive
          // its job, gives it a new one. Only an unreachable database is an error.
          if ((error as { code?: string }).code !== 'NODE_NOT_LIVE') this.#hooks.onError(error)
          throw error
        }
      },
    )
  }

  /** Lets the batch in flight commit, then stops taking jobs. */
  async stop(): Promise<void> {
    this.#stopping.abort('the node is stopping')
    await this.#starting?.catch(() => {})
    if (this.#workerId) await stopWorking(this.#boss, this.#singleton, this.#workerId)
  }
}
