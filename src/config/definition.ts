import { createHash } from 'node:crypto'

/** The column types a policy can judge age by, as `format_type()` spells them. */
export const COLUMN_TYPES = [
  'timestamp with time zone',
  'timestamp without time zone',
  'date',
] as const
export type ColumnType = (typeof COLUMN_TYPES)[number]

/**
 * A policy as every node must understand it: checked against the database, with the
 * column's type and the zone spelled as PostgreSQL's catalog spells it. This is what
 * nodes register, what a run carries, and what a worker deletes by; the batch function
 * reads these exact keys (see migrations/0002).
 */
export interface PolicyDefinition {
  readonly name: string
  readonly schema: string
  readonly table: string
  readonly column: string
  readonly columnType: ColumnType
  /** The zone `timestamp` and `date` values are read in; null for `timestamptz`. */
  readonly timeZone: string | null
  readonly olderThan: string
  /** The schedule: `every` (an interval), or `cron` read in `cronTimeZone`. */
  readonly every: string | null
  readonly cron: string | null
  readonly cronTimeZone: string | null
  readonly batchSize: number
  /** Deleting may cascade to rows that reference the table (the user said so). */
  readonly allowCascade: boolean
  /** Whole partitions may go (`drop`, `detach`), or rows only (`delete`). */
  readonly partitions: 'delete' | 'drop' | 'detach'
}

/**
 * A task as every node must understand it: its name and schedule. Nodes register it like
 * a policy, and a task's run carries it. (What its handler does is each node's own code:
 * nodes agree on when a task runs, not on what it does.)
 */
export interface TaskDefinition {
  readonly kind: 'task'
  readonly name: string
  readonly every: string | null
  readonly cron: string | null
  readonly cronTimeZone: string | null
  /** How long a run may take, when the task sets a limit other than the default (1 hour). */
  readonly timeoutSeconds?: number
}

/** What a run carries: a cleanup policy's definition, or a task's. */
export type RunDefinition = PolicyDefinition | TaskDefinition

export function isTask(definition: RunDefinition): definition is TaskDefinition {
  return (definition as TaskDefinition).kind === 'task'
}

/** How long a task's run may take (a run issued by a node without the option: the default). */
export function taskTimeoutSeconds(definition: TaskDefinition): number {
  return definition.timeoutSeconds ?? DEFAULT_TASK_TIMEOUT_SECONDS
}

/** A task's run may take this long unless its `timeout` says otherwise. */
export const DEFAULT_TASK_TIMEOUT_SECONDS = 3600

/**
 * A short, stable digest of a definition: equal definitions have equal fingerprints on
 * every node and every version that writes the same keys, whatever order they came in.
 */
export function fingerprint(definition: RunDefinition): string {
  if (isTask(definition)) {
    const canonical = JSON.stringify([
      'task',
      definition.name,
      definition.every,
      definition.cron,
      definition.cronTimeZone,
      // Only when set: a task with the default limit keeps the fingerprint that nodes
      // without this option register, so a rolling upgrade does not hold it back.
      ...(definition.timeoutSeconds === undefined ? [] : [definition.timeoutSeconds]),
    ])
    return createHash('sha256').update(canonical).digest('hex').slice(0, 16)
  }
  const canonical = JSON.stringify([
    definition.name,
    definition.schema,
    definition.table,
    definition.column,
    definition.columnType,
    definition.timeZone,
    definition.olderThan,
    definition.every,
    definition.cron,
    definition.cronTimeZone,
    definition.batchSize,
    definition.allowCascade,
    definition.partitions,
  ])
  return createHash('sha256').update(canonical).digest('hex').slice(0, 16)
}

/** The fields in which two definitions of a policy differ, for messages and `status`. */
export function differences(a: RunDefinition, b: RunDefinition): string[] {
  const x = a as unknown as Record<string, unknown>
  const y = b as unknown as Record<string, unknown>
  const keys = [...new Set([...Object.keys(x), ...Object.keys(y)])]
  return keys
    .filter((key) => x[key] !== y[key])
    .map((key) => `${key} ${JSON.stringify(x[key])} vs ${JSON.stringify(y[key])}`)
}
