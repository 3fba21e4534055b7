import { randomBytes } from 'node:crypto'
import pg from 'pg'
import { afterAll, beforeAll, inject } from 'vitest'
import { migrateToLatest } from '../../src/db/migrate.js'
import { waitFor as pollUntil } from '../../src/wait.js'

export interface TestDatabase {
  url: string
  pool: pg.Pool
  drop(): Promise<void>
}

/** A fresh database on the test server, migrated unless told otherwise. */
export async function createTestDatabase(
  options: { migrate?: boolean } = {},
): Promise<TestDatabase> {
  const adminUrl = inject('adminUrl')
  const name = `pgs_test_${randomBytes(5).toString('hex')}`
  const admin = new pg.Client({ connectionString: adminUrl })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  await admin.end()
  const url = new URL(adminUrl)
  url.pathname = `/${name}`
  const pool = new pg.Pool({ connectionString: url.toString(), max: 6 })
  pool.on('error', () => {})
  if (options.migrate !== false) await migrateToLatest(pool)
  return {
    url: url.toString(),
    pool,
    async drop(this: TestDatabase) {
      // The test may have swapped the pool (say, to pick up a new database setting).
      await this.pool.end()
      const client = new pg.Client({ connectionString: adminUrl })
      await client.connect()
      await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
      await client.end()
    },
  }
}

/**
 * Gives a test file its own database for all its tests (made before them, dropped after
 * them). The returned object is filled in by the time the tests run.
 */
export function useTestDatabase(
  options: { migrate?: boolean; setup?: (db: TestDatabase) => Promise<void> } = {},
): TestDatabase {
  const db = {} as TestDatabase
  beforeAll(async () => {
    Object.assign(db, await createTestDatabase(options))
    await options.setup?.(db)
  })
  afterAll(async () => {
    await db.drop?.()
  })
  return db
}

/** The library's waitFor, reading `null` and `false` as "not yet" too, polling every 10 ms. */
export function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined | null | false>,
  timeoutMs = 20_000,
): Promise<T> {
  return pollUntil(
    what,
    async () => {
      const value = await probe()
      return value === null || value === false ? undefined : value
    },
    timeoutMs,
    10,
  )
}
