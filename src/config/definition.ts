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
  readonly every: string
  readonly batchSize: number
  /** Deleting may cascade to rows that reference the table (the user said so). */
  readonly allowCascade: boolean
  /** Whole partitions may go (`drop`, `detach`), or rows only (`delete`). */
  readonly partitions: 'delete' | 'drop' | 'detach'
}

/**
 * A short, stable digest of a definition: equal definitions have equal fingerprints on
 * every node and every version that writes the same keys, whatever order they came in.
 */
export function fingerprint(definition: PolicyDefinition): string {
  const canonical = JSON.stringify([
    definition.name,
    definition.schema,
    definition.table,
    definition.column,
    definition.columnType,
    definition.timeZone,
    definition.olderThan,
    definition.every,
    definition.batchSize,
    definition.allowCascade,
    definition.partitions,
  ])
  return createHash('sha256').update(canonical).digest('hex').slice(0, 16)
}

/** The fields in which two definitions of a policy differ, for messages and `status`. */
export function differences(a: PolicyDefinition, b: PolicyDefinition): string[] {
  const keys = Object.keys(a) as (keyof PolicyDefinition)[]
  return keys
    .filter((key) => a[key] !== b[key])
    .map((key) => `${key} ${JSON.stringify(a[key])} vs ${JSON.stringify(b[key])}`)
}
