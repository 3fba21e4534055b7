import pg from 'pg'
import { describe, expect, it } from 'vitest'
import {
  assertSchemaCurrent,
  createSingleton,
  lockKey,
  migrateToLatest,
  SCHEMA_VERSION,
} from '../src/index.js'
import { useTestDatabase } from './support/database.js'

const policies = [
  { name: 'p', table: 'public.t', column: 'ts', olderThan: '1 day', every: '1 minute' },
]
const db = useTestDatabase({ migrate: false })

describe('migrations', () => {
  it('refuse to start a node on a database that was never migrated', async () => {
    const node = createSingleton({ name: 'm', connectionString: db.url, policies })
    await expect(node.start()).rejects.toMatchObject({
      code: 'SCHEMA_NOT_MIGRATED',
      message: expect.stringMatching(/pg-singleton migrate/),
    })
  })

  it('ten nodes migrating at once migrate once', async () => {
    const pools = Array.from(
      { length: 10 },
      () => new pg.Pool({ connectionString: db.url, max: 1 }),
    )
    try {
      const results = await Promise.all(pools.map((pool) => migrateToLatest(pool)))
      expect(results.filter((r) => r.applied.length > 0)).toHaveLength(1)
      expect(results.every((r) => r.schemaVersion === SCHEMA_VERSION)).toBe(true)
    } finally {
      await Promise.all(pools.map((pool) => pool.end()))
    }
    const { rows } = await db.pool.query(
      'SELECT name FROM pgsingleton.pgsingleton_migration ORDER BY name',
    )
    expect(rows.map((r) => r.name)).toEqual([
      'pgsingleton_0001_initial',
      'pgsingleton_0002_safe_deletes',
      'pgsingleton_0003_tasks',
    ])
    const boss = await db.pool.query(
      `SELECT count(*)::int AS n FROM pg_namespace WHERE nspname = 'pgboss'`,
    )
    expect(boss.rows[0].n).toBe(1) // pg-boss's schema too, so nodes need no CREATE
    expect((await migrateToLatest(db.pool)).applied).toEqual([])
    await assertSchemaCurrent(db.pool)
  })

  it('computes the same lock key in SQL as in Node', async () => {
    for (const name of ['db-cleaner', 'a', 'Ünïcödé', 'with space', 'x'.repeat(100)]) {
      const { rows } = await db.pool.query<{ key: string }>(
        'SELECT pgsingleton.lock_key($1) AS key',
        [name],
      )
      expect(BigInt(rows[0]?.key ?? '0')).toBe(lockKey(name))
    }
  })

  it('refuses a database migrated by a newer pg-singleton', async () => {
    await db.pool.query('UPDATE pgsingleton.meta SET schema_version = $1', [SCHEMA_VERSION + 1])
    try {
      await expect(migrateToLatest(db.pool)).rejects.toMatchObject({ code: 'SCHEMA_TOO_NEW' })
      const node = createSingleton({ name: 'm', connectionString: db.url, policies })
      await expect(node.start()).rejects.toMatchObject({
        code: 'SCHEMA_TOO_NEW',
        message: expect.stringMatching(
          new RegExp(`newer than the ${SCHEMA_VERSION} this pg-singleton knows`),
        ),
      })
    } finally {
      await db.pool.query('UPDATE pgsingleton.meta SET schema_version = $1', [SCHEMA_VERSION])
    }
  })

  it('keep epochs from ever going down', async () => {
    await db.pool.query(
      `SET pgsingleton.protocol = 3; INSERT INTO pgsingleton.leases VALUES ('e', 5, 'n', 1, now(), now())`,
    )
    await expect(
      db.pool.query(
        `SET pgsingleton.protocol = 3; UPDATE pgsingleton.leases SET epoch = 4 WHERE name = 'e'`,
      ),
    ).rejects.toThrow(/may only increase/)
  })

  it('refuse an epoch bump by a node that does not speak the protocol the schema requires', async () => {
    // A node of schema 1 declares no protocol: what its lock session would run.
    const client = new pg.Client({ connectionString: db.url })
    await client.connect()
    try {
      await expect(
        client.query(
          `INSERT INTO pgsingleton.leases AS l (name, epoch, node_id, backend_pid, acquired_at, heartbeat_at)
           VALUES ('old', 1, 'last-week', pg_backend_pid(), now(), now())`,
        ),
      ).rejects.toThrow(
        /node last-week speaks protocol 1, but this database .* requires protocol 3/,
      )
      await client.query(`SET pgsingleton.protocol = 3`)
      await client.query(
        `INSERT INTO pgsingleton.leases VALUES ('old', 1, 'this-week', pg_backend_pid(), now(), now())`,
      )
      await client.query(`RESET pgsingleton.protocol`)
      await expect(
        client.query(`UPDATE pgsingleton.leases SET epoch = epoch + 1 WHERE name = 'old'`),
      ).rejects.toThrow(/requires protocol 3/)
    } finally {
      await client.end()
    }
  })
})
