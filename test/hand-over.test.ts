import pg from 'pg'
import { describe, expect, it } from 'vitest'
import { useTestDatabase, waitFor } from './support/database.js'

const db = useTestDatabase()

/**
 * A lock session as a node's is, in SQL: it declares the protocol, takes its membership
 * lock, registers, and waits in slices (pgsingleton.wait_for_lock).
 */
async function nodeSession(name: string, nodeId: string) {
  const client = new pg.Client({ connectionString: db.url, application_name: nodeId })
  await client.connect()
  const register = async () => {
    await client.query(`SELECT set_config('pgsingleton.protocol', '3', false)`)
    await client.query('SELECT pg_advisory_lock(pgsingleton.member_key($1, $2))', [name, nodeId])
    await client.query(
      `INSERT INTO pgsingleton.nodes (singleton, node_id, backend_pid, member_key)
       VALUES ($1, $2, pg_backend_pid(), pgsingleton.member_key($1, $2))
       ON CONFLICT (singleton, node_id) DO UPDATE SET backend_pid = excluded.backend_pid`,
      [name, nodeId],
    )
  }
  await register()
  const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
  return {
    client,
    pid: rows[0]?.pid as number,
    register,
    /** Waits, slice after slice, until acquired: the epoch. */
    async acquire(): Promise<number> {
      for (;;) {
        const { rows: slice } = await client.query<{ slice: string; epoch: string | null }>(
          'SELECT slice, epoch FROM pgsingleton.wait_for_lock($1, $2, 200)',
          [name, nodeId],
        )
        if (slice[0]?.slice !== 'acquired') continue
        if (slice[0].epoch !== null) return Number(slice[0].epoch)
        // The bump waited out the slice (for a batch, a DDL): the node bumps on its own.
        for (;;) {
          const bumped = await client
            .query<{ epoch: string }>('SELECT epoch FROM pgsingleton.bump_epoch($1, $2)', [
              name,
              nodeId,
            ])
            .catch((error) => {
              if (error.code === '55P03') return undefined
              throw error
            })
          if (bumped) return Number(bumped.rows[0]?.epoch)
        }
      }
    },
    handOver: async (epoch: number) =>
      (
        await client.query<{ successor: string | null; epoch: string | null }>(
          'SELECT successor, epoch FROM pgsingleton.hand_over($1, $2, $3)',
          [name, epoch, 'stopped'],
        )
      ).rows[0],
    end: () => client.end(),
  }
}

/** Until the session waits in the lock queue (a lock it asked for, not granted). */
const queued = (session: { pid: number }) =>
  waitFor('the session queued', async () =>
    (
      await db.pool.query(
        `SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND NOT granted`,
        [session.pid],
      )
    ).rowCount === 1
      ? true
      : undefined,
  )

const terms = async (name: string) =>
  (
    await db.pool.query(
      `SELECT epoch::int, node_id, end_reason, closed_by FROM pgsingleton.terms
        WHERE name = $1 ORDER BY epoch`,
      [name],
    )
  ).rows

describe('the hand-over, in SQL', () => {
  it('a node given the same server session again (a session pooler, a reused pid) bumps past its earlier epoch', async () => {
    const node = await nodeSession('ho-reuse', 'x')
    try {
      expect(await node.acquire()).toBe(1)
      // What PgBouncer runs when a client leaves a session-mode connection, before it gives
      // the same server connection to the next client: the locks go, the lease stays.
      await node.client.query('DISCARD ALL')
      await node.register()
      expect(await node.acquire()).toBe(2)
      expect(await terms('ho-reuse')).toEqual([
        { epoch: 1, node_id: 'x', end_reason: 'lost', closed_by: 'successor' },
        { epoch: 2, node_id: 'x', end_reason: null, closed_by: null },
      ])
    } finally {
      await node.end()
    }
  })

  it('a holder that holds the lock twice lets go of all of it, and hands over', async () => {
    const holder = await nodeSession('ho-twice', 'h')
    const next = await nodeSession('ho-twice', 'w')
    try {
      expect(await holder.acquire()).toBe(1)
      // As when a grant came in the same instant as a wait slice's lock_timeout.
      await holder.client.query(`SELECT pg_advisory_lock(pgsingleton.lock_key('ho-twice'))`)
      const taken = next.acquire()
      await queued(next)
      expect(await holder.handOver(1)).toEqual({ successor: 'w', epoch: '2' })
      expect(await taken).toBe(2)
    } finally {
      await Promise.all([holder.end(), next.end()])
    }
  })

  it.each([
    ['nodes', 'ALTER TABLE pgsingleton.nodes ADD COLUMN ho_ddl integer', 'AccessExclusiveLock'],
    ['leases', 'CREATE INDEX ho_ddl ON pgsingleton.leases (heartbeat_at)', 'ShareLock'],
  ])(
    'with a DDL queued on the %s table, the hand-over only unlocks, and the next node bumps without waiting for it',
    async (table, statement, mode) => {
      const name = `ho-ddl-${table}`
      const holder = await nodeSession(name, 'h')
      const next = await nodeSession(name, 'w')
      const reader = await db.pool.connect()
      const ddl = await db.pool.connect()
      try {
        expect(await holder.acquire()).toBe(1)
        const taken = next.acquire()
        await queued(next)
        // A transaction holds the table (a reader; for the lease table, a writer); a DDL queues
        // behind it, and every conflicting lock on the table would queue behind the DDL.
        await reader.query('BEGIN')
        await reader.query(
          table === 'nodes'
            ? 'SELECT count(*) FROM pgsingleton.nodes'
            : 'LOCK TABLE pgsingleton.leases IN ROW EXCLUSIVE MODE',
        )
        await ddl.query('BEGIN')
        const altered = ddl.query(statement)
        await waitFor('the DDL queued', async () =>
          (
            await db.pool.query(
              `SELECT 1 FROM pg_locks WHERE locktype = 'relation' AND relation = $1::regclass
                AND mode = $2 AND NOT granted`,
              [`pgsingleton.${table}`, mode],
            )
          ).rowCount === 1
            ? true
            : undefined,
        )
        expect(await holder.handOver(1)).toEqual({ successor: null, epoch: null })
        const release = async () => {
          await reader.query('COMMIT')
          await altered
          await ddl.query('ROLLBACK')
        }
        // The next node's own bump writes the lease table too, and waits for the DDL there, as
        // it did before the hand-over bumped for it; the hand-over does not wait with it.
        if (table === 'leases') await release()
        expect(await taken).toBe(2)
        expect(await terms(name)).toEqual([
          { epoch: 1, node_id: 'h', end_reason: 'released', closed_by: 'holder' },
          { epoch: 2, node_id: 'w', end_reason: null, closed_by: null },
        ])
        if (table === 'nodes') await release()
      } finally {
        await reader.query('ROLLBACK').catch(() => {})
        await ddl.query('ROLLBACK').catch(() => {})
        reader.release()
        ddl.release()
        await Promise.all([holder.end(), next.end()])
      }
    },
  )
})
