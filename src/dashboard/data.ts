import type pg from 'pg'
import { withClient } from '../db/transaction.js'
import { type PolicyStatus, readPolicyStatus } from '../status/read-policy-status.js'
import { readStatus, type SingletonStatus } from '../status/read-status.js'
import { readTerms, type Term } from '../status/read-terms.js'

/** One run, as the status page shows it. */
export interface RunSummary {
  id: string
  status: string
  scheduledFor: Date
  startedAt: Date | null
  finishedAt: Date | null
  rowsDeleted: number
  error: string | null
  nodeId: string | null
  epoch: number
}

export interface DashboardPolicy extends PolicyStatus {
  /** The latest runs, newest first. */
  runs: RunSummary[]
}

export interface DashboardSingleton {
  name: string
  /** The holder's node id, null when nobody holds it. */
  node_id: string | null
  status: SingletonStatus | null
  terms: Term[]
  policies: DashboardPolicy[]
}

export interface Dashboard {
  now: Date
  singletons: DashboardSingleton[]
}

/** Everything the status page shows, read in one repeatable-read transaction. */
export function readDashboard(pool: pg.Pool, runsPerPolicy = 20): Promise<Dashboard> {
  return withClient(pool, (client, drop) => readIn(client, drop, runsPerPolicy))
}

async function readIn(
  client: pg.PoolClient,
  drop: (error: Error) => void,
  runsPerPolicy: number,
): Promise<Dashboard> {
  try {
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY')
    const [{ rows: clock }, status, policies, terms, { rows: runs }] = [
      await client.query<{ now: Date }>('SELECT now()'),
      await readStatus(client as unknown as pg.Client),
      await readPolicyStatus(client as unknown as pg.Client),
      await readTerms(client as unknown as pg.Client, undefined, 30),
      await client.query<{
        singleton: string
        policy: string
        id: string
        status: string
        scheduled_for: Date
        started_at: Date | null
        finished_at: Date | null
        rows_deleted: string
        error: string | null
        node_id: string | null
        epoch: string
      }>(
        `SELECT singleton, policy, id, status, scheduled_for, started_at, finished_at,
                rows_deleted, error, node_id, epoch
           FROM (SELECT r.*, row_number() OVER (PARTITION BY r.singleton, r.policy ORDER BY r.id DESC) AS n
                   FROM pgsingleton.cleanup_runs r) x
          WHERE n <= $1
          ORDER BY singleton, policy, id DESC`,
        [runsPerPolicy],
      ),
    ]
    await client.query('COMMIT')
    const names = [
      ...new Set([
        ...status.map((s) => s.name),
        ...policies.map((p) => p.singleton),
        ...terms.map((t) => t.name),
      ]),
    ].sort()
    return {
      now: clock[0]?.now ?? new Date(),
      singletons: names.map((name) => {
        const row = status.find((s) => s.name === name) ?? null
        return {
          name,
          node_id: row?.nodeId ?? null,
          status: row,
          terms: terms.filter((t) => t.name === name),
          policies: policies
            .filter((p) => p.singleton === name)
            .map((p) => ({
              ...p,
              runs: runs
                .filter((r) => r.singleton === name && r.policy === p.policy)
                .map((r) => ({
                  id: String(r.id),
                  status: r.status,
                  scheduledFor: r.scheduled_for,
                  startedAt: r.started_at,
                  finishedAt: r.finished_at,
                  rowsDeleted: Number(r.rows_deleted),
                  error: r.error,
                  nodeId: r.node_id,
                  epoch: Number(r.epoch),
                })),
            })),
        }
      }),
    }
  } catch (error) {
    await client.query('ROLLBACK').catch(drop)
    throw error
  }
}
