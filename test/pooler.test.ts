import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { countRows, createEventsTable, insertRows, statusOf } from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, runCli, writeConfig } from './support/nodes.js'
import { PgBouncer } from './support/pgbouncer.js'

const db = useTestDatabase({ setup: ({ pool }) => createEventsTable(pool) })
failOnNodesLeftRunning()
const transaction = { bouncer: undefined as PgBouncer | undefined }
const session = { bouncer: undefined as PgBouncer | undefined }
beforeAll(async () => {
  transaction.bouncer = await new PgBouncer(db.url, 'transaction', 4).start()
  session.bouncer = await new PgBouncer(db.url, 'session', 20).start()
})
afterAll(async () => {
  await transaction.bouncer?.stop()
  await session.bouncer?.stop()
})

const policy = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 hour',
  every: '1 second',
}

/** Advisory locks held by any session on the server: a pooled one would leak. */
async function advisoryLocks(): Promise<number> {
  const { rows } = await db.pool.query(
    `SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory'
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
  )
  return rows[0].n
}

/** Clients hammering the pooler with short transactions, as an app would. */
function load(url: string, clients: number): () => Promise<void> {
  let running = true
  const pools = Array.from({ length: clients }, () => {
    const pool = new pg.Pool({ connectionString: url, max: 1 })
    pool.on('error', () => {})
    return pool
  })
  const loops = pools.map(async (pool) => {
    while (running) await pool.query('SELECT pg_sleep(0.005)').catch(() => {})
  })
  return async () => {
    running = false
    await Promise.all(loops)
    await Promise.all(pools.map((p) => p.end()))
  }
}

describe('PgBouncer, for real', () => {
  it('a lock session through PgBouncer in transaction mode is refused before any lock, with the pooler idle', async () => {
    const config = await writeConfig({ name: 'pooled-idle', policies: [policy] })
    const node = runCli(['run', '--config', config, '--node-id', 'pooled'], {
      DATABASE_URL: transaction.bouncer?.url,
    })
    const { code } = await node.exited
    expect(code, node.output()).toBe(1)
    expect(node.output()).toMatch(
      /The lock connection does not keep one server session: .*transaction-pooling proxy \(PgBouncer with pool_mode = transaction.*PG_SINGLETON_LOCK_URL.*\[SESSION_NOT_KEPT\]/s,
    )
    expect(await advisoryLocks()).toBe(0)
    expect(await statusOf(db.pool, 'pooled-idle')).toBeUndefined()
  })

  it('and with the pooler busy', async () => {
    const stopLoad = load(transaction.bouncer?.url ?? '', 6)
    try {
      const config = await writeConfig({ name: 'pooled-busy', policies: [policy] })
      for (let i = 0; i < 3; i++) {
        const node = runCli(['run', '--config', config, '--node-id', `busy-${i}`], {
          DATABASE_URL: transaction.bouncer?.url,
        })
        const { code } = await node.exited
        expect(code, node.output()).toBe(1)
        expect(node.output(), node.output()).toMatch(/\[SESSION_NOT_KEPT\]/)
      }
    } finally {
      await stopLoad()
    }
    expect(await advisoryLocks()).toBe(0)
  })

  it('session mode works: holds, cleans', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 300, '2 hours')
    const config = await writeConfig({ name: 'session-mode', policies: [policy] })
    const node = runCli(['run', '--config', config, '--node-id', 'via-session-pool'], {
      DATABASE_URL: session.bouncer?.url,
    })
    await waitFor('the rows to be cleaned', async () =>
      (await countRows(db.pool, `created_at < now() - interval '1 hour'`)) === 0 ? true : undefined,
    )
    expect((await statusOf(db.pool, 'session-mode'))?.nodeId).toBe('via-session-pool')
    node.signal('SIGTERM')
    expect((await node.exited).code, node.output()).toBe(0)
  })

  it('PG_SINGLETON_LOCK_URL direct, the rest through transaction pooling: works, pg-boss polls, and nothing is logged as an error', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 300, '2 hours')
    const config = await writeConfig({ name: 'split', policies: [policy] })
    const stopLoad = load(transaction.bouncer?.url ?? '', 3)
    const node = runCli(['run', '--config', config, '--node-id', 'split-node'], {
      DATABASE_URL: transaction.bouncer?.url,
      PG_SINGLETON_LOCK_URL: db.url,
    })
    try {
      await waitFor('the rows to be cleaned', async () =>
        (await countRows(db.pool, `created_at < now() - interval '1 hour'`)) === 0
          ? true
          : undefined,
      )
      expect(node.output()).toMatch(/pg-boss polls its queue instead of LISTEN/)
      // More rows, cleaned again through the pooler, while it is busy.
      await insertRows(db.pool, 300, '2 hours')
      await waitFor('the new rows to be cleaned', async () =>
        (await countRows(db.pool, `created_at < now() - interval '1 hour'`)) === 0
          ? true
          : undefined,
      )
      await new Promise((resolve) => setTimeout(resolve, 5000))
      const errors = node
        .output()
        .split('\n')
        .filter((line) => / (ERROR|WARN) /.test(line) && !/no index starts with/.test(line))
      expect(errors).toEqual([])
    } finally {
      await stopLoad()
      node.signal('SIGTERM')
      expect((await node.exited).code, node.output()).toBe(0)
    }
  })
})
