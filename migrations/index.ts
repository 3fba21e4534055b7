import type { Migration, MigrationProvider } from 'kysely/migration'
import * as initial from './0001_initial.js'
import * as safeDeletes from './0002_safe_deletes.js'

/**
 * pg-singleton's migrations, by name (kysely sorts them by name). An app with its own
 * Kysely migrator can spread these into its provider; `pg-singleton migrate` runs them
 * with bookkeeping inside the `pgsingleton` schema.
 */
export const migrations: Readonly<Record<string, Migration>> = Object.freeze({
  '0001_initial': initial,
  '0002_safe_deletes': safeDeletes,
})

/** The `pgsingleton.meta.schema_version` the latest migration leaves behind. */
export const SCHEMA_VERSION = 2

export const migrationProvider: MigrationProvider = {
  getMigrations: async () => ({ ...migrations }),
}
