import type pg from 'pg'
import { differences, isTask, type RunDefinition } from '../config/definition.js'

export type Agreement = 'agree' | 'disagree' | 'no live node'

/** One row of `pgsingleton.policy_status`, in camelCase. */
export interface PolicyStatus {
  singleton: string
  policy: string
  /** An operator paused it: no run starts. */
  paused: boolean
  /** Whether every live node holds the same definition; the policy runs only when they do. */
  agreement: Agreement
  liveNodes: number
  /** The agreed definition, when they agree. */
  definition: RunDefinition | null
  /** When they disagree: each live node's definition (null where the node lacks the policy). */
  nodeDefinitions:
    | { nodeId: string; fingerprint: string | null; definition: RunDefinition | null }[]
    | null
  every: string | null
  nextRunAt: Date | null
  /** An operator asked for a run now, not issued yet. */
  runNowAt: Date | null
  openRunStatus: string | null
  retryAt: Date | null
  lastStatus: string | null
  lastRunAt: Date | null
  lastRowsDeleted: number | null
  lastRowsSkipped: number | null
  lastSuccessAt: Date | null
  lastError: string | null
  lastErrorAt: Date | null
  rowsDeleted24h: number
  /** No success for more than twice its interval (and not paused): the thing to alert on. */
  overdue: boolean
  /** A cleanup policy, or a task. */
  kind: 'cleanup' | 'task'
  /** A cron schedule (instead of `every`), and the zone it is read in. */
  cron: string | null
  cronTimeZone: string | null
}

interface Row {
  singleton: string
  policy: string
  paused: boolean
  agreement: Agreement
  live_nodes: number
  definition: RunDefinition | null
  node_definitions:
    | { node_id: string; fingerprint: string | null; definition: RunDefinition | null }[]
    | null
  every: string | null
  next_run_at: Date | null
  run_now_at: Date | null
  open_run_status: string | null
  retry_at: Date | null
  last_status: string | null
  last_run_at: Date | null
  last_rows_deleted: string | null
  last_rows_skipped: string | null
  last_success_at: Date | null
  last_error: string | null
  last_error_at: Date | null
  rows_deleted_24h: string
  overdue: boolean
  kind: 'cleanup' | 'task'
  cron: string | null
  cron_time_zone: string | null
}

/** Reads `pgsingleton.policy_status`: every policy, or those of the singleton named. */
export async function readPolicyStatus(
  db: pg.Pool | pg.Client,
  singleton?: string,
): Promise<PolicyStatus[]> {
  const { rows } = await db.query<Row>(
    `SELECT *, every::text AS every FROM pgsingleton.policy_status
      WHERE $1::text IS NULL OR singleton = $1 ORDER BY singleton, policy`,
    [singleton ?? null],
  )
  const num = (value: string | null) => (value === null ? null : Number(value))
  return rows.map((row) => ({
    singleton: row.singleton,
    policy: row.policy,
    paused: row.paused,
    agreement: row.agreement,
    liveNodes: row.live_nodes,
    definition: row.definition,
    nodeDefinitions:
      row.node_definitions?.map((n) => ({
        nodeId: n.node_id,
        fingerprint: n.fingerprint,
        definition: n.definition,
      })) ?? null,
    every: row.every,
    nextRunAt: row.next_run_at,
    runNowAt: row.run_now_at,
    openRunStatus: row.open_run_status,
    retryAt: row.retry_at,
    lastStatus: row.last_status,
    lastRunAt: row.last_run_at,
    lastRowsDeleted: num(row.last_rows_deleted),
    lastRowsSkipped: num(row.last_rows_skipped),
    lastSuccessAt: row.last_success_at,
    lastError: row.last_error,
    lastErrorAt: row.last_error_at,
    rowsDeleted24h: Number(row.rows_deleted_24h),
    overdue: row.overdue,
    kind: row.kind,
    cron: row.cron,
    cronTimeZone: row.cron_time_zone,
  }))
}

/**
 * How the live nodes' definitions of a disagreed policy differ, one line per node, each
 * against the first node's: `node-b: olderThan "30 days" vs "1 day"`, or `lacks it`.
 */
export function describeDisagreement(status: PolicyStatus): string[] {
  const nodes = status.nodeDefinitions ?? []
  const reference = nodes.find((n) => n.definition)
  return nodes.map((node) => {
    if (!node.definition) return `${node.nodeId}: does not have it`
    if (!reference?.definition || node === reference)
      return `${node.nodeId}: ${summary(node.definition)}`
    const diff = differences(node.definition, reference.definition)
    return `${node.nodeId}: ${diff.length > 0 ? `differs from ${reference.nodeId} in ${diff.join(', ')}` : 'the same'}`
  })
}

function summary(d: RunDefinition): string {
  const schedule = d.every !== null ? `every ${d.every}` : `cron "${d.cron}" in ${d.cronTimeZone}`
  if (isTask(d)) return `task, ${schedule}`
  return `"${d.schema}"."${d.table}"."${d.column}" older than ${d.olderThan}${d.timeZone ? ` in ${d.timeZone}` : ''}, ${schedule}, batchSize ${d.batchSize}`
}
