import type pg from 'pg'
import type { PolicyDefinition } from '../config/definition.js'
import type { ResolvedPolicy } from '../config/policy.js'
import { validatePolicies } from '../config/validate-policies.js'
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
        const { rows } = await client.query<{
          relation: string
          strategy: string
          outdated: string
          oldest: string | null
          access: string | null
        }>(
          `SELECT l.relation, l.strategy, p.outdated, p.oldest, p.access
             FROM pgsingleton.cleanup_leaves(to_regclass(format('%I.%I', $1::text, $2::text)), $3) l,
                  pgsingleton.plan_leaf(l.leaf, $4::jsonb, l.strategy) p
            WHERE l.relkind = 'r'`,
          [definition.schema, definition.table, definition.column, JSON.stringify(definition)],
        )
        const tables = rows.map((row) => ({
          relation: row.relation,
          outdated: Number(row.outdated),
          oldest: row.oldest,
          strategy: row.strategy,
          access: row.access ?? '-',
        }))
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
