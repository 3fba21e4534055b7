import type pg from 'pg'
// A namespace import: a pg-boss of another major, without this export, must not fail the
// import of pg-singleton itself; start() names the version instead.
import * as pgBoss from 'pg-boss'
import {
  LEGACY_NAMES,
  MIGRATION_LOCK,
  PG_BOSS_INSTALL_LOCK,
  SCHEMA_REVISION,
  SCHEMA_VERSION,
  STEP_OF_META,
  schemaMigrations,
} from '../../migrations/index.js'
import { SingletonError } from '../errors.js'
import { SQLSTATE, sqlState } from './sqlstate.js'
import { withClient } from './transaction.js'

export interface MigrationResult {
  /** Names of the migrations this call applied (empty when the schema was current). */
  applied: string[]
  /** `pgsingleton.meta.schema_version`: what a node must understand. */
  schemaVersion: number
  /** `pgsingleton.meta.revision`: the last step applied. */
  revision: number
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
 * them (the same key the Kysely route's pg-boss step takes).
 */
async function installPgBoss(pool: pg.Pool): Promise<void> {
  await withClient(pool, async (client) => {
    await client.query('SELECT pg_advisory_lock($1)', [PG_BOSS_INSTALL_LOCK])
    try {
      const boss = new pgBoss.PgBoss({
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
      await client.query('SELECT pg_advisory_unlock($1)', [PG_BOSS_INSTALL_LOCK]).catch(() => {})
    }
  })
}

async function migrateOwnSchema(pool: pg.Pool): Promise<MigrationResult> {
  const found = await readSchema(pool)
  if (found && found.version > SCHEMA_VERSION) throw schemaTooNew(found.version)
  // A later step that keeps the schema version, applied by a newer pg-singleton: nothing
  // to do, and Kysely's Migrator would refuse the step it does not know in its table.
  if (found && found.revision > SCHEMA_REVISION)
    return { applied: [], schemaVersion: found.version, revision: found.revision }
  await renameLegacyMigrations(pool)

  // Loaded here, not with this module: a node that only checks the schema never loads
  // Kysely (a smaller process, whose crash the server notices sooner).
  const [{ Kysely, PostgresDialect }, { Migrator }] = await Promise.all([
    import('kysely'),
    import('kysely/migration'),
  ])
  // Kysely ends the pool it was given on destroy(); this one is borrowed, so give it a
  // wrapper whose end() does nothing.
  const db = new Kysely<unknown>({ dialect: new PostgresDialect({ pool: borrowed(pool) }) })
  try {
    const migrator = new Migrator({
      db,
      provider: { getMigrations: async () => ({ ...schemaMigrations }) },
      // Not Kysely's default names: Kysely's Migrator, when an app leaves its own table's
      // schema unset, takes a table of the default name in any schema for its own, and
      // then fails to find it on its search_path.
      migrationTableSchema: 'pgsingleton',
      migrationTableName: MIGRATION_TABLE,
      migrationLockTableName: `${MIGRATION_TABLE}_lock`,
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
    // A step another route (an app's migrator, the SQL files) had applied succeeds here
    // without doing anything: what this call applied is what moved the version.
    const after = (await readSchema(pool)) ?? { version: 0, revision: 0 }
    return {
      applied: (results ?? [])
        .filter((r) => r.status === 'Success')
        .map((r) => r.migrationName)
        .filter((name) => {
          const step = Number(/^pgsingleton_(\d+)_/.exec(name)?.[1])
          return step > (found?.revision ?? 0) && step <= after.revision
        }),
      schemaVersion: after.version,
      revision: after.revision,
    }
  } finally {
    await db.destroy()
  }
}

const MIGRATION_TABLE = 'pgsingleton_migration'

/**
 * Databases an earlier pg-singleton migrated keep their bookkeeping in tables named as
 * Kysely's defaults (`pgsingleton.kysely_migration`), with the first migration recorded as
 * `0001_initial`. Both get today's names, so such a database upgrades with no manual
 * step. Under the migration lock: ten processes at once rename once.
 */
async function renameLegacyMigrations(pool: pg.Pool): Promise<void> {
  await withClient(pool, async (client) => {
    await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK])
    try {
      const { rows } = await client.query<{ legacy: boolean; current: boolean }>(
        `SELECT to_regclass('pgsingleton.kysely_migration') IS NOT NULL AS legacy,
                to_regclass('pgsingleton.${MIGRATION_TABLE}') IS NOT NULL AS current`,
      )
      if (!rows[0]?.legacy || rows[0].current) return
      await client.query(`ALTER TABLE pgsingleton.kysely_migration RENAME TO ${MIGRATION_TABLE}`)
      await client.query(
        `ALTER TABLE IF EXISTS pgsingleton.kysely_migration_lock RENAME TO ${MIGRATION_TABLE}_lock`,
      )
      for (const [legacy, name] of Object.entries(LEGACY_NAMES)) {
        await client.query(`UPDATE pgsingleton.${MIGRATION_TABLE} SET name = $2 WHERE name = $1`, [
          legacy,
          name,
        ])
      }
    } finally {
      await client.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK]).catch(() => {})
    }
  })
}

/**
 * Refuses a database that is not migrated as far as this pg-singleton needs, or migrated
 * to a schema version it does not know. A later revision of its own schema version (a
 * newer pg-singleton's step that keeps the contract) is fine.
 */
export async function assertSchemaCurrent(pool: pg.Pool | pg.Client): Promise<void> {
  const found = await readSchema(pool)
  if (found && found.version > SCHEMA_VERSION) throw schemaTooNew(found.version)
  if (!found || found.version < SCHEMA_VERSION || found.revision < SCHEMA_REVISION) {
    throw new SingletonError(
      'SCHEMA_NOT_MIGRATED',
      `The database has pg-singleton schema ${found ? `version ${found.version}, revision ${found.revision}` : 'none'}; ` +
        `this pg-singleton needs version ${SCHEMA_VERSION}, revision ${SCHEMA_REVISION} or later. ` +
        'Run `pg-singleton migrate` (or add the migrations from `pg-singleton/migrations` to your Kysely migrator) first.',
    )
  }
}

/** The schema version and the last step applied (the revision; before step 4, the version). */
async function readSchema(
  pool: pg.Pool | pg.Client,
): Promise<{ version: number; revision: number } | undefined> {
  // Looked up first, so that a database not migrated yet puts no ERROR in the server log.
  const { rows: found } = await pool.query<{ exists: boolean }>(
    `SELECT to_regclass('pgsingleton.meta') IS NOT NULL AS exists`,
  )
  if (!found[0]?.exists) return undefined
  try {
    const { rows } = await pool.query<{ version: number; revision: number }>(
      `SELECT m.schema_version AS version, ${STEP_OF_META} AS revision FROM pgsingleton.meta m`,
    )
    return rows[0]
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
