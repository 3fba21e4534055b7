import { SingletonError } from '../errors.js'
import { checkIdentifier, parseTableName, type QualifiedName } from './identifier.js'

/** A retention policy as a user writes it, in the config file or in code. */
export interface RetentionPolicy {
  /** Unique within the singleton; letters, digits, `_`, `-` and `.`. */
  name: string
  /** `schema.table`, split at the first dot, or a bare table name in `public`. */
  table: string
  /** A `timestamptz`, `timestamp` or `date` column: rows with `column < now() - olderThan` are outdated. */
  column: string
  /** A PostgreSQL interval, e.g. `'30 days'`; parsed by PostgreSQL at start-up. */
  olderThan: string
  /** A PostgreSQL interval, e.g. `'1 minute'`: how often the policy runs. At least 1 second. */
  every: string
  /** Rows deleted per batch, each batch its own short transaction. Default 1000. */
  batchSize?: number
}

export interface ResolvedPolicy {
  readonly name: string
  readonly table: QualifiedName
  readonly tableText: string
  readonly column: string
  readonly olderThan: string
  readonly every: string
  readonly batchSize: number
}

export const DEFAULT_BATCH_SIZE = 1000
/** Above this a "short" batch stops being short: one delete holds its locks too long. */
export const MAX_BATCH_SIZE = 100_000
/** Singleton and policy names end up in pg-boss queue names and keys, which allow this set. */
export const NAME_PATTERN = /^[A-Za-z0-9_.-]{1,100}$/
const POLICY_KEYS = new Set(['name', 'table', 'column', 'olderThan', 'every', 'batchSize'])

/** Checks what can be checked without a database; `validatePolicies` checks the rest. */
export function resolvePolicies(policies: unknown): readonly ResolvedPolicy[] {
  if (!Array.isArray(policies) || policies.length === 0) {
    throw new SingletonError(
      'INVALID_OPTION',
      'policies: expected a non-empty array of retention policies ({ name, table, column, olderThan, every, batchSize? }).',
    )
  }
  const seen = new Set<string>()
  return Object.freeze(
    policies.map((raw: unknown, index) => {
      const policy = resolvePolicy(raw, index)
      if (seen.has(policy.name)) {
        throw new SingletonError(
          'INVALID_OPTION',
          `policies[${index}].name: "${policy.name}" is used by two policies; names must be unique.`,
        )
      }
      seen.add(policy.name)
      return policy
    }),
  )
}

function resolvePolicy(raw: unknown, index: number): ResolvedPolicy {
  const at = `policies[${index}]`
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new SingletonError(
      'INVALID_OPTION',
      `${at}: expected an object, got ${JSON.stringify(raw)}.`,
    )
  }
  const record = raw as Record<string, unknown>
  for (const key of Object.keys(record)) {
    if (!POLICY_KEYS.has(key)) {
      throw new SingletonError(
        'INVALID_OPTION',
        `${at}.${key}: unknown field; a policy has ${[...POLICY_KEYS].join(', ')}.`,
      )
    }
  }
  const name = requireString(record, 'name', at)
  if (!NAME_PATTERN.test(name)) {
    throw new SingletonError(
      'INVALID_OPTION',
      `${at}.name: "${name}" must be 1-100 letters, digits, "_", "-" or ".".`,
    )
  }
  const where = `policy "${name}"`
  const tableText = requireString(record, 'table', where)
  const table = parseTableName(tableText, `${where}, field table`)
  const column = requireString(record, 'column', where)
  checkIdentifier(column, `${where}, field column`)
  const olderThan = requireString(record, 'olderThan', where)
  const every = requireString(record, 'every', where)
  const batchSize = record.batchSize ?? DEFAULT_BATCH_SIZE
  if (
    typeof batchSize !== 'number' ||
    !Number.isInteger(batchSize) ||
    batchSize < 1 ||
    batchSize > MAX_BATCH_SIZE
  ) {
    throw new SingletonError(
      'INVALID_OPTION',
      `${where}, field batchSize: ${JSON.stringify(batchSize)} is not an integer from 1 to ${MAX_BATCH_SIZE}.`,
    )
  }
  return Object.freeze({ name, table, tableText, column, olderThan, every, batchSize })
}

function requireString(record: Record<string, unknown>, key: string, where: string): string {
  const value = record[key]
  if (typeof value !== 'string' || value.trim() === '') {
    throw new SingletonError(
      'INVALID_OPTION',
      `${where}, field ${key}: expected a non-empty string, got ${JSON.stringify(value)}.`,
    )
  }
  return value
}
