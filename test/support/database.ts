import { randomBytes } from 'node:crypto'
import pg from 'pg'
import { afterAll, beforeAll, inject } from 'vitest'
import { migrateToLatest } from '../../src/db/migrate.js'

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
    async drop() {
      await pool.end()
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

export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined | null | false>,
  timeoutMs = 20_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await probe()
    if (value !== undefined && value !== null && value !== false) return value
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}
