import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest'
import { createSingleton, type RunReport, type SingletonWarning } from '../src/index.js'
import { countRows, createEventsTable, insertRows } from './support/app-table.js'
import { useTestDatabase } from './support/database.js'

const role = `cleaner_${randomBytes(4).toString('hex')}`
const password = randomBytes(8).toString('hex')
const db = useTestDatabase({ setup: ({ pool }) => createEventsTable(pool) })

beforeAll(async () => {
  // The grants of the README's least-privilege role, word for word.
  await db.pool.query(`
    CREATE ROLE ${role} LOGIN PASSWORD '${password}';
    GRANT USAGE ON SCHEMA pgsingleton TO ${role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgsingleton TO ${role};
    GRANT EXECUTE ON FUNCTION pgsingleton.lock_key(text) TO ${role};
    GRANT USAGE ON SCHEMA app TO ${role};
    GRANT SELECT, DELETE ON app.events TO ${role};
    GRANT USAGE ON SCHEMA pgboss TO ${role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgboss TO ${role};
    GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgboss TO ${role};`)
})
afterAll(async () => {
  await db.pool.query(`DROP OWNED BY ${role}`) // its grants in this database, which is dropped after
  const client = new pg.Client({ connectionString: inject('adminUrl') })
  await client.connect()
  await client.query(`DROP ROLE IF EXISTS ${role}`)
  await client.end()
})

/** The policy on the app's table that the role is granted, run `every`. */
function eventsPolicy(every: string) {
  return { name: 'old', table: 'app.events', column: 'created_at', olderThan: '1 day', every }
}

/** The test database's URL, logging in as the least-privilege role. */
function asRole(): string {
  const url = new URL(db.url)
  url.username = role
  url.password = password
  return url.toString()
}

describe('a node running as a least-privilege role', () => {
  it('holds, schedules and cleans with only the grants the README lists', async () => {
    await insertRows(db.pool, 30, '2 days')
    await insertRows(db.pool, 3, '1 hour')
    const node = createSingleton({
      name: 'least-privilege',
      connectionString: asRole(),
      policies: [eventsPolicy('1 minute')],
    })
    const errors: Error[] = []
    node.on('error', (error) => errors.push(error))
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    expect((await done)[0]).toMatchObject({ status: 'done', rowsDeleted: 30 })
    expect(await node.whereis()).toBe(node.nodeId)
    await node.stop()
    expect(errors).toEqual([])
    expect(await countRows(db.pool, 'true')).toBe(3)
  })

  it('takes over without USAGE on plpgsql, which only its readying for a takeover needs, and says so', async () => {
    // A hardened database: DO blocks need USAGE on the language; calling functions does not.
    await db.pool.query('REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC')
    const warnings: SingletonWarning[] = []
    const nodes = ['a', 'b'].map((nodeId) => {
      const node = createSingleton({
        name: 'least-privilege-no-plpgsql',
        nodeId,
        connectionString: asRole(),
        policies: [eventsPolicy('1 hour')],
      })
      node.on('warning', (warning) => warnings.push(warning))
      return node
    })
    try {
      const [first, second] = nodes as [(typeof nodes)[number], (typeof nodes)[number]]
      const holds = once(first, 'lock:acquired')
      await first.start()
      await holds
      const waits = once(second, 'lock:waiting')
      await second.start()
      await waits
      const takesOver = once(second, 'lock:acquired')
      await first.stop()
      const [lease] = await takesOver
      expect(lease.epoch).toBeGreaterThan(1)
      expect(await second.whereis()).toBe('b')
      expect(warnings.map((w) => w.code)).toEqual(['TAKEOVER_NOT_READIED', 'TAKEOVER_NOT_READIED'])
      expect(warnings[0]?.message).toMatch(/42501: permission denied for language plpgsql/)
    } finally {
      await Promise.all(nodes.map((node) => node.stop()))
      await db.pool.query('GRANT USAGE ON LANGUAGE plpgsql TO PUBLIC')
    }
  })

  it('is refused, with the reason, on a table it may not delete from', async () => {
    await db.pool.query(
      `CREATE TABLE app.audit (at timestamptz); GRANT SELECT ON app.audit TO ${role}`,
    )
    const node = createSingleton({
      name: 'least-privilege-audit',
      connectionString: asRole(),
      policies: [
        { name: 'old', table: 'app.audit', column: 'at', olderThan: '1 day', every: '1 minute' },
      ],
    })
    await expect(node.start()).rejects.toMatchObject({
      code: 'INVALID_POLICY',
      message: expect.stringMatching(/may not SELECT and DELETE on "app\.audit"/),
    })
  })
})
