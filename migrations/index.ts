import type { Kysely } from 'kysely'
import type { Migration, MigrationProvider } from 'kysely/migration'
// A namespace import: a pg-boss of another major, without this export, must not fail the
// import of pg-singleton itself; start() names the version instead.
import * as pgBoss from 'pg-boss'
import { lockKey } from '../src/lock/lock-key.js'
import * as initial from './0001_initial.js'
import * as safeDeletes from './0002_safe_deletes.js'
import * as tasks from './0003_tasks.js'
import * as fasterBatches from './0004_faster_batches.js'
import * as handOver from './0005_hand_over.js'
import * as equalValues from './0006_equal_values.js'
import * as plainBounds from './0007_plain_bounds.js'
import * as runRequests from './0008_run_requests.js'
import * as lockedLeaves from './0009_locked_leaves.js'

/** One schema step: the SQL that makes it, and the SQL that takes it back. */
interface Step {
  /** The revision it leaves in `pgsingleton.meta` (steps 1 to 3 also left it as schema_version). */
  readonly version: number
  readonly name: string
  readonly up: string
  readonly down: string
  /**
   * Nodes of the schema version before it run on it unchanged: it keeps
   * `meta.schema_version` and the protocol, and moves only `meta.revision`.
   */
  readonly compatible?: true
}

const STEPS: readonly Step[] = [
  { version: 1, name: 'pgsingleton_0001_initial', up: initial.UP, down: initial.DOWN },
  { version: 2, name: 'pgsingleton_0002_safe_deletes', up: safeDeletes.UP, down: safeDeletes.DOWN },
  { version: 3, name: 'pgsingleton_0003_tasks', up: tasks.UP, down: tasks.DOWN },
  {
    version: 4,
    name: 'pgsingleton_0004_faster_batches',
    up: fasterBatches.UP,
    down: fasterBatches.DOWN,
    compatible: true,
  },
  {
    version: 5,
    name: 'pgsingleton_0005_hand_over',
    up: handOver.UP,
    down: handOver.DOWN,
    compatible: true,
  },
  {
    version: 6,
    name: 'pgsingleton_0006_equal_values',
    up: equalValues.UP,
    down: equalValues.DOWN,
    compatible: true,
  },
  {
    version: 7,
    name: 'pgsingleton_0007_plain_bounds',
    up: plainBounds.UP,
    down: plainBounds.DOWN,
    compatible: true,
  },
  {
    version: 8,
    name: 'pgsingleton_0008_run_requests',
    up: runRequests.UP,
    down: runRequests.DOWN,
    compatible: true,
  },
  {
    version: 9,
    name: 'pgsingleton_0009_locked_leaves',
    up: lockedLeaves.UP,
    down: lockedLeaves.DOWN,
    compatible: true,
  },
]

/**
 * The `pgsingleton.meta.schema_version` the migrations leave behind: what a node must
 * understand. A database at a higher one was migrated by a pg-singleton whose nodes this
 * one cannot run beside (`SCHEMA_TOO_NEW`).
 */
export const SCHEMA_VERSION = STEPS.filter((step) => !step.compatible).at(-1)?.version ?? 0
/**
 * The `pgsingleton.meta.revision` the latest step leaves behind: this pg-singleton needs at
 * least it, and runs on a higher one of the same schema version.
 */
export const SCHEMA_REVISION = STEPS.at(-1)?.version ?? 0

/**
 * Every route takes this transaction-level lock first: `pg-singleton migrate`, an app's
 * Kysely migrator and the SQL files, whichever of them runs at the same moment. The key
 * cannot be a singleton's: singleton names have no spaces.
 */
export const MIGRATION_LOCK = lockKey('migrate pgsingleton').toString()
/** And this one around an install of pg-boss's schema (two first installs race on CREATE SCHEMA). */
export const PG_BOSS_INSTALL_LOCK = lockKey('install pg-boss').toString()

/**
 * The step a database is at, as SQL over a row `m` of `pgsingleton.meta`: its revision
 * where it has one (from step 4, which needs schema version 3) and its schema version is
 * still 3 or more, else its schema version; never below its schema version. (A route that
 * knows nothing of revisions, an older pg-singleton's, may have taken the schema version
 * below 3 by a step down; the revision left behind then no longer says what is there.
 * Every step applied from here on records its revision, so a climb back by this route
 * rewrites it.)
 */
export const STEP_OF_META = `CASE WHEN m.schema_version >= 3
  THEN greatest(coalesce((to_jsonb(m)->>'revision')::integer, 0), m.schema_version) ELSE m.schema_version END`

/** Sets `meta.revision` to `revision`, where the database has the column (from step 4). */
const recordRevision = (revision: number) => `IF EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('pgsingleton.meta') AND attname = 'revision' AND NOT attisdropped) THEN
    EXECUTE 'UPDATE pgsingleton.meta SET revision = ${revision}';
  END IF;`

const READ_STEP = `IF to_regclass('pgsingleton.meta') IS NOT NULL THEN
    EXECUTE 'SELECT ${STEP_OF_META.replaceAll("'", "''")} FROM pgsingleton.meta m' INTO found;
  END IF;`

/**
 * A step as one statement that applies it only where the schema is one step behind:
 * under the migration lock it reads `pgsingleton.meta`, does nothing when another route
 * already applied this step, refuses when an earlier one is missing, and otherwise runs
 * the step. One statement, so it is atomic even where a tool runs it outside a
 * transaction. This is the text of migrations/sql/ and what the Kysely migrations run.
 */
export function stepSql(step: Step): string {
  return `-- pg-singleton schema step ${step.version} (${step.name}).
-- Safe to run by any route, any number of times, at the same moment as another route:
-- it applies only on top of step ${step.version - 1} and records ${step.version} in pgsingleton.meta.
DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(${MIGRATION_LOCK});
  ${READ_STEP}
  IF found >= ${step.version} THEN
    RETURN; -- applied already, by this route or another
  END IF;
  IF found < ${step.version - 1} THEN
    RAISE EXCEPTION 'pg-singleton: schema step ${step.version} needs step ${step.version - 1} first; the database has %', found;
  END IF;
  EXECUTE $pgsingleton_step$${step.up}$pgsingleton_step$;
  ${recordRevision(step.version)}
END $pgsingleton_migration$;
`
}

/** Takes a step back, only where the schema is at exactly that version. */
function stepDownSql(step: Step): string {
  return `DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(${MIGRATION_LOCK});
  ${READ_STEP}
  IF found = ${step.version} THEN
    EXECUTE $pgsingleton_step$${step.down}$pgsingleton_step$;
    ${recordRevision(step.version - 1)}
  END IF;
END $pgsingleton_migration$;`
}

/**
 * pg-boss's schema, as the installed pg-boss builds it, when there is none yet. pg-boss
 * wraps its construction in BEGIN and COMMIT; inside a migrator's transaction those would
 * end the migrator's own transaction, so they are taken off and the statements run in it.
 * Upgrades of an existing pg-boss schema are pg-boss's own (`pg-singleton migrate`, or
 * the app's pg-boss started with `migrate: true`).
 */
export function pgBossConstructionSql(): string {
  const plan = pgBoss.getConstructionPlans('pgboss')
  const body = plan
    .trim()
    .replace(/^BEGIN;/, '')
    .replace(/COMMIT;$/, '')
  if (body === plan.trim()) throw new Error('unexpected shape of pg-boss construction plans')
  return body
}

/**
 * Kysely is loaded when a migration runs, not when this module is: a node that only checks
 * the schema version then never loads it (a smaller process, whose crash the server
 * notices sooner).
 */
const kysely = () => import('kysely')

const pgBossSchema: Migration = {
  async up(db: Kysely<unknown>) {
    const { sql } = await kysely()
    await sql.raw(`SELECT pg_advisory_xact_lock(${PG_BOSS_INSTALL_LOCK})`).execute(db)
    const { rows } = await sql<{ exists: boolean }>`
      SELECT to_regclass('pgboss.version') IS NOT NULL AS exists`.execute(db)
    if (rows[0]?.exists) return
    await sql.raw(pgBossConstructionSql()).execute(db)
  },
  async down() {
    // pg-boss's schema may serve the app's own jobs too: it is never dropped from here.
  },
}

const asMigration = (step: Step): Migration => ({
  async up(db: Kysely<unknown>) {
    const { sql } = await kysely()
    await sql.raw(stepSql(step)).execute(db)
  },
  async down(db: Kysely<unknown>) {
    const { sql } = await kysely()
    await sql.raw(stepDownSql(step)).execute(db)
  },
})

/** pg-singleton's own steps, by name, for `pg-singleton migrate`. */
export const schemaMigrations: Readonly<Record<string, Migration>> = Object.freeze(
  Object.fromEntries(STEPS.map((step) => [step.name, asMigration(step)])),
)

/**
 * pg-singleton's migrations for an app's own Kysely migrator: every schema step under a
 * name of its own (`pgsingleton_0001_initial`, ...), and the install of pg-boss's schema
 * (`pgsingleton_pgboss_schema`). Each recognises what `pg-singleton migrate` already did
 * (the version in `pgsingleton.meta`), and the reverse. The app's Migrator needs
 * `allowUnorderedMigrations: true`, since our names sort among the app's own.
 */
export const migrations: Readonly<Record<string, Migration>> = Object.freeze({
  ...schemaMigrations,
  pgsingleton_pgboss_schema: pgBossSchema,
})

/** The name our first migration had before names were namespaced. */
export const LEGACY_NAMES: Readonly<Record<string, string>> = Object.freeze({
  '0001_initial': 'pgsingleton_0001_initial',
})

/**
 * The app's migrations with ours added. Refuses an app migration whose name is ours.
 * Keeps working a database whose migration table recorded our first migration under its
 * old name, `0001_initial`: unless the app has a migration of that name itself, the name
 * is kept as a step that does nothing.
 */
export function withPgSingletonMigrations(
  app: Readonly<Record<string, Migration>>,
): Record<string, Migration> {
  const clash = Object.keys(app).find((name) => name.startsWith('pgsingleton_'))
  if (clash) {
    throw new Error(
      `migration "${clash}": names starting with "pgsingleton_" belong to pg-singleton's migrations; rename yours`,
    )
  }
  const legacy = Object.fromEntries(
    Object.keys(LEGACY_NAMES)
      .filter((name) => !(name in app))
      .map((name) => [name, { async up() {} } satisfies Migration]),
  )
  return { ...legacy, ...app, ...migrations }
}

export const migrationProvider: MigrationProvider = {
  getMigrations: async () => ({ ...migrations }),
}

/**
 * The same migrations as plain SQL files, by file name, for teams whose migrations run
 * through Flyway, Rails, Prisma or psql: each pg-singleton step (one DO statement) and
 * pg-boss's schema for the installed pg-boss (as pg-boss gives it, in its own transaction).
 */
export function migrationFiles(): Record<string, string> {
  return {
    ...Object.fromEntries(STEPS.map((step) => [`${step.name}.sql`, stepSql(step)])),
    'pgsingleton_pgboss_schema.sql': `-- pg-boss's schema (pgboss), as the installed pg-boss builds it. Run it once, when there
-- is no pgboss schema yet; later pg-boss upgrades are pg-boss's own (pg-singleton migrate,
-- or a pg-boss started with migrate: true).
${pgBoss.getConstructionPlans('pgboss').trim()}
`,
  }
}
