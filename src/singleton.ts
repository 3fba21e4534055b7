import { EventEmitter } from 'node:events'
import pg from 'pg'
import type { PgBoss } from 'pg-boss'
// A namespace import: a pg-boss of another major, without this export, must not fail the
// import of pg-singleton itself; start() names the version instead.
import * as pgBoss from 'pg-boss'
import { CleanupWorker } from './cleanup/cleanup-worker.js'
import { LearnedSizes } from './cleanup/pacing.js'
import type { RunDefinition } from './config/definition.js'
import {
  type ResolvedOptions,
  resolveOptions,
  type SingletonOptions,
  withoutApplicationName,
} from './config/options.js'
import { validatePolicies } from './config/validate-policies.js'
import { assertSchemaCurrent, migrateToLatest } from './db/migrate.js'
import { isPassingConnectionFailure, SQLSTATE, sqlState } from './db/sqlstate.js'
import { assertPeersSupported } from './dependencies.js'
import { errorMessage, SingletonError } from './errors.js'
import type { SingletonEvents, SingletonWarning } from './events.js'
import { type Lease, LockSession } from './lock/lock-session.js'
import { connectionKeepsSession } from './lock/session-pinning.js'
import { Starter } from './lock/starter.js'
import { SingletonMetrics } from './metrics.js'
import { pausePolicy, requestRun, resumePolicy } from './operations/controls.js'
import { type PolicyPlan, planPolicies } from './operations/plan.js'
import { ensureQueue } from './queue/cleanup-queue.js'
import { listen, listenBackoffMs, useOwnListener } from './queue/listener.js'
import type { TransactionLimits } from './runs/fence.js'
import { runScheduler } from './schedule/scheduler.js'
import { type PolicyStatus, readPolicyStatus } from './status/read-policy-status.js'
import { readStatus, type SingletonStatus } from './status/read-status.js'
import { Alarm, settleWithin, sleep } from './wait.js'

/** The server checks a waiting lock session's socket this often (client_connection_check_interval). */
const CONNECTION_CHECK_MS = 1000

/**
 * One node of a cluster-wide singleton. Every node runs one; the one whose lock session
 * holds the advisory lock schedules cleanup runs, and every node works the cleanup queue.
 */
export class Singleton extends EventEmitter<SingletonEvents> implements AsyncDisposable {
  readonly options: ResolvedOptions
  #pool: pg.Pool | undefined
  /** Stops this node's own pg-boss, if it runs. */
  #stopBoss: (() => Promise<unknown>) | undefined
  #worker: CleanupWorker | undefined
  /** The epoch this node holds, while it holds. */
  #heldEpoch: number | undefined
  #starter: Starter | undefined
  #scheduler: Promise<void> | undefined
  /** Rung by requests (runNow, and those the holder hears) and by each run's end: while this node holds, its scheduler looks at once. */
  readonly #runAsked = new Alarm()
  /** Each holdership's LISTEN for requests, until it has ended (its fence aborted). */
  readonly #hearing = new Set<Promise<void>>()
  #starting: Promise<void> | undefined
  #stopping: Promise<void> | undefined
  /** Aborts when stop() is called: background retries end. */
  readonly #stopped = new AbortController()

  constructor(options: SingletonOptions) {
    super()
    this.options = resolveOptions(options)
  }

  get nodeId(): string {
    return this.options.nodeId
  }

  /** The lease this node holds, or undefined when it is a standby. */
  get lease(): Lease | undefined {
    return this.#starter?.lease
  }

  /**
   * Checks the schema and every policy against the database (failing before anything
   * is deleted), starts the cleanup worker, and queues for the lock. Resolves once the
   * node is queued or holding; holding is announced by `lock:acquired`. Idempotent.
   */
  start(): Promise<void> {
    if (this.#stopping)
      return Promise.reject(new Error('this singleton node was stopped; create a new one'))
    this.#starting ??= this.#start().catch(async (error) => {
      await this.#shutdown()
      throw error
    })
    return this.#starting
  }

  /**
   * Stops scheduling and unlocks at once, so the next node takes over without waiting
   * (its epoch bump waits for the batch in flight, which commits); then stops the worker
   * and closes. Idempotent; safe to call while `start()` runs.
   */
  stop(): Promise<void> {
    // A holder unlocks first, in this tick; the rest of the stop follows.
    this.#starter?.handOverNow()
    this.#stopped.abort()
    this.#stopping ??= (async () => {
      await this.#starting?.catch(() => {})
      await this.#shutdown()
    })()
    return this.#stopping
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop()
  }

  /** This singleton's row of `pgsingleton.status`. */
  async status(): Promise<SingletonStatus | undefined> {
    const [row] = await readStatus(this.#requirePool(), this.options.name)
    return row
  }

  /** The node id that holds this singleton now, by the server's lock table; null if none. */
  async whereis(): Promise<string | null> {
    return (await this.status())?.nodeId ?? null
  }

  /** This singleton's rows of `pgsingleton.policy_status`. */
  policyStatus(): Promise<PolicyStatus[]> {
    return readPolicyStatus(this.#requirePool(), this.options.name)
  }

  /** Pauses a policy cluster-wide (stored in the database; whoever holds honours it). */
  pause(policy: string): Promise<void> {
    return pausePolicy(this.#requirePool(), this.options.name, policy, this.nodeId)
  }

  resume(policy: string): Promise<void> {
    return resumePolicy(this.#requirePool(), this.options.name, policy, this.nodeId)
  }

  /** Asks the holder for a run of the policy now, outside its schedule. */
  async runNow(policy: string): Promise<void> {
    await requestRun(this.#requirePool(), this.options.name, policy, this.nodeId)
    // Asked on the holder, its scheduler looks now, without waiting for the announcement
    // (which a holder also hears from any other node or client: hearRequests).
    this.#runAsked.ring()
  }

  /** What each of this node's policies would delete now; deletes nothing. */
  async plan(): Promise<PolicyPlan[]> {
    return (await planPolicies(this.#requirePool(), this.options.policies)).plans
  }

  async #start(): Promise<void> {
    const options = this.options
    assertPeersSupported()
    // Every query has a client-side deadline (the batch's statement_timeout plus a
    // margin): a query on a connection whose path died without a word is abandoned, and
    // the connection (dropped on the error) replaced.
    const queryDeadlineMs = options.batchStatementTimeoutMs + options.deadConnectionAfterMs
    const pool =
      options.pool ??
      new pg.Pool({
        connectionString: options.connectionString,
        max: 4,
        application_name: `${options.nodeId} pool`,
        keepAlive: true,
        query_timeout: queryDeadlineMs,
        // A connection attempt on a dead path gets no answer either: without this, it
        // would wait for good (and pool.end() with it).
        connectionTimeoutMillis: queryDeadlineMs,
      })
    if (!options.pool) pool.on('error', (error) => this.#emitError(error))
    this.#pool = pool
    if (options.migrate) await migrateToLatest(pool)
    // The start-up checks run on a connection of their own, closed after them: the pool
    // opens connections only once the node works (a standby never does, and then costs
    // its lock session alone). On an app's pool, they borrow from it.
    const setup = options.pool
      ? pool
      : new pg.Client({
          connectionString: options.connectionString,
          application_name: `${options.nodeId} setup`,
          connectionTimeoutMillis: queryDeadlineMs,
          query_timeout: queryDeadlineMs,
        })
    let checked: Awaited<ReturnType<typeof validatePolicies>>
    let bossInstalled: boolean
    try {
      if (setup instanceof pg.Client) {
        // Its session may end between two statements (a restart, pg_terminate_backend):
        // the client then emits 'error', which unheard would end the process. The next
        // statement fails with it, and start() with that.
        setup.on('error', () => {})
        await setup.connect()
      }
      await assertSchemaCurrent(setup)
      checked = await validatePolicies(setup, options.policies, options.tasks)
      const { rows } = await setup.query<{ installed: boolean }>(
        `SELECT to_regclass('pgboss.version') IS NOT NULL AS installed`,
      )
      bossInstalled = rows[0]?.installed === true
    } finally {
      if (setup instanceof pg.Client) await setup.end().catch(() => {})
    }
    const { warnings, understood } = checked
    const definitions: RunDefinition[] = [...checked.definitions, ...checked.tasks]
    for (const line of understood) options.logger.info({}, line)
    for (const warning of warnings) this.#warn(warning)

    const connection: pg.ClientConfig = options.lockConnectionString
      ? { connectionString: options.lockConnectionString }
      : options.connectionString
        ? { connectionString: options.connectionString }
        : borrowedConnection(pool)
    const sessionSettings = {
      name: options.name,
      nodeId: options.nodeId,
      idleSessionTimeoutMs: options.idleSessionTimeoutMs,
      lockWaitSliceMs: options.lockWaitSliceMs,
      connectionCheckMs: CONNECTION_CHECK_MS,
      deadAfterMs: options.deadConnectionAfterMs,
    }
    // Fail start() now, not in the background, where the lock connection cannot keep a
    // session (a transaction pooler) or the server is too old.
    const probe = new LockSession(connection, sessionSettings)
    try {
      await probe.connect()
    } finally {
      await probe.close()
    }

    // LISTEN needs a session: through a transaction pooler pg-boss polls instead.
    const pooled = options.connectionString
      ? !(await connectionKeepsSession({ connectionString: options.connectionString }))
      : true
    if (options.connectionString && pooled) {
      options.logger.info(
        {},
        'the pool goes through a transaction pooler: pg-boss polls its queue instead of LISTEN',
      )
    }
    const bossOptions = {
      ...(options.connectionString
        ? { connectionString: options.connectionString }
        : { db: { executeSql: (text: string, values?: unknown[]) => pool.query(text, values) } }),
      application_name: `${options.nodeId} pg-boss`,
      max: 4,
      // pg-boss hands its options to its pg.Pool as they are (its types do not list these):
      // keepalive, and a client-side deadline; its own maintenance can take longer than a
      // batch, so a minute, which still ends a query on a dead path. Its LISTEN connection
      // has a heartbeat of its own.
      keepAlive: true,
      query_timeout: Math.max(60_000, queryDeadlineMs),
      connectionTimeoutMillis: queryDeadlineMs,
      schedule: false, // the holder schedules from pgsingleton.schedules, fenced by epoch
      migrate: false, // `pg-singleton migrate` installs pg-boss's schema; nodes need no CREATE
      useListenNotify: !pooled,
    }
    // pg-boss (its pool, its LISTEN connection, its timers) runs only while this node needs
    // it: while it holds, or, with workQueue 'always', from its registration on. A standby
    // costs its lock session and nothing else, also after it held: pg-boss stops with each
    // holdership (and a new instance starts with the next). An app's own pg-boss is used
    // as it is, never started or stopped here.
    let bossUp: Promise<PgBoss> | undefined
    let bossTurn: Promise<unknown> = Promise.resolve()
    const startBoss = (): Promise<PgBoss> => {
      if (bossUp) return bossUp
      const up = (async () => {
        await bossTurn.catch(() => {})
        const boss = options.boss ?? new pgBoss.PgBoss(bossOptions as pgBoss.ConstructorOptions)
        if (!options.boss) {
          boss.on('error', (error) => this.#emitError(error))
          if (options.connectionString && !pooled) {
            useOwnListener(
              boss,
              {
                connectionString: options.connectionString,
                application_name: `${options.nodeId} pg-boss listen`,
              },
              {
                what: 'pg-boss',
                heartbeatMs: 10_000,
                deadlineMs: queryDeadlineMs,
                onError: (error) => this.#emitError(error),
              },
            )
          }
          await boss.start().catch(async (error: unknown) => {
            // A start that failed part-way may have opened connections: closed now.
            await boss.stop({ graceful: false, close: true }).catch(() => {})
            throw bossStartError(error)
          })
        }
        try {
          await ensureQueue(boss, options.name)
        } catch (error) {
          // A pg-boss of ours that started stops again: left running, its pool, timers and
          // LISTEN connection would outlive this holdership and the node's stop.
          if (!options.boss) await boss.stop({ graceful: false, close: true }).catch(() => {})
          throw error
        }
        return boss
      })()
      bossUp = up
      up.catch(() => {
        if (bossUp === up) bossUp = undefined
      })
      return up
    }
    const stopBoss = (): Promise<unknown> => {
      const up = bossUp
      bossUp = undefined
      if (up)
        bossTurn = up.then(
          (boss) => {
            if (options.boss) return undefined
            // Our worker has stopped by now, so nothing of ours runs in it. Its pool closes
            // once its queries end; on a dead path one may wait for its minute-long deadline,
            // and a stop or the next holdership does not wait for that: the pool closes in
            // the background.
            return settleWithin(
              boss.stop({ graceful: true, close: true, timeout: 10_000 }),
              queryDeadlineMs,
            )
          },
          () => undefined,
        )
      // A start still in flight (a try left behind by its deadline, behind a lock, say)
      // is stopped once it is up, in the background: the caller waits two query deadlines
      // at most (its start, its stop). The next start waits for it all (bossTurn), so two
      // never run at once.
      return settleWithin(bossTurn, queryDeadlineMs * 2)
    }
    this.#stopBoss = stopBoss
    if (!bossInstalled) {
      throw new SingletonError(
        'SCHEMA_NOT_MIGRATED',
        "pg-boss's schema (pgboss) is not installed. Run `pg-singleton migrate`, which installs it, or your migrator with pg-singleton's migrations.",
      )
    }
    if (options.workQueue === 'always') await startBoss()

    const limits: TransactionLimits = {
      lockTimeoutMs: options.batchLockTimeoutMs,
      statementTimeoutMs: options.batchStatementTimeoutMs,
      // A worker frozen inside a batch holds its fence lock; the server ends it on the
      // same bound that ends a frozen holder's session.
      idleInTransactionTimeoutMs: options.idleSessionTimeoutMs,
    }
    const metrics = new SingletonMetrics(options.name, options.nodeId, {
      holding: () => this.#heldEpoch,
      pool: () => this.#pool,
    })
    this.#worker = new CleanupWorker(
      options.name,
      {
        pool,
        nodeId: options.nodeId,
        limits,
        batchPauseMs: options.batchPauseMs,
        batchTargetMs: options.batchTargetMs,
        maxReplicaLagMs: options.maxReplicaLagMs,
        handlers: new Map(options.tasks.map((task) => [task.name, task.handler])),
        sizes: new LearnedSizes(),
        onBatch: (batch) => {
          metrics.batch(batch.policy, batch.rows, batch.elapsedMs)
          this.#safeEmit('cleanup:batch', batch)
        },
        onTimedOut: (error, run) =>
          this.#emitError(
            new SingletonError(
              'TASK_TIMEOUT',
              `task "${run.policy}", run ${run.runId} ${run.status === 'failed' ? 'failed and will be retried' : run.status === 'exhausted' ? 'failed on its last retry' : run.status}: ${error.message}`,
            ),
          ),
      },
      options.workerPollingIntervalSeconds,
      {
        onRun: (report) => {
          // On the holder (where runs are worked by default) its scheduler looks now: a
          // request held back by this run, or an occurrence coalesced behind it, is issued
          // at once rather than at the next tick.
          this.#runAsked.ring()
          options.logger.info(
            { ...report },
            `${report.kind === 'task' ? 'task' : 'cleanup'} run ${report.status}`,
          )
          metrics.run(report)
          this.#safeEmit(report.kind === 'task' ? 'task:done' : 'cleanup:done', report)
          if (report.interrupted || report.reported) return // a requested stop is not an error
          if (report.kind === 'task') {
            if (report.status === 'failed' || report.status === 'exhausted' || report.reason) {
              this.#emitError(
                new SingletonError(
                  report.timedOut ? 'TASK_TIMEOUT' : 'TASK_FAILED',
                  `task "${report.policy}", run ${report.runId} ${report.status === 'failed' ? 'failed and will be retried' : report.status === 'exhausted' ? 'failed on its last retry' : report.status}: ${report.reason}`,
                ),
              )
            }
            return
          }
          if (report.status === 'failed' || report.status === 'exhausted') {
            this.#emitError(
              new SingletonError(
                'CLEANUP_FAILED',
                `policy "${report.policy}", run ${report.runId} ${report.status === 'failed' ? 'failed and will be retried' : 'failed on its last retry'}: ${report.reason}`,
              ),
            )
          } else if (report.rowsSkipped > 0) {
            this.#emitError(
              new SingletonError(
                'ROWS_SKIPPED',
                `policy "${report.policy}", run ${report.runId}: ${report.rowsSkipped} outdated rows could not be deleted and are left for a later run; first reason: ${report.reason}`,
              ),
            )
          }
        },
        onError: (error) => this.#emitError(error),
      },
    )
    // The worker starts once the node is registered (a node whose definitions do not count
    // towards the agreement may not delete; claim() checks it too): with workQueue 'always'
    // then, and otherwise with each holdership.
    const worker = this.#worker
    // With 'when-holding', a holdership that ended while pg-boss was still starting does
    // not start the worker.
    let holding = false
    // A new holder's pg-boss may fail to start on a blip the lock session outlived or is
    // about to be told of: a server restart, a database closed to new connections for a
    // while, max_connections reached. Stepping down on it would leave a one-node cluster
    // without a holder for the cool-off, and a server's restart would have every node in
    // turn step down on it. So the holder tries again, with the starter's backoff, until
    // stepDownAfterMs from the first failure, the bound its failing schedule ticks get (a
    // try still running then is left to finish in the background, and stopped with the
    // holdership). A failure that does not pass by itself (a schema pg-boss cannot run
    // on, a password, a permission) steps it down at once, as before.
    const startBossWhileHolding = async (fence: AbortSignal): Promise<PgBoss | undefined> => {
      // The last holdership's pg-boss may still be stopping (a quick re-acquire): that is
      // not this one's failure, and does not count against its deadline. Waited for as
      // long as stopBoss lets a caller wait.
      await settleWithin(bossTurn, queryDeadlineMs * 2, fence)
      if (fence.aborted) return undefined
      const began = performance.now()
      const deadline = began + options.stepDownAfterMs
      let delay = options.reconnectDelayMs
      for (;;) {
        // Each try ends by the deadline (the last gets a second at least), or with the fence.
        const ends = new AbortController()
        const end = () => ends.abort()
        fence.addEventListener('abort', end)
        const limit = Math.max(1000, deadline - performance.now())
        try {
          const boss = await Promise.race([
            startBoss(),
            sleep(limit, ends.signal).then(() => {
              // Ended by the fence, or by the try's own end (its outcome is the race's).
              if (ends.signal.aborted) return undefined
              throw new Error(`it did not start within ${options.stepDownAfterMs} ms`)
            }),
          ])
          return fence.aborted ? undefined : boss
        } catch (error) {
          if (fence.aborted) return undefined
          const reason =
            error instanceof SingletonError
              ? error.message
              : `pg-boss could not start: ${errorMessage(error)}`
          const left = deadline - performance.now()
          const passing = isPassingConnectionFailure(error) || /did not start within/.test(reason)
          if (!passing || left <= 0) {
            throw new SingletonError(
              passing || !(error instanceof SingletonError) ? 'QUEUE_NOT_STARTED' : error.code,
              passing
                ? `pg-boss has not started for ${Math.round((performance.now() - began) / 1000)} s (stepDownAfterMs ${options.stepDownAfterMs}); last: ${reason}`
                : reason,
              { cause: error },
            )
          }
          const wait = Math.min(delay, left)
          const retry = `${reason}; holding on, trying again in ${Math.round(wait)} ms`
          this.#emitError(new SingletonError('QUEUE_NOT_STARTED', retry, { cause: error }))
          await sleep(wait, fence)
          if (fence.aborted) return undefined
          delay = Math.min(delay * 2, 5000)
        } finally {
          fence.removeEventListener('abort', end)
          ends.abort()
        }
      }
    }
    const work = (boss: PgBoss) => {
      // Not for a holdership that ended, or a node that is stopping (its worker is closing).
      if (this.#stopping || !(options.workQueue === 'always' || holding)) return
      worker.start(boss).catch((error) => this.#emitError(error))
    }
    const workWhenUp = () =>
      startBoss()
        .then(work)
        .catch((error) => this.#emitError(error))
    const schedule = (boss: PgBoss, lease: Lease, fence: AbortSignal) =>
      runScheduler(
        {
          pool,
          boss,
          definitions,
          limits,
          onScheduled: (run) => {
            options.logger.info({ ...run }, 'cleanup run scheduled')
            this.#safeEmit('schedule:sent', run)
          },
          onDisagreement: (policies) => {
            if (policies.length === 0) {
              options.logger.info({}, 'the live nodes agree on every policy again')
              return
            }
            this.#warn({
              code: 'POLICY_DISAGREEMENT',
              message: `the live nodes hold different definitions of ${policies.map((p) => `"${p}"`).join(', ')}; held back until they agree (see pgsingleton.policy_status)`,
            })
          },
          onError: (error) => this.#emitError(error),
          alarm: this.#runAsked,
        },
        lease,
        fence,
        options.stepDownAfterMs,
      )
    /**
     * While this node holds: a LISTEN on channel pgsingleton, so that a run asked for or a
     * policy resumed, from any node or client (announced by migrations/0008's trigger),
     * wakes the scheduler at once instead of at its next tick (up to 5 s away). On a
     * connection of its own: to the pool's server where that keeps sessions (as pg-boss's
     * LISTEN), else to the lock session's. Not on the lock session itself, whose first
     * LISTEN would read the server's whole notification backlog inside one statement, with
     * the heartbeats and a stop's hand-over queued behind it. Also rung each time it
     * listens, for a request announced while it did not. A first connect that fails is
     * tried again with backoff (reported once). `ended` (the holdership's end) ends it at
     * once, a connect under way too; a standby never listens.
     */
    const requestsConnection: pg.ClientConfig = {
      ...(options.connectionString && !pooled
        ? { connectionString: options.connectionString }
        : connection),
      application_name: `${options.nodeId} requests`,
    }
    const hearRequests = async (ended: AbortSignal): Promise<void> => {
      let reported = false
      for (let attempt = 0; !ended.aborted; attempt++) {
        const handle = await listen(
          requestsConnection,
          {
            what: 'run requests',
            heartbeatMs: 10_000,
            deadlineMs: queryDeadlineMs,
            onError: (error) => {
              if (!ended.aborted) this.#emitError(error)
            },
          },
          'pgsingleton',
          (payload) => {
            if (isRequestFor(payload, options.name)) this.#runAsked.ring()
          },
          () => this.#runAsked.ring(),
          ended,
        ).catch((error) => {
          if (ended.aborted || reported) return undefined
          reported = true
          this.#emitError(
            new Error(
              `the LISTEN for run requests could not start (${errorMessage(error)}): until it can, the holder takes them at its next tick, within 5 s`,
              { cause: error },
            ),
          )
          return undefined
        })
        if (handle) {
          if (!ended.aborted)
            await new Promise((resolve) => ended.addEventListener('abort', resolve))
          await handle.close()
          return
        }
        await sleep(listenBackoffMs(attempt), ended)
      }
    }
    /**
     * The holder's part: pg-boss started, then the schedule, until the holdership ends or
     * the holder cannot do its job. Then it steps down, so that a healthier node holds;
     * but only when another node waits to take over. Alone, it would only leave the
     * singleton without a holder for the cool-off: it holds on, says so, and tries again.
     * It hears requests meanwhile, until the fence aborts; a stop waits for that to end.
     */
    const lead = async (lease: Lease, fence: AbortSignal): Promise<void> => {
      const hearing = this.#stopping ? undefined : hearRequests(fence)
      if (hearing) {
        this.#hearing.add(hearing)
        const done = () => this.#hearing.delete(hearing)
        hearing.then(done, done)
      }
      let warned = false
      while (!fence.aborted) {
        const began = performance.now()
        let reason: string | undefined
        const boss = await startBossWhileHolding(fence).catch((error) => {
          this.#emitError(error)
          reason = errorMessage(error)
          return undefined
        })
        if (boss && !fence.aborted) {
          work(boss)
          reason = await schedule(boss, lease, fence)
        }
        if (!reason || fence.aborted) return
        // A lock session that does not answer holds on too: if it is gone, the hold ends as
        // lost by itself, and the node queues again at once.
        const waiting = await this.#starter?.othersWaiting(lease.epoch).catch(() => false)
        if (fence.aborted) return
        if (waiting) {
          this.#starter?.stepDown(reason, lease.epoch)
          return
        }
        if (!warned) {
          warned = true
          this.#warn({
            code: 'STEP_DOWN_SKIPPED',
            message: `the holder would step down (${reason}), but no other node waits to take over: it holds on, and tries again`,
          })
        }
        // A failure that comes back at once (a schema) is tried again only this long after.
        await sleep(options.stepDownAfterMs - (performance.now() - began), fence)
      }
    }

    this.#starter = new Starter(
      connection,
      {
        ...sessionSettings,
        definitions,
        stepDownCoolOffMs: options.stepDownAfterMs,
        heartbeatMs: options.heartbeatMs,
        fenceAfterMs: options.fenceAfterMs,
        reconnectDelayMs: options.reconnectDelayMs,
      },
      {
        onRegistered: () => {
          if (options.workQueue === 'always') void workWhenUp() // idempotent
        },
        onWaiting: () => {
          options.logger.info({}, 'queued for the lock')
          this.#safeEmit('lock:waiting', { nodeId: options.nodeId })
        },
        onAcquired: (lease, fence) => {
          options.logger.info(
            { epoch: lease.epoch, backendPid: lease.backendPid },
            'holding the singleton',
          )
          this.#heldEpoch = lease.epoch
          metrics.holdershipStarted()
          this.#safeEmit('lock:acquired', lease)
          holding = true
          this.#scheduler = lead(lease, fence)
        },
        onLost: (lease, reason) => {
          options.logger.warn({ epoch: lease.epoch, reason }, 'fenced: no longer the holder')
          this.#safeEmit('lock:lost', { lease, reason })
          // The term's own account of how it ended (the next holder may have closed it as
          // lost already; a stepped-down holder recorded it as released when it unlocked).
          void this.#recordTermEnd(pool, lease, reason)
          holding = false
          this.#heldEpoch = undefined
          // Its scheduler has stopped (the fence signal); its worker stops, and then pg-boss.
          if (options.workQueue === 'when-holding') {
            const scheduler = this.#scheduler
            worker
              .stop()
              .then(() => scheduler)
              .then(() => (holding ? undefined : stopBoss()))
              .catch((error) => this.#emitError(error))
          }
        },
        onError: (error) => this.#emitError(error),
        onWarning: (warning) => this.#warn(warning),
        onHandOverFailed: async (lease, error) => {
          this.#warn({
            code: 'HAND_OVER_FAILED',
            message: `the hand-over of epoch ${lease.epoch} failed (${errorMessage(error)}): the lock session was closed instead, which frees the lock`,
          })
          // The term is still open: the next holder would close it as lost.
          await pool
            .query('SELECT pgsingleton.end_term($1, $2, $3, $4)', [
              lease.name,
              lease.epoch,
              'released',
              `stopped; the hand-over failed, and the lock session was closed (${errorMessage(error)})`,
            ])
            .catch((recordError) =>
              options.logger.warn(
                { epoch: lease.epoch, error: errorMessage(recordError) },
                'could not record how the term ended',
              ),
            )
        },
        onFatal: (error) => {
          // It cannot run safely here (a transaction pooler in front of the lock session):
          // it stops, and says why. The CLI exits non-zero on this code.
          this.#emitError(error)
          this.stop().catch((stopError) => this.#emitError(stopError))
        },
      },
    )
    await this.#starter.start()
  }

  async #shutdown(): Promise<void> {
    // 1. The starter aborts the holder's fence signal (scheduling stops) and unlocks: the
    //    next node holds at once, and its epoch bump waits for any fenced write in flight.
    const letWorkEnd = async () => {
      // 2. The tick in flight ends; the batch in flight commits and the worker takes no
      //    more jobs (a later batch of this epoch would be fenced anyway).
      await this.#scheduler?.catch(() => {})
      await this.#worker?.close().catch((error) => this.#emitError(error))
    }
    // 3. Then the session closes, and with it the node's membership.
    const lease = this.#starter
      ? await this.#starter.stop(letWorkEnd).catch((error) => {
          this.#emitError(error)
          return undefined
        })
      : await letWorkEnd()
    this.#heldEpoch = undefined
    if (lease) {
      this.options.logger.info({ epoch: lease.epoch }, 'released the singleton')
      this.#safeEmit('lock:released', lease)
    }
    await Promise.all([...this.#hearing].map((hearing) => hearing.catch(() => {})))
    await this.#stopBoss?.()
    if (this.#pool && !this.options.pool) await this.#pool.end().catch(() => {})
  }

  /**
   * Writes the holder's account of how its term ended. The path that lost the lock may be
   * the pool's too (a partition): it tries again, for about half a minute, until the node stops.
   */
  async #recordTermEnd(pool: pg.Pool, lease: Lease, reason: string): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        await pool.query('SELECT pgsingleton.end_term($1, $2, $3, $4)', [
          lease.name,
          lease.epoch,
          termEnd(reason),
          reason,
        ])
        return
      } catch (error) {
        if (attempt >= 5 || this.#stopping) {
          this.options.logger.warn(
            { epoch: lease.epoch, error: errorMessage(error) },
            'could not record how the term ended',
          )
          return
        }
        await sleep(1000 * 2 ** attempt, this.#stopped.signal)
        if (this.#stopping) return
      }
    }
  }

  #requirePool(): pg.Pool {
    if (!this.#pool) throw new Error('start() the singleton before asking for its status')
    return this.#pool
  }

  #safeEmit<K extends keyof SingletonEvents>(event: K, ...args: SingletonEvents[K]): void {
    try {
      ;(this.emit as (event: K, ...args: SingletonEvents[K]) => boolean)(event, ...args)
    } catch (error) {
      this.options.logger.error({ event, error: errorMessage(error) }, 'an event listener threw')
    }
  }

  #warn(warning: SingletonWarning): void {
    this.options.logger.warn({ code: warning.code }, warning.message)
    // An app that gave neither a logger nor a listener would never see it.
    if (!this.options.loggerGiven && this.listenerCount('warning') === 0) {
      process.emitWarning(warning.message, { type: 'PgSingletonWarning', code: warning.code })
    }
    this.#safeEmit('warning', warning)
  }

  #emitError(error: unknown): void {
    const wrapped =
      error instanceof Error ? error : new Error(errorMessage(error), { cause: error })
    this.options.logger.error({ error: wrapped.message }, 'background error')
    if (this.listenerCount('error') > 0) this.#safeEmit('error', wrapped)
  }
}

/**
 * Why pg-boss did not start. Its own words for a schema it cannot run on (or ours for one
 * gone since start-up) call for a migration; anything else (a refused or lost connection,
 * a timeout) is not fixed by one, and the message does not send the operator there.
 */
function bossStartError(error: unknown): SingletonError {
  const message = errorMessage(error)
  const code = sqlState(error)
  if (
    /pg-boss is not installed|requires migrations/.test(message) ||
    code === SQLSTATE.UNDEFINED_TABLE ||
    code === SQLSTATE.INVALID_SCHEMA_NAME ||
    code === SQLSTATE.UNDEFINED_FUNCTION
  ) {
    return new SingletonError(
      'SCHEMA_NOT_MIGRATED',
      `pg-boss could not start (${message}). Run \`pg-singleton migrate\`, which installs pg-boss's schema too (or, where other nodes run a newer pg-boss that migrated it, upgrade this node).`,
      { cause: error },
    )
  }
  return new SingletonError('QUEUE_NOT_STARTED', `pg-boss could not start: ${message}`, {
    cause: error,
  })
}

/** How a holdership that ended without a stop reads in `pgsingleton.terms`. */
function termEnd(reason: string): 'released' | 'lost' | 'fenced' | 'superseded' {
  if (reason.startsWith('stepped down')) return 'released'
  if (reason.includes('no longer current')) return 'superseded'
  if (reason.startsWith('no heartbeat succeeded')) return 'fenced'
  return 'lost'
}

export function createSingleton(options: SingletonOptions): Singleton {
  return new Singleton(options)
}

/** Whether a notification on channel pgsingleton is an operator's request to this singleton's holder. */
function isRequestFor(payload: string, singleton: string): boolean {
  try {
    const event = JSON.parse(payload) as { singleton?: unknown; asked?: unknown }
    return event.singleton === singleton && typeof event.asked === 'string'
  } catch {
    return false
  }
}

/** A borrowed pool's connection settings, for our own connections to the same server. */
function borrowedConnection(pool: pg.Pool): pg.ClientConfig {
  const { options } = pool as unknown as { options: pg.ClientConfig }
  return { ...options, connectionString: withoutApplicationName(options.connectionString) }
}
