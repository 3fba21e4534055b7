import type pg from 'pg'
import { chooseWalk } from '../cleanup/run-cleanup.js'
import type { PolicyDefinition } from '../config/definition.js'
import type { ResolvedPolicy } from '../config/policy.js'
import { cronPreview, type Schedule } from '../config/schedule.js'
import { describeSchedule, validatePolicies } from '../config/validate-policies.js'
import { withClient } from '../db/transaction.js'

export interface PlannedTable {
  relation: string
  /** Outdated rows now, counted exactly (rows that foreign keys or locks hold count too). */
  outdated: number
  /** The oldest outdated value, as PostgreSQL prints it. */
  oldest: string | null
  /** How a batch finds them: `index` (a walk in column order) or `tidrange` (in page order). */
  strategy: string
  /** The scans of the batch's own selection, from its plan, e.g. `Index Scan on events_created_at_idx`. */
  access: string
}

export interface PolicyPlan {
  policy: string
  definition: PolicyDefinition
  /** The definition as this node understood it, with its cut-off now. */
  understood: string
  outdated: number
  tables: PlannedTable[]
}

/**
 * What each policy would delete now, without deleting: the policies are checked against
 * the database as at start-up, then counted in one read-only transaction.
 */
export async function planPolicies(
  pool: pg.Pool,
  policies: readonly ResolvedPolicy[],
): Promise<{ plans: PolicyPlan[]; warnings: string[] }> {
  const { definitions, understood, warnings } = await validatePolicies(pool, policies)
  const plans = await withClient(pool, async (client) => {
    await client.query('BEGIN READ ONLY')
    try {
      const out: PolicyPlan[] = []
      for (const [i, definition] of definitions.entries()) {
        const { rows: leaves } = await client.query<{
          leaf: string
          relation: string
          strategy: 'index' | 'tidrange'
          tuples_per_page: number | null
        }>(
          `SELECT l.leaf, l.relation, l.strategy, l.tuples_per_page
             FROM pgsingleton.cleanup_leaves(to_regclass(format('%I.%I', $1::text, $2::text)), $3) l
            WHERE l.relkind = 'r'`,
          [definition.schema, definition.table, definition.column],
        )
        const tables: PlannedTable[] = []
        for (const leaf of leaves) {
          // The walk a run would choose now, from the same statistics (read in this
          // transaction: the pool may have no other connection to give; in a savepoint,
          // so that a statistic it cannot read leaves the transaction usable).
          await client.query('SAVEPOINT walk')
          const { strategy } = await chooseWalk(
            client,
            { ...leaf, leaf: Number(leaf.leaf) },
            definition,
          )
          await client.query('ROLLBACK TO SAVEPOINT walk')
          const { rows } = await client.query<{
            outdated: string
            oldest: string | null
            access: string | null
          }>(
            'SELECT p.outdated, p.oldest, p.access FROM pgsingleton.plan_leaf($1, $2::jsonb, $3) p',
            [leaf.leaf, JSON.stringify(definition), strategy],
          )
          tables.push({
            relation: leaf.relation,
            outdated: Number(rows[0]?.outdated ?? 0),
            oldest: rows[0]?.oldest ?? null,
            strategy,
            access: rows[0]?.access ?? '-',
          })
        }
        out.push({
          policy: definition.name,
          definition,
          understood: understood[i] ?? '',
          outdated: tables.reduce((sum, t) => sum + t.outdated, 0),
          tables,
        })
      }
      return out
    } finally {
      await client.query('ROLLBACK')
    }
  })
  return { plans, warnings: warnings.map((w) => w.message) }
}

export interface TaskPlan {
  task: string
  /** `every 1 hour`, or `cron "0 3 * * *" in Europe/Berlin`. */
  schedule: string
  /** Its next slots by the database's clock (for `every`: from its schedule row, or now). */
  next: Date[]
}

/**
 * When each task runs next, by the database's clock: its stored schedule when a holder
 * has written one, else from now.
 */
export async function planTasks(
  pool: pg.Pool,
  singleton: string,
  tasks: readonly { name: string; schedule: Schedule }[],
  count = 3,
): Promise<TaskPlan[]> {
  const { rows } = await pool.query<{ now: Date; policy: string | null; next_run_at: Date | null }>(
    `SELECT now(), s.policy, s.next_run_at FROM (SELECT 1) one
       LEFT JOIN pgsingleton.schedules s ON s.singleton = $1`,
    [singleton],
  )
  const now = rows[0]?.now ?? new Date()
  return tasks.map((task) => {
    const stored = rows.find((r) => r.policy === task.name)?.next_run_at ?? null
    const { every, cron, cronTimeZone } = task.schedule
    if (cron !== null && cronTimeZone !== null) {
      const after =
        stored && stored.getTime() > now.getTime() ? new Date(stored.getTime() - 1) : now
      return {
        task: task.name,
        schedule: describeSchedule(task.schedule),
        next: cronPreview(cron, cronTimeZone, after, count),
      }
    }
    const first = stored ?? now
    const seconds = intervalSeconds(every ?? '1 hour')
    return {
      task: task.name,
      schedule: describeSchedule(task.schedule),
      next: Array.from({ length: count }, (_, i) => new Date(first.getTime() + i * seconds * 1000)),
    }
  })
}

/** Seconds of a canonical interval (`1 hour 30 minutes`), months as 30 days: for a preview only. */
function intervalSeconds(interval: string): number {
  const unit: Record<string, number> = {
    second: 1,
    minute: 60,
    hour: 3600,
    day: 86_400,
    week: 604_800,
    month: 2_592_000,
    year: 31_536_000,
  }
  let total = 0
  for (const [, n, u] of interval.matchAll(/([\d.]+)\s+([a-z]+?)s?\b/g))
    total += Number(n) * (unit[u ?? ''] ?? 0)
  return total || 3600
}
