import { SingletonError } from '../errors.js'
import { checkIdentifier, parseTableName, type QualifiedName } from './identifier.js'
import { parseInterval } from './interval.js'
import { Problems } from './problems.js'
import { resolveSchedule, type Schedule } from './schedule.js'

/** A retention policy as a user writes it, in the config file or in code. */
export interface RetentionPolicy {
  /** Unique within the singleton; letters, digits, `_`, `-` and `.`. */
  name: string
  /** `schema.table`, split at the first dot, or a bare table name in `public`. */
  table: string
  /** A `timestamptz`, `timestamp` or `date` column: rows older than the cut-off are outdated. */
  column: string
  /**
   * How old a row must be to go, e.g. `'30 days'`: one or more `<number> <unit>` terms
   * with the unit spelled out. The cut-off is the database's `now()` minus this.
   */
  olderThan: string
  /** How often the policy runs, e.g. `'1 minute'`; the same form, at least 1 second. Or `cron`. */
  every?: string
  /**
   * Instead of `every`: a cron pattern, five fields (`'0 3 * * *'`: 03:00 every day) or six
   * with seconds first, read in `cronTimeZone`.
   */
  cron?: string
  /** The IANA zone a `cron` pattern is read in. Default: `timeZone` when given, else UTC. */
  cronTimeZone?: string
  /**
   * The IANA zone the column's values are written in, e.g. `'UTC'` or `'Europe/Berlin'`.
   * Required for `timestamp` (without time zone) and `date` columns, which do not say
   * which zone they are in; not needed for `timestamptz`.
   */
  timeZone?: string
  /**
   * The most rows one batch deletes, each batch its own short transaction; below it the
   * batch size follows the time budget (`batchTargetMs`). Default 100,000 (the most).
   */
  batchSize?: number
  /**
   * Accept that deleting an outdated row also deletes or changes rows that reference it,
   * however young (foreign keys with ON DELETE CASCADE, SET NULL or SET DEFAULT). Without
   * it such a table is refused. Default false.
   */
  allowCascade?: boolean
  /**
   * On a range-partitioned table keyed by the column: `"drop"` (or `"detach"`) removes a
   * partition whole once its upper bound is at or below the cut-off and every row in it
   * is outdated; the partition that straddles the cut-off is cleaned row by row. Default
   * `"delete"`: rows only.
   */
  partitions?: 'delete' | 'drop' | 'detach'
}

export interface ResolvedPolicy {
  readonly name: string
  readonly table: QualifiedName
  readonly tableText: string
  readonly column: string
  /** Canonical form of the strict interval grammar, e.g. `'30 days'`. */
  readonly olderThan: string
  readonly schedule: Schedule
  readonly timeZone: string | undefined
  readonly batchSize: number
  readonly allowCascade: boolean
  readonly partitions: 'delete' | 'drop' | 'detach'
}

/** The most a policy may allow one batch; the time budget keeps batches short below it. */
export const MAX_BATCH_SIZE = 100_000
/**
 * The ceiling is the most a batch may take; how much it does take is the time budget's
 * (batchTargetMs) to say. A default ceiling of 1000 kept the budget from ever growing a
 * batch: a backlog of a million rows then took 4 to 14 times as long as one bulk DELETE
 * (measured on a time-ordered table with 5 to 50 % outdated), against 1.9 to 3.2 times
 * with the budget deciding (scratch runs on PostgreSQL 15, one run per share).
 */
export const DEFAULT_BATCH_SIZE = MAX_BATCH_SIZE
/** Singleton and policy names end up in pg-boss queue names and keys, which allow this set. */
export const NAME_PATTERN = /^[A-Za-z0-9_.-]{1,100}$/
const POLICY_KEYS = new Set([
  'name',
  'table',
  'column',
  'olderThan',
  'every',
  'cron',
  'cronTimeZone',
  'timeZone',
  'batchSize',
  'allowCascade',
  'partitions',
])

/**
 * Checks what can be checked without a database, every policy and every field, and
 * reports all problems at once; `validatePolicies` checks the rest against the database.
 */
export function resolvePolicies(policies: unknown): readonly ResolvedPolicy[] {
  if (policies === undefined) return Object.freeze([])
  if (!Array.isArray(policies)) {
    throw new SingletonError(
      'INVALID_OPTION',
      'policies: expected an array of retention policies ({ name, table, column, olderThan, every or cron, timeZone?, batchSize? }).',
    )
  }
  const problems = new Problems()
  const seen = new Set<string>()
  const resolved: ResolvedPolicy[] = []
  policies.forEach((raw: unknown, index) => {
    const policy = resolvePolicy(raw, index, problems)
    if (!policy) return
    if (seen.has(policy.name)) {
      problems.add(
        `policies[${index}].name: "${policy.name}" is used by two policies; names must be unique.`,
      )
    }
    seen.add(policy.name)
    resolved.push(policy)
  })
  problems.throwIfAny('INVALID_OPTION')
  return Object.freeze(resolved)
}

function resolvePolicy(
  raw: unknown,
  index: number,
  problems: Problems,
): ResolvedPolicy | undefined {
  const at = `policies[${index}]`
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    problems.add(`${at}: expected an object, got ${JSON.stringify(raw)}.`)
    return undefined
  }
  const before = problems.count
  const record = raw as Record<string, unknown>
  for (const key of Object.keys(record)) {
    if (!POLICY_KEYS.has(key)) {
      problems.add(`${at}.${key}: unknown field; a policy has ${[...POLICY_KEYS].join(', ')}.`)
    }
  }
  const rawName = record.name
  const name = typeof rawName === 'string' ? rawName : ''
  if (!NAME_PATTERN.test(name)) {
    problems.add(
      `${at}.name: ${JSON.stringify(rawName)} must be 1-100 letters, digits, "_", "-" or ".".`,
    )
  }
  const where = NAME_PATTERN.test(name) ? `policy "${name}"` : at
  const field = (check: () => void) => {
    try {
      check()
    } catch (error) {
      problems.add((error as Error).message)
    }
  }
  const tableText = requireString(record, 'table', where, problems)
  let table: QualifiedName | undefined
  if (tableText !== undefined)
    field(() => {
      table = parseTableName(tableText, `${where}, field table`)
    })
  const column = requireString(record, 'column', where, problems)
  if (column !== undefined) field(() => checkIdentifier(column, `${where}, field column`))
  const olderThan = interval(record, 'olderThan', where, problems)
  let timeZone: string | undefined
  if (record.timeZone !== undefined) {
    const zone = record.timeZone
    // The name is checked against pg_timezone_names at start-up; here only its shape.
    if (typeof zone !== 'string' || !/^[A-Za-z0-9_+\-/]{1,64}$/.test(zone)) {
      problems.add(
        `${where}, field timeZone: ${JSON.stringify(zone)} is not an IANA time zone name such as "UTC" or "Europe/Berlin".`,
      )
    } else timeZone = zone
  }
  const schedule = resolveSchedule(record, 'cronTimeZone', timeZone, where, problems)
  const batchSize = record.batchSize ?? DEFAULT_BATCH_SIZE
  if (
    typeof batchSize !== 'number' ||
    !Number.isInteger(batchSize) ||
    batchSize < 1 ||
    batchSize > MAX_BATCH_SIZE
  ) {
    problems.add(
      `${where}, field batchSize: ${JSON.stringify(batchSize)} is not an integer from 1 to ${MAX_BATCH_SIZE}.`,
    )
  }
  const allowCascade = record.allowCascade ?? false
  if (typeof allowCascade !== 'boolean') {
    problems.add(
      `${where}, field allowCascade: ${JSON.stringify(allowCascade)} is not true or false.`,
    )
  }
  const partitions = record.partitions ?? 'delete'
  if (partitions !== 'delete' && partitions !== 'drop' && partitions !== 'detach') {
    problems.add(
      `${where}, field partitions: ${JSON.stringify(partitions)} is not "delete", "drop" or "detach".`,
    )
  }
  if (problems.count > before || !table || column === undefined || !olderThan || !schedule)
    return undefined
  return Object.freeze({
    name,
    table,
    tableText: tableText as string,
    column,
    olderThan,
    schedule,
    timeZone,
    batchSize: batchSize as number,
    allowCascade: allowCascade === true,
    partitions: partitions as ResolvedPolicy['partitions'],
  })
}

function interval(
  record: Record<string, unknown>,
  key: 'olderThan',
  where: string,
  problems: Problems,
): string | undefined {
  const value = requireString(record, key, where, problems)
  if (value === undefined) return undefined
  const parsed = parseInterval(value)
  if (!parsed.ok) {
    problems.add(`${where}, field ${key}: "${value}" is refused: ${parsed.reason}.`)
    return undefined
  }
  return parsed.canonical
}

function requireString(
  record: Record<string, unknown>,
  key: string,
  where: string,
  problems: Problems,
): string | undefined {
  const value = record[key]
  if (typeof value !== 'string' || value.trim() === '') {
    problems.add(
      `${where}, field ${key}: expected a non-empty string, got ${JSON.stringify(value)}.`,
    )
    return undefined
  }
  return value
}
