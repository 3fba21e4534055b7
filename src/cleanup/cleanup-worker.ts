import type { PgBoss } from 'pg-boss'
import { stopWorking, workJobs } from '../queue/cleanup-queue.js'
import { type CleanupDeps, type RunReport, runCleanup } from './run-cleanup.js'

export interface CleanupWorkerHooks {
  onRun(report: RunReport): void
  onError(error: unknown): void
}

/**
 * Works the singleton's cleanup queue on this node (any node may; the fence decides).
 * Starts and stops as often as the node likes (with `workQueue: 'when-holding'`, with
 * each holdership); a stop lets the batch in flight commit, and the run waits for a retry.
 */
export class CleanupWorker {
  readonly #deps: CleanupDeps
  readonly #hooks: CleanupWorkerHooks
  readonly #singleton: string
  readonly #pollingIntervalSeconds: number
  /** The current subscription: its pg-boss, its worker id, and the signal that stops its runs. */
  #current:
    | { boss: PgBoss; started: Promise<string | undefined>; stopping: AbortController }
    | undefined
  #closed = false

  constructor(
    singleton: string,
    deps: CleanupDeps,
    pollingIntervalSeconds: number,
    hooks: CleanupWorkerHooks,
  ) {
    this.#singleton = singleton
    this.#deps = deps
    this.#hooks = hooks
    this.#pollingIntervalSeconds = pollingIntervalSeconds
  }

  /** Works the queue through `boss`. Idempotent; after close() it does nothing. */
  start(boss: PgBoss): Promise<unknown> {
    if (this.#closed) return Promise.resolve()
    if (this.#current) return this.#current.started
    const stopping = new AbortController()
    const started = workJobs(
      boss,
      this.#singleton,
      this.#pollingIntervalSeconds,
      async (job, jobSignal, expireInSeconds) => {
        const signal = AbortSignal.any([jobSignal, stopping.signal])
        try {
          const started = performance.now()
          const report = await runCleanup(this.#deps, job, signal, expireInSeconds)
          this.#hooks.onRun({ ...report, durationMs: performance.now() - started })
        } catch (error) {
          // The run could not even be claimed or recorded (this node is not live, or the
          // database is unreachable): the job fails, and the holder, seeing the run outlive
          // its job, gives it a new one. Only an unreachable database is an error.
          if ((error as { code?: string }).code !== 'NODE_NOT_LIVE') this.#hooks.onError(error)
          throw error
        }
      },
    ).catch((error) => {
      this.#hooks.onError(error)
      return undefined
    })
    this.#current = { boss, started, stopping }
    return started
  }

  /** Lets the batch in flight commit, then stops taking jobs. start() works again after. */
  async stop(): Promise<void> {
    const current = this.#current
    if (!current) return
    this.#current = undefined
    current.stopping.abort('the node is stopping, or no longer holds')
    const id = await current.started
    if (id) await stopWorking(current.boss, this.#singleton, id)
  }

  /** Stops for good. */
  async close(): Promise<void> {
    this.#closed = true
    await this.stop()
  }
}
