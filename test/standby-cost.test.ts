import { describe, expect, it } from 'vitest'
import { countRows, createEventsTable, insertRows, statusOf } from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, startNode, writeConfig } from './support/nodes.js'

const TIMING = { heartbeatMs: 200, fenceAfterMs: 600, idleSessionTimeoutMs: 1000 }
const POLICY = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 hour',
  every: '1 second',
}

const db = useTestDatabase({ setup: ({ pool }) => createEventsTable(pool) })
failOnNodesLeftRunning()

/** Server connections of this test database, by node (application_name up to the first space). */
async function connectionsByNode(): Promise<Record<string, number>> {
  const { rows } = await db.pool.query<{ node: string; n: number }>(
    `SELECT split_part(application_name, ' ', 1) AS node, count(*)::int AS n
       FROM pg_stat_activity
      WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> ''
      GROUP BY 1`,
  )
  return Object.fromEntries(rows.map((row) => [row.node, row.n]))
}

describe('what a node costs while it waits', () => {
  it('a standby holds its lock session and no other connection; the holder works the queue', async () => {
    const config = await writeConfig({ name: 'cost', policies: [POLICY], ...TIMING })
    const nodes = ['cost-1', 'cost-2', 'cost-3'].map((id) => startNode(db.url, config, id))
    try {
      const holder = await waitFor('a holder and two queued', async () => {
        const row = await statusOf(db.pool, 'cost')
        return row?.nodeId && row.waitingNodes === 2 ? row.nodeId : undefined
      })
      // Start-up checks use the node's pool; its idle connections close after 10 s. Then a
      // standby is down to its lock session.
      const standbys = ['cost-1', 'cost-2', 'cost-3'].filter((id) => id !== holder)
      // The holder opens its pool and pg-boss's connections once it holds, which can be a
      // moment after the standbys are already down to one.
      await waitFor(
        'standbys down to one connection, the holder working with more',
        async () => {
          const byNode = await connectionsByNode()
          return standbys.every((id) => byNode[id] === 1) && (byNode[holder] ?? 0) > 1
            ? byNode
            : undefined
        },
        40_000,
      )

      // Only the holder works the queue, and it does.
      await insertRows(db.pool, 500, '2 hours')
      await waitFor('the holder cleaned', async () => (await countRows(db.pool, 'true')) === 0)
      const { rows } = await db.pool.query<{ node_id: string }>(
        `SELECT DISTINCT node_id FROM pgsingleton.cleanup_runs WHERE singleton = 'cost' AND rows_deleted > 0`,
      )
      expect(rows.map((row) => row.node_id)).toEqual([holder])
    } finally {
      for (const node of nodes) node.child.kill('SIGTERM')
      await Promise.all(nodes.map((node) => node.exited))
    }
  }, 90_000)

  it('a holder that loses its lock session stops working the queue, and works it again when it holds again', async () => {
    const config = await writeConfig({ name: 'regain', policies: [POLICY], ...TIMING })
    const node = startNode(db.url, config, 'regain-1')
    try {
      const first = await waitFor('holding', async () => {
        const row = await statusOf(db.pool, 'regain')
        return row?.nodeId === 'regain-1' && row.epoch !== null ? row.epoch : undefined
      })
      // Working the queue as the holder.
      await insertRows(db.pool, 300, '2 hours')
      await waitFor('cleaned while holding', async () => (await countRows(db.pool, 'true')) === 0)
      await db.pool.query(
        `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'regain-1'`,
      )
      await waitFor('holding again under a new epoch', async () => {
        const row = await statusOf(db.pool, 'regain')
        return row?.nodeId === 'regain-1' && Number(row.epoch) > Number(first) ? true : undefined
      })
      await insertRows(db.pool, 300, '2 hours')
      await waitFor('cleaned after regaining', async () => (await countRows(db.pool, 'true')) === 0)
    } finally {
      node.child.kill('SIGTERM')
      await node.exited
    }
  }, 60_000)
})
