import { Kysely, PostgresDialect } from 'kysely'
import { Migrator } from 'kysely/migration'
import type pg from 'pg'
import { PgBoss } from 'pg-boss'
import { migrationProvider, SCHEMA_VERSION } from '../../migrations/index.js'
import { SingletonError } from '../errors.js'
import { lockKey } from '../lock/lock-key.js'
import { SQLSTATE, sqlState } from './sqlstate.js'
import { withClient } from './transaction.js'

export interface MigrationResult {
  /** Names of the migrations this call applied (empty when the schema was current). */
  applied: string[]
  schemaVersion: number
}

/**
 * Applies pg-singleton's migrations, then installs or upgrades pg-boss's schema
 * (`pgboss`), so that nodes can run as a role that may not create anything. Kysely's
 * Migrator and pg-boss both migrate under an advisory lock, so ten nodes calling this at
 * once migrate once and the other nine find nothing to do.
 */
export async function migrateToLatest(pool: pg.Pool): Promise<MigrationResult> {
  const result = await migrateOwnSchema(pool)
  await installPgBoss(pool)
  return result
}

/**
 * pg-boss migrates under its own advisory lock, but two first installs at once still race
 * on CREATE SCHEMA; one session-level lock of ours around the whole install serializes
 * them. The key cannot be a singleton's: singleton names have no spaces.
 */
const PG_BOSS_INSTALL_KEY = lockKey('install pg-boss')

async function installPgBoss(pool: pg.Pool): Promise<void> {
  await withClient(pool, async (client) => {
    await client.query('SELECT pg_advisory_lock($1)', [PG_BOSS_INSTALL_KEY.toString()])
    try {
      const boss = new PgBoss({
        db: { executeSql: (text: string, values?: unknown[]) => client.query(text, values) },
        migrate: true,
        supervise: false,
        schedule: false,
      })
      const failures: Error[] = []
      boss.on('error', (error) => failures.push(error))
      await boss.start()
      await boss.stop({ graceful: false, close: false })
      if (failures[0]) throw failures[0]
    } finally {
      await client
        .query('SELECT pg_advisory_unlock($1)', [PG_BOSS_INSTALL_KEY.toString()])
        .catch(() => {})
    }
  })
}

async function migrateOwnSchema(pool: pg.Pool): Promise<MigrationResult> {
  const found = await readSchemaVersion(pool)
  if (found !== undefined && found > SCHEMA_VERSION) throw schemaTooNew(found)

  // Kysely ends the pool it was given on destroy(); this one is borrowed, so give it a
  // wrapper whose end() does nothing.
  const db = new Kysely<unknown>({ dialect: new PostgresDialect({ pool: borrowed(pool) }) })
  try {
    const migrator = new Migrator({
      db,
      provider: migrationProvider,
      migrationTableSchema: 'pgsingleton',
      migrationTableName: 'kysely_migration',
      migrationLockTableName: 'kysely_migration_lock',
    })
    const { error, results } = await migrator.migrateToLatest()
    if (error) {
      throw new SingletonError(
        'SCHEMA_NOT_MIGRATED',
        `pg-singleton migrations failed: ${String((error as Error).message ?? error)}`,
        {
          cause: error,
        },
      )
    }
    return {
      applied: (results ?? []).filter((r) => r.status === 'Success').map((r) => r.migrationName),
      schemaVersion: SCHEMA_VERSION,
    }
  } finally {
    await db.destroy()
  }
}

/** Refuses a database that is not migrated, or migrated by a newer pg-singleton. */
export async function assertSchemaCurrent(pool: pg.Pool | pg.Client): Promise<void> {
  const found = await readSchemaVersion(pool)
  if (found === undefined || found < SCHEMA_VERSION) {
    throw new SingletonError(
      'SCHEMA_NOT_MIGRATED',
      `The database has pg-singleton schema version ${found ?? 'none'}, this pg-singleton needs ${SCHEMA_VERSION}. ` +
        'Run `pg-singleton migrate` (or add the migrations from `pg-singleton/migrations` to your Kysely migrator) first.',
    )
  }
  if (found > SCHEMA_VERSION) throw schemaTooNew(found)
}

async function readSchemaVersion(pool: pg.Pool | pg.Client): Promise<number | undefined> {
  try {
    const { rows } = await pool.query<{ schema_version: number }>(
      'SELECT schema_version FROM pgsingleton.meta',
    )
    return rows[0]?.schema_version
  } catch (error) {
    if (sqlState(error) === SQLSTATE.UNDEFINED_TABLE) return undefined
    throw error
  }
}

function schemaTooNew(found: number): SingletonError {
  return new SingletonError(
    'SCHEMA_TOO_NEW',
    `The database has pg-singleton schema version ${found}, newer than the ${SCHEMA_VERSION} this pg-singleton knows. ` +
      'Upgrade pg-singleton on this node; it will not run against a schema it does not understand.',
  )
}

function borrowed(pool: pg.Pool): pg.Pool {
  return new Proxy(pool, {
    get(target, property, receiver) {
      if (property === 'end') return async () => {}
      const value = Reflect.get(target, property, receiver)
      return typeof value === 'function' ? value.bind(target) : value
    },
  })
}
