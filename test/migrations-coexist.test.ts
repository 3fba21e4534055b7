import { execFile } from 'node:child_process'
import { readdir, readFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { Kysely, PostgresDialect, sql } from 'kysely'
import { type Migration, Migrator } from 'kysely/migration'
import pg from 'pg'
import { afterAll, describe, expect, it } from 'vitest'
import {
  migrateToLatest,
  migrationFiles,
  SCHEMA_VERSION,
  withPgSingletonMigrations,
} from '../src/index.js'
import { createTestDatabase, type TestDatabase } from './support/database.js'
import { runCli } from './support/nodes.js'

const sqlDir = fileURLToPath(new URL('../migrations/sql/', import.meta.url))
const databases: TestDatabase[] = []
afterAll(async () => {
  for (const db of databases) await db.drop()
})
async function fresh(): Promise<TestDatabase> {
  const db = await createTestDatabase({ migrate: false })
  databases.push(db)
  return db
}

/** An app's own migrations; its first is also called 0001_initial. */
const appMigrations: Record<string, Migration> = {
  '0001_initial': {
    async up(db) {
      await sql`CREATE SCHEMA app; CREATE TABLE app.users (id int PRIMARY KEY, created_at timestamptz NOT NULL)`.execute(
        db,
      )
    },
  },
}
const appSecond: Record<string, Migration> = {
  '0002_orders': {
    async up(db) {
      await sql`CREATE TABLE app.orders (id int PRIMARY KEY)`.execute(db)
    },
  },
}

/** The app's Kysely migrator, set up as the README says. */
async function appMigrate(url: string, own: Record<string, Migration>) {
  const db = new Kysely<unknown>({
    dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: url, max: 1 }) }),
  })
  try {
    const migrator = new Migrator({
      db,
      provider: { getMigrations: async () => withPgSingletonMigrations(own) },
      allowUnorderedMigrations: true,
    })
    const { error, results } = await migrator.migrateToLatest()
    if (error) throw error
    return (results ?? []).map((r) => `${r.migrationName}:${r.status}`)
  } finally {
    await db.destroy()
  }
}

async function cliMigrate(url: string) {
  const cli = runCli(['migrate'], { DATABASE_URL: url })
  const { code } = await cli.exited
  return { code, output: cli.output() }
}

async function version(db: TestDatabase): Promise<number> {
  return (await db.pool.query('SELECT schema_version FROM pgsingleton.meta')).rows[0].schema_version
}

/** What the schemas hold, in a form two databases can be compared by. */
async function catalog(db: TestDatabase): Promise<string[]> {
  const { rows } = await db.pool.query<{ item: string }>(`
    SELECT format('relation %s.%s %s', n.nspname, c.relname, c.relkind) AS item
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname IN ('pgsingleton', 'pgboss') AND c.relname NOT LIKE 'pgsingleton_migration%'
    UNION ALL
    SELECT format('column %s.%s.%s %s %s %s', n.nspname, c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
      FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE n.nspname IN ('pgsingleton', 'pgboss') AND a.attnum > 0 AND NOT a.attisdropped AND c.relname NOT LIKE 'pgsingleton_migration%'
    UNION ALL
    SELECT format('constraint %s %s', conname, pg_get_constraintdef(co.oid))
      FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
     WHERE n.nspname IN ('pgsingleton', 'pgboss') AND conrelid::regclass::text NOT LIKE '%pgsingleton_migration%'
    UNION ALL
    SELECT format('index %s', pg_get_indexdef(i.indexrelid))
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname IN ('pgsingleton', 'pgboss') AND c.relname NOT LIKE 'pgsingleton_migration%'
    UNION ALL
    SELECT format('function %s.%s(%s) %s', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), md5(pg_get_functiondef(p.oid)))
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname IN ('pgsingleton', 'pgboss')
    UNION ALL
    SELECT format('view %s.%s %s', schemaname, viewname, md5(definition))
      FROM pg_views WHERE schemaname IN ('pgsingleton', 'pgboss')
    UNION ALL
    SELECT format('trigger %s %s', tgname, pg_get_triggerdef(t.oid))
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname IN ('pgsingleton', 'pgboss') AND NOT t.tgisinternal
    UNION ALL
    SELECT format('meta %s %s', schema_version, protocol) FROM pgsingleton.meta
    ORDER BY 1`)
  return rows.map((r) => r.item)
}

describe('migrations that coexist with an app that migrates itself', () => {
  it('the app migrator takes ours, then `pg-singleton migrate` finds nothing to do, then the app adds one of its own', async () => {
    const db = await fresh()
    expect(await appMigrate(db.url, appMigrations)).toEqual([
      '0001_initial:Success',
      'pgsingleton_0001_initial:Success',
      'pgsingleton_0002_safe_deletes:Success',
      'pgsingleton_0003_tasks:Success',
      'pgsingleton_0004_faster_batches:Success',
      'pgsingleton_0005_hand_over:Success',
      'pgsingleton_0006_equal_values:Success',
      'pgsingleton_0007_plain_bounds:Success',
      'pgsingleton_0008_run_requests:Success',
      'pgsingleton_0009_locked_leaves:Success',
      'pgsingleton_pgboss_schema:Success',
    ])
    expect(await version(db)).toBe(SCHEMA_VERSION)
    const { rows } = await db.pool.query(`SELECT to_regclass('pgboss.job') IS NOT NULL AS boss`)
    expect(rows[0].boss).toBe(true)

    const cli = await cliMigrate(db.url)
    expect(cli.code, cli.output).toBe(0)
    expect(cli.output).toMatch(/Schema pgsingleton is up to date \(version 3, revision 9\)/)

    expect(await appMigrate(db.url, { ...appMigrations, ...appSecond })).toEqual([
      '0002_orders:Success',
    ])
    expect(await appMigrate(db.url, { ...appMigrations, ...appSecond })).toEqual([])
  })

  it('`pg-singleton migrate` first, then the app migrator: ours are recognised, the app migrates on every later run', async () => {
    const db = await fresh()
    const cli = await cliMigrate(db.url)
    expect(cli.code, cli.output).toBe(0)
    expect(cli.output).toMatch(/Applied pgsingleton_0001_initial, pgsingleton_0002_safe_deletes/)
    const before = await catalog(db)
    expect(await appMigrate(db.url, appMigrations)).toEqual([
      '0001_initial:Success',
      'pgsingleton_0001_initial:Success',
      'pgsingleton_0002_safe_deletes:Success',
      'pgsingleton_0003_tasks:Success',
      'pgsingleton_0004_faster_batches:Success',
      'pgsingleton_0005_hand_over:Success',
      'pgsingleton_0006_equal_values:Success',
      'pgsingleton_0007_plain_bounds:Success',
      'pgsingleton_0008_run_requests:Success',
      'pgsingleton_0009_locked_leaves:Success',
      'pgsingleton_pgboss_schema:Success',
    ])
    expect(await catalog(db)).toEqual(before) // ours did nothing the second time
    expect(await appMigrate(db.url, { ...appMigrations, ...appSecond })).toEqual([
      '0002_orders:Success',
    ])
    expect((await cliMigrate(db.url)).code).toBe(0)
  })

  it('a database migrated under the old name 0001_initial upgrades with no manual step, by either route', async () => {
    const ours = await fresh()
    // What an earlier pg-singleton left: schema 1, recorded in its table as 0001_initial.
    const [first] = Object.values(migrationFiles())
    await ours.pool.query(first as string)
    await ours.pool.query(`CREATE TABLE pgsingleton.kysely_migration (name varchar(255) PRIMARY KEY, timestamp varchar(255) NOT NULL);
      CREATE TABLE pgsingleton.kysely_migration_lock (id varchar(255) PRIMARY KEY, is_locked integer NOT NULL DEFAULT 0);
      INSERT INTO pgsingleton.kysely_migration VALUES ('0001_initial', now()::text)`)
    const result = await migrateToLatest(ours.pool)
    expect(result).toMatchObject({
      applied: [
        'pgsingleton_0002_safe_deletes',
        'pgsingleton_0003_tasks',
        'pgsingleton_0004_faster_batches',
        'pgsingleton_0005_hand_over',
        'pgsingleton_0006_equal_values',
        'pgsingleton_0007_plain_bounds',
        'pgsingleton_0008_run_requests',
        'pgsingleton_0009_locked_leaves',
      ],
      schemaVersion: SCHEMA_VERSION,
    })
    const { rows: recorded } = await ours.pool.query(
      'SELECT name FROM pgsingleton.pgsingleton_migration ORDER BY name',
    )
    expect(recorded.map((r) => r.name)).toEqual([
      'pgsingleton_0001_initial',
      'pgsingleton_0002_safe_deletes',
      'pgsingleton_0003_tasks',
      'pgsingleton_0004_faster_batches',
      'pgsingleton_0005_hand_over',
      'pgsingleton_0006_equal_values',
      'pgsingleton_0007_plain_bounds',
      'pgsingleton_0008_run_requests',
      'pgsingleton_0009_locked_leaves',
    ])

    const app = await fresh()
    // An app that merged our migrations under their old names, and has no 0001_initial of its own.
    await app.pool.query(first as string)
    await app.pool.query(`CREATE TABLE public.kysely_migration (name varchar(255) PRIMARY KEY, timestamp varchar(255) NOT NULL);
      INSERT INTO public.kysely_migration VALUES ('0001_initial', now()::text)`)
    expect(await appMigrate(app.url, {})).toEqual([
      'pgsingleton_0001_initial:Success',
      'pgsingleton_0002_safe_deletes:Success',
      'pgsingleton_0003_tasks:Success',
      'pgsingleton_0004_faster_batches:Success',
      'pgsingleton_0005_hand_over:Success',
      'pgsingleton_0006_equal_values:Success',
      'pgsingleton_0007_plain_bounds:Success',
      'pgsingleton_0008_run_requests:Success',
      'pgsingleton_0009_locked_leaves:Success',
      'pgsingleton_pgboss_schema:Success',
    ])
    expect(await version(app)).toBe(SCHEMA_VERSION)
  })

  it('refuses an app migration named like ours', () => {
    expect(() => withPgSingletonMigrations({ pgsingleton_9999_mine: { async up() {} } })).toThrow(
      /names starting with "pgsingleton_" belong to pg-singleton/,
    )
  })

  it('ten migrators of either route at once migrate once', async () => {
    const db = await fresh()
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        i % 2 === 0
          ? appMigrate(db.url, appMigrations).then(() => 'app')
          : cliMigrate(db.url).then((r) => {
              expect(r.code, r.output).toBe(0)
              return r.output
            }),
      ),
    )
    const appliedByCli = results.filter((r) => /Applied pgsingleton_0001_initial/.test(r))
    expect(appliedByCli.length).toBeLessThanOrEqual(1)
    expect(await version(db)).toBe(SCHEMA_VERSION)
    const { rows: ours } = await db.pool.query(
      'SELECT name FROM pgsingleton.pgsingleton_migration ORDER BY name',
    )
    expect(ours.map((r) => r.name)).toEqual([
      'pgsingleton_0001_initial',
      'pgsingleton_0002_safe_deletes',
      'pgsingleton_0003_tasks',
      'pgsingleton_0004_faster_batches',
      'pgsingleton_0005_hand_over',
      'pgsingleton_0006_equal_values',
      'pgsingleton_0007_plain_bounds',
      'pgsingleton_0008_run_requests',
      'pgsingleton_0009_locked_leaves',
    ])
    const { rows: app } = await db.pool.query(
      'SELECT name FROM public.kysely_migration ORDER BY name',
    )
    expect(app.map((r) => r.name)).toEqual([
      '0001_initial',
      'pgsingleton_0001_initial',
      'pgsingleton_0002_safe_deletes',
      'pgsingleton_0003_tasks',
      'pgsingleton_0004_faster_batches',
      'pgsingleton_0005_hand_over',
      'pgsingleton_0006_equal_values',
      'pgsingleton_0007_plain_bounds',
      'pgsingleton_0008_run_requests',
      'pgsingleton_0009_locked_leaves',
      'pgsingleton_pgboss_schema',
    ])
  })

  it('the SQL files are generated from the same source and build the same schema as the Kysely route', async () => {
    const files = migrationFiles()
    const onDisk = (await readdir(sqlDir)).sort()
    expect(onDisk).toEqual(Object.keys(files).sort())
    for (const name of onDisk) {
      expect(
        await readFile(`${sqlDir}${name}`, 'utf8'),
        `${name} is out of date: npm run migrations:sql`,
      ).toBe(files[name])
    }

    const viaFiles = await fresh()
    for (const name of onDisk) {
      await promisify(execFile)('psql', [
        viaFiles.url,
        '-v',
        'ON_ERROR_STOP=1',
        '-q',
        '-f',
        `${sqlDir}${name}`,
      ])
    }
    // Applied twice: the second time does nothing.
    for (const name of onDisk.filter((n) => n !== 'pgsingleton_pgboss_schema.sql')) {
      await promisify(execFile)('psql', [
        viaFiles.url,
        '-v',
        'ON_ERROR_STOP=1',
        '-q',
        '-f',
        `${sqlDir}${name}`,
      ])
    }
    const viaKysely = await fresh()
    await migrateToLatest(viaKysely.pool)
    const a = await catalog(viaFiles)
    const b = await catalog(viaKysely)
    expect(a.filter((x) => !b.includes(x))).toEqual([])
    expect(b.filter((x) => !a.includes(x))).toEqual([])
  })
})
