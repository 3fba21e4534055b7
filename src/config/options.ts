import { hostname } from 'node:os'
import type pg from 'pg'
import type { PgBoss } from 'pg-boss'
import { SingletonError } from '../errors.js'
import { type Logger, silentLogger } from './logger.js'
import {
  NAME_PATTERN,
  type ResolvedPolicy,
  type RetentionPolicy,
  resolvePolicies,
} from './policy.js'
import { type ResolvedTask, resolveTasks, type SingletonTask } from './task.js'

export interface SingletonOptions {
  /** The singleton's name: one lock, one lease row, one schedule. Letters, digits, `_`, `-`, `.`. */
  name: string
  /** Retention policies: outdated rows to delete. May be empty or left out when there are tasks. */
  policies?: readonly RetentionPolicy[]
  /** The app's own tasks, run once per occurrence across the cluster, with `fenced(fn)` to write under the epoch. */
  tasks?: readonly SingletonTask[]
  /** Where to connect. Needed unless `pool` is given; the lock session always gets its own client. */
  connectionString?: string
  /** The app's pool, used for scheduling, cleanup and status. Never used for the lock. */
  pool?: pg.Pool
  /**
   * Where the lock session connects, when it must not go where the pool goes: an app whose
   * pool runs through PgBouncer in transaction mode points this at PostgreSQL itself (or
   * a session-mode pool). Default: `connectionString`, or the pool's own settings.
   */
  lockConnectionString?: string
  /** The app's pg-boss instance, already started. Without it pg-singleton starts its own. */
  boss?: PgBoss
  /** Shown as `application_name` and in `pgsingleton.status`. Default: `host:pid`. */
  nodeId?: string
  /** How often the holder proves its lock session alive. Default 1000 ms. */
  heartbeatMs?: number
  /**
   * The holder fences itself (stops scheduling, aborts its batches) when no heartbeat has
   * succeeded for this long. Must be below `idleSessionTimeoutMs` by at least one
   * heartbeat, so that the node gives up before the server can hand the lock on. Default 2000 ms.
   */
  fenceAfterMs?: number
  /**
   * `idle_session_timeout` on the lock session: a holder that goes silent (paused,
   * partitioned) is cut off by the server after this long and its lock released. This is
   * the takeover bound for a paused or cut-off holder. Default 3000 ms.
   */
  idleSessionTimeoutMs?: number
  /** A standby waits inside `pg_advisory_lock` in slices of this `lock_timeout`. Default 5000 ms. */
  lockWaitSliceMs?: number
  /**
   * A statement that has not answered this long after it should have (a standby's wait
   * slice after its slice, any of pg-singleton's queries after its statement timeout) is
   * taken as a dead connection: it is dropped and replaced. Default 5000 ms.
   */
  deadConnectionAfterMs?: number
  /**
   * A holder whose schedule ticks have failed for this long (its pool is broken while its
   * lock session is fine) gives the lock up so that a healthier node can hold, and queues
   * again after as long. Default 30000 ms.
   */
  stepDownAfterMs?: number
  /** First delay before reconnecting a lost lock session; doubles up to 5 s. Default 200 ms. */
  reconnectDelayMs?: number
  /** Pause between two cleanup batches, to leave room for app traffic. Default 0 ms. */
  batchPauseMs?: number
  /**
   * The time budget of one batch's transaction: the batch size follows it, up to a
   * policy's `batchSize`. A batch over three times its budget is followed by a pause as
   * long as it took. Default 30 ms.
   */
  batchTargetMs?: number
  /**
   * With replicas: between batches, wait while any replica replays more than this far
   * behind (`pg_stat_replication`; the role needs `pg_monitor`). Default 0: off.
   */
  maxReplicaLagMs?: number
  /**
   * Which nodes work the cleanup queue: `'when-holding'` (default), only the holder, so a
   * standby costs its lock session and nothing else; or `'always'`, every node, so runs of
   * different policies can run on different nodes.
   */
  workQueue?: 'when-holding' | 'always'
  /** `lock_timeout` of a cleanup batch: a batch never queues long behind app locks. Default 2000 ms. */
  batchLockTimeoutMs?: number
  /**
   * `statement_timeout` of a cleanup batch. It also bounds how long a batch of a stale
   * holder can delay the next holder's epoch bump. A batch it cancels rolls back and is
   * tried again at a quarter of its size, down to one row. Default 10000 ms.
   */
  batchStatementTimeoutMs?: number
  /** How often an idle cleanup worker polls pg-boss (LISTEN/NOTIFY wakes it sooner). Default 0.5 s. */
  workerPollingIntervalSeconds?: number
  /** Run pg-singleton's migrations in `start()`. Default false: run `pg-singleton migrate`. */
  migrate?: boolean
  /**
   * pino-shaped (`logger.info(fields, message)`). Without one, pg-singleton logs nothing,
   * except warnings nobody listens to (`warning` event), which go to the console.
   */
  logger?: Logger
}

export interface ResolvedOptions {
  readonly name: string
  readonly policies: readonly ResolvedPolicy[]
  readonly tasks: readonly ResolvedTask[]
  readonly connectionString: string | undefined
  readonly pool: pg.Pool | undefined
  readonly lockConnectionString: string | undefined
  readonly boss: PgBoss | undefined
  readonly nodeId: string
  readonly heartbeatMs: number
  readonly fenceAfterMs: number
  readonly idleSessionTimeoutMs: number
  readonly lockWaitSliceMs: number
  readonly deadConnectionAfterMs: number
  readonly stepDownAfterMs: number
  readonly reconnectDelayMs: number
  readonly batchPauseMs: number
  readonly batchTargetMs: number
  readonly maxReplicaLagMs: number
  readonly workQueue: 'when-holding' | 'always'
  readonly batchLockTimeoutMs: number
  readonly batchStatementTimeoutMs: number
  readonly workerPollingIntervalSeconds: number
  readonly migrate: boolean
  readonly logger: Logger
  /** False when the app gave no logger: warnings nobody listens to then go to the console. */
  readonly loggerGiven: boolean
}

export const DEFAULTS = Object.freeze({
  heartbeatMs: 1000,
  fenceAfterMs: 2000,
  idleSessionTimeoutMs: 3000,
  lockWaitSliceMs: 5000,
  deadConnectionAfterMs: 5000,
  stepDownAfterMs: 30_000,
  reconnectDelayMs: 200,
  batchPauseMs: 0,
  batchTargetMs: 30,
  maxReplicaLagMs: 0,
  batchLockTimeoutMs: 2000,
  batchStatementTimeoutMs: 10_000,
  workerPollingIntervalSeconds: 0.5,
})

/**
 * The URL without an `application_name` parameter. pg lets the URL's override the one a
 * client is given, and each of a node's connections is named after the node: the lock
 * session's name is the node id that `pgsingleton.status` shows, so with the app's name in
 * the URL every node showed as the app. Only that parameter goes; the rest is left as it is
 * written (no re-encoding), a fragment too (which pg does not read as parameters).
 */
export function withoutApplicationName<T extends string | undefined>(url: T): T {
  if (url === undefined) return url
  const hash = url.indexOf('#')
  const fragment = hash < 0 ? '' : url.slice(hash)
  const rest = hash < 0 ? url : url.slice(0, hash)
  const at = rest.indexOf('?')
  if (at < 0) return url
  const kept = rest
    .slice(at + 1)
    .split('&')
    .filter((pair) => {
      const key = pair.split('=', 1)[0] ?? ''
      try {
        return decodeURIComponent(key.replaceAll('+', ' ')) !== 'application_name'
      } catch {
        return true
      }
    })
  const query = kept.length > 0 ? `?${kept.join('&')}` : ''
  return `${rest.slice(0, at)}${query}${fragment}` as T
}

/** `host:pid`, the host cut so that the whole fits application_name's 63 bytes. */
export function defaultNodeId(): string {
  const pid = `:${process.pid}`
  const host = hostname().replace(/[^\x20-\x7e]/g, '?')
  return `${host.slice(0, 63 - pid.length)}${pid}`
}

function workQueue(value: unknown): 'when-holding' | 'always' {
  if (value === undefined) return 'when-holding'
  if (value === 'when-holding' || value === 'always') return value
  throw new SingletonError(
    'INVALID_OPTION',
    `workQueue: ${JSON.stringify(value)} must be "when-holding" or "always".`,
  )
}

/** Resolves and validates once, at construction; the result is frozen. */
export function resolveOptions(options: SingletonOptions): ResolvedOptions {
  if (typeof options !== 'object' || options === null) {
    throw new SingletonError(
      'INVALID_OPTION',
      'createSingleton(options): options must be an object.',
    )
  }
  if (typeof options.name !== 'string' || !NAME_PATTERN.test(options.name)) {
    throw new SingletonError(
      'INVALID_OPTION',
      `name: ${JSON.stringify(options.name)} must be 1-100 letters, digits, "_", "-" or "." (it names a lock and a pg-boss queue).`,
    )
  }
  if (!options.connectionString && !options.pool) {
    throw new SingletonError(
      'INVALID_OPTION',
      'connectionString: give a connectionString (e.g. from DATABASE_URL) or your own pool.',
    )
  }
  const nodeId = options.nodeId ?? defaultNodeId()
  // It becomes the lock session's application_name, which PostgreSQL keeps to 63 bytes of
  // printable ASCII (anything else turns into '?'); the status view and the holder's
  // check for lost workers match on it, so it must arrive intact.
  if (typeof nodeId !== 'string' || !/^[\x20-\x7e]{1,63}$/.test(nodeId)) {
    throw new SingletonError(
      'INVALID_OPTION',
      `nodeId: ${JSON.stringify(nodeId)} must be 1-63 printable ASCII characters (it becomes application_name).`,
    )
  }
  const ms = (key: keyof typeof DEFAULTS, min: number, max: number): number => {
    const value = options[key] ?? DEFAULTS[key]
    if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max) {
      throw new SingletonError(
        'INVALID_OPTION',
        `${key}: ${JSON.stringify(value)} must be a number from ${min} to ${max}.`,
      )
    }
    return value
  }
  const policies = resolvePolicies(options.policies)
  const tasks = resolveTasks(options.tasks)
  if (policies.length === 0 && tasks.length === 0) {
    throw new SingletonError(
      'INVALID_OPTION',
      'policies, tasks: give at least one retention policy or task; a singleton with neither has nothing to do.',
    )
  }
  const clash = tasks.find((task) => policies.some((policy) => policy.name === task.name))
  if (clash) {
    throw new SingletonError(
      'INVALID_OPTION',
      `task "${clash.name}": a policy has the same name; policies and tasks share one set of names.`,
    )
  }
  const resolved: ResolvedOptions = {
    name: options.name,
    policies,
    tasks,
    connectionString: withoutApplicationName(options.connectionString),
    pool: options.pool,
    lockConnectionString: withoutApplicationName(options.lockConnectionString),
    boss: options.boss,
    nodeId,
    heartbeatMs: ms('heartbeatMs', 50, 60_000),
    fenceAfterMs: ms('fenceAfterMs', 100, 600_000),
    idleSessionTimeoutMs: ms('idleSessionTimeoutMs', 200, 3_600_000),
    lockWaitSliceMs: ms('lockWaitSliceMs', 100, 600_000),
    deadConnectionAfterMs: ms('deadConnectionAfterMs', 500, 600_000),
    stepDownAfterMs: ms('stepDownAfterMs', 1000, 3_600_000),
    reconnectDelayMs: ms('reconnectDelayMs', 10, 60_000),
    batchPauseMs: ms('batchPauseMs', 0, 600_000),
    batchTargetMs: ms('batchTargetMs', 1, 60_000),
    maxReplicaLagMs: ms('maxReplicaLagMs', 0, 3_600_000),
    workQueue: workQueue(options.workQueue),
    batchLockTimeoutMs: ms('batchLockTimeoutMs', 10, 600_000),
    batchStatementTimeoutMs: ms('batchStatementTimeoutMs', 100, 3_600_000),
    workerPollingIntervalSeconds: ms('workerPollingIntervalSeconds', 0.5, 3600),
    migrate: options.migrate ?? false,
    logger: options.logger ?? silentLogger,
    loggerGiven: options.logger !== undefined,
  }
  // The order that makes self-fencing safe: a heartbeat must have a chance to succeed
  // before the fence deadline, and the node must fence before the server's
  // idle_session_timeout can end its session and grant the lock to the next waiter.
  if (resolved.fenceAfterMs <= resolved.heartbeatMs) {
    throw new SingletonError(
      'INVALID_OPTION',
      `fenceAfterMs (${resolved.fenceAfterMs}) must be greater than heartbeatMs (${resolved.heartbeatMs}), or the holder fences itself between two heartbeats.`,
    )
  }
  if (resolved.fenceAfterMs + resolved.heartbeatMs > resolved.idleSessionTimeoutMs) {
    throw new SingletonError(
      'INVALID_OPTION',
      `fenceAfterMs (${resolved.fenceAfterMs}) + heartbeatMs (${resolved.heartbeatMs}) must not exceed idleSessionTimeoutMs (${resolved.idleSessionTimeoutMs}): ` +
        'the holder must fence itself before the server ends its silent session and another node takes the lock. Lower fenceAfterMs or raise idleSessionTimeoutMs.',
    )
  }
  return Object.freeze(resolved)
}
