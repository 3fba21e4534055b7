import type pg from 'pg'
import { SingletonError } from '../errors.js'
import { DEFAULT_TASK_TIMEOUT_SECONDS } from './definition.js'
import { type IntervalUnit, parseInterval } from './interval.js'
import { NAME_PATTERN } from './policy.js'
import { Problems } from './problems.js'
import { resolveSchedule, type Schedule } from './schedule.js'

/**
 * What a task's handler is given for one run, an occurrence of its schedule that is its
 * alone across the cluster.
 */
export interface TaskContext {
  /** The task's name. */
  readonly name: string
  /**
   * The slot this run is for: the first slot that came due, or, for a run that takes over
   * occurrences earlier runs left unfinished (`reissued`), the latest of those.
   */
  readonly scheduledFor: Date
  /**
   * How many other occurrences this run stands for, 0 when none: earlier ones that runs
   * fenced before they finished, and later slots that passed while nobody held or while
   * the previous run was still going (a cron schedule's are counted up to 10,000). It runs
   * once for all of them; `pgsingleton.cleanup_runs.coalesced` records the same.
   */
  readonly coalesced: number
  /** True when the run takes over an occurrence an earlier run left unfinished. */
  readonly reissued: boolean
  /** The run's id in `pgsingleton.cleanup_runs`. */
  readonly runId: string
  /**
   * Which try at this run (this row) it is: 1, then one more each time its job is taken
   * up again under the same holder (a retry after a failure or a timeout, or after an
   * interrupted attempt). An occurrence that is issued again after a takeover, a lost
   * worker or a pause is a new run: a new `runId`, `attempt` 1 and `reissued`.
   */
  readonly attempt: number
  /** The holdership the run was issued under: the fencing token. */
  readonly epoch: number
  /** The node running it. */
  readonly nodeId: string
  /**
   * Aborts when the run must stop: the node stops, the run was fenced, or it ran past its
   * `timeout` (the reason is then a `TASK_TIMEOUT` error).
   */
  readonly signal: AbortSignal
  /**
   * Runs `fn(client)` in one transaction that first checks the run's epoch exactly as a
   * cleanup batch does and records the occurrence as done: it commits only while no newer
   * holder exists, and an occurrence whose fenced transaction committed is never run
   * again. Once per run: a second call throws (`FENCED_ONCE`) without running `fn`.
   * Throws `FENCED` (and runs nothing) when the run may no longer write. When `fn` throws,
   * or the transaction does not commit, nothing of it stays and the run fails (and is
   * retried), even if the handler catches the error. `fn` must not end the transaction
   * itself, and the whole transaction must end within `batchStatementTimeoutMs`: it holds
   * back the next holder's takeover, so it is for the occurrence's writes, not its work.
   */
  fenced<T>(fn: (client: pg.PoolClient) => Promise<T>): Promise<T>
}

/** A task as a user writes it in code: the handler, and when it runs. */
export interface SingletonTask {
  /** Unique among the singleton's policies and tasks; letters, digits, `_`, `-` and `.`. */
  name: string
  /** How often it runs, e.g. `'1 hour'`. Or `cron`. */
  every?: string
  /** Instead of `every`: a cron pattern (five fields, or six with seconds first), read in `timeZone`. */
  cron?: string
  /** The IANA zone a `cron` pattern is read in. Default UTC. */
  timeZone?: string
  /**
   * How long a run may take, in seconds, minutes or hours (`'2 hours'`; default 1 hour, at
   * most 23 hours). Then `ctx.signal` aborts, the run is recorded failed (`TASK_TIMEOUT`)
   * and retried with backoff like any failure, and its `fenced()` may no longer run.
   */
  timeout?: string
  /** Its work. A run whose handler throws (and whose fenced transaction did not commit) is retried with backoff. */
  handler: (context: TaskContext) => Promise<unknown> | unknown
}

/** A task in the CLI's config file: its handler is the default export of `module`. */
export interface ConfigFileTask {
  name: string
  /** An ES module whose default export is the handler: an absolute path, or one relative to the config file. */
  module: string
  every?: string
  cron?: string
  timeZone?: string
  timeout?: string
}

export interface ResolvedTask {
  readonly name: string
  readonly schedule: Schedule
  /** The run's time limit in seconds; null when the task does not set one (the default). */
  readonly timeoutSeconds: number | null
  readonly handler: SingletonTask['handler']
}

const TASK_KEYS = new Set(['name', 'every', 'cron', 'timeZone', 'timeout', 'handler'])

/**
 * And at most this long: its pg-boss job expires a minute after it (pg-boss allows 24 hours
 * at most), so the run's own limit always comes first.
 */
export const MAX_TASK_TIMEOUT_SECONDS = 23 * 3600

const TIMEOUT_UNITS: Partial<Record<IntervalUnit, number>> = { second: 1, minute: 60, hour: 3600 }

/**
 * A task's `timeout` in seconds: the strict interval form, in seconds, minutes and hours,
 * from 1 second to 23 hours. Null when not given, or when it is the default (so a task's
 * definition, and its fingerprint, stay what a node without this option registers).
 */
function resolveTimeout(value: unknown, where: string, problems: Problems): number | null {
  if (value === undefined) return null
  const parsed = parseInterval(value)
  if (!parsed.ok) {
    problems.add(`${where}, field timeout: ${JSON.stringify(value)} is refused: ${parsed.reason}.`)
    return null
  }
  let seconds = 0
  for (const term of parsed.terms) {
    const unit = TIMEOUT_UNITS[term.unit]
    if (unit === undefined) {
      problems.add(
        `${where}, field timeout: "${parsed.canonical}" is refused: give it in seconds, minutes or hours (at most 23 hours), e.g. "2 hours".`,
      )
      return null
    }
    seconds += Number(term.amount) * unit
  }
  if (seconds < 1 || seconds > MAX_TASK_TIMEOUT_SECONDS) {
    problems.add(
      `${where}, field timeout: "${parsed.canonical}" is refused: a run's timeout is from 1 second to 23 hours.`,
    )
    return null
  }
  return seconds === DEFAULT_TASK_TIMEOUT_SECONDS ? null : seconds
}

/** Checks tasks without a database, reporting every problem at once. */
export function resolveTasks(tasks: unknown): readonly ResolvedTask[] {
  if (tasks === undefined) return Object.freeze([])
  if (!Array.isArray(tasks)) {
    throw new SingletonError(
      'INVALID_OPTION',
      'tasks: expected an array of tasks ({ name, every or cron, timeZone?, handler }).',
    )
  }
  const problems = new Problems()
  const seen = new Set<string>()
  const resolved: ResolvedTask[] = []
  tasks.forEach((raw: unknown, index) => {
    const at = `tasks[${index}]`
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
      problems.add(`${at}: expected an object, got ${JSON.stringify(raw)}.`)
      return
    }
    const before = problems.count
    const record = raw as Record<string, unknown>
    for (const key of Object.keys(record)) {
      if (!TASK_KEYS.has(key))
        problems.add(`${at}.${key}: unknown field; a task has ${[...TASK_KEYS].join(', ')}.`)
    }
    const name = typeof record.name === 'string' ? record.name : ''
    if (!NAME_PATTERN.test(name)) {
      problems.add(
        `${at}.name: ${JSON.stringify(record.name)} must be 1-100 letters, digits, "_", "-" or ".".`,
      )
    }
    const where = NAME_PATTERN.test(name) ? `task "${name}"` : at
    if (seen.has(name)) problems.add(`${where}: the name is used twice; names must be unique.`)
    seen.add(name)
    const schedule = resolveSchedule(record, 'timeZone', undefined, where, problems)
    const timeoutSeconds = resolveTimeout(record.timeout, where, problems)
    if (typeof record.handler !== 'function') {
      problems.add(`${where}, field handler: expected a function, got ${typeof record.handler}.`)
    }
    if (problems.count > before || !schedule) return
    resolved.push(
      Object.freeze({
        name,
        schedule,
        timeoutSeconds,
        handler: record.handler as SingletonTask['handler'],
      }),
    )
  })
  problems.throwIfAny('INVALID_OPTION')
  return Object.freeze(resolved)
}
