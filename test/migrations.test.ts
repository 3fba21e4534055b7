import { Kysely, PostgresDialect } from 'kysely'
import { Migrator } from 'kysely/migration'
import pg from 'pg'
import { describe, expect, it } from 'vitest'
import * as safeDeletes from '../migrations/0002_safe_deletes.js'
import * as tasks from '../migrations/0003_tasks.js'
import {
  assertSchemaCurrent,
  createSingleton,
  lockKey,
  migrateToLatest,
  migrationFiles,
  migrationProvider,
  SCHEMA_REVISION,
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
      'pgsingleton_0004_faster_batches',
      'pgsingleton_0005_hand_over',
      'pgsingleton_0006_equal_values',
      'pgsingleton_0007_plain_bounds',
      'pgsingleton_0008_run_requests',
      'pgsingleton_0009_locked_leaves',
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

  it('run on a later revision of their schema version, which a newer pg-singleton applied', async () => {
    // What a newer pg-singleton's step that keeps the schema version leaves: a higher
    // revision, and a step this one does not know in the migration table.
    await db.pool.query('UPDATE pgsingleton.meta SET revision = $1', [SCHEMA_REVISION + 1])
    await db.pool.query(
      `INSERT INTO pgsingleton.pgsingleton_migration (name, timestamp) VALUES ('pgsingleton_9999_later', now()::text)`,
    )
    try {
      expect(await migrateToLatest(db.pool)).toMatchObject({
        applied: [],
        schemaVersion: SCHEMA_VERSION,
        revision: SCHEMA_REVISION + 1,
      })
      await expect(assertSchemaCurrent(db.pool)).resolves.toBeUndefined()
      // A step behind is another matter: this version needs its own revision.
      await db.pool.query('UPDATE pgsingleton.meta SET revision = $1', [SCHEMA_REVISION - 1])
      await expect(assertSchemaCurrent(db.pool)).rejects.toMatchObject({
        code: 'SCHEMA_NOT_MIGRATED',
        message: expect.stringMatching(
          new RegExp(
            `revision ${SCHEMA_REVISION - 1}; .* needs version ${SCHEMA_VERSION}, revision ${SCHEMA_REVISION} or later`,
          ),
        ),
      })
    } finally {
      await db.pool.query(
        `DELETE FROM pgsingleton.pgsingleton_migration WHERE name = 'pgsingleton_9999_later'`,
      )
      await db.pool.query('UPDATE pgsingleton.meta SET revision = $1', [SCHEMA_REVISION])
    }
  })

  it('steps 4, 5 and 6 keep schema 3: the same functions for older nodes, and a way back', async () => {
    // The functions a node of schema 3 calls, whose contract the steps keep.
    const signature = async (fn: string) =>
      (
        await db.pool.query<{ args: string; result: string; body: string }>(
          `SELECT pg_get_function_identity_arguments(p.oid) AS args, pg_get_function_result(p.oid) AS result,
                  p.prosrc AS body
             FROM pg_proc p WHERE p.oid = $1::regproc`,
          [fn],
        )
      ).rows[0]
    const signatures = async () => ({
      batch: await signature('pgsingleton.cleanup_batch'),
      bump: await signature('pgsingleton.bump_epoch'),
    })
    // What a node of schema 3 reads at start-up.
    const read = async () =>
      (await db.pool.query('SELECT to_jsonb(m) AS meta FROM pgsingleton.meta m')).rows[0]?.meta
    const step5 = async () =>
      (
        await db.pool.query(
          `SELECT to_regproc('pgsingleton.hand_over') IS NOT NULL AS hand_over,
                  EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'pgsingleton.nodes'::regclass
                           AND attname = 'protocol' AND NOT attisdropped) AS protocol,
                  EXISTS (SELECT FROM pg_trigger WHERE tgname = 'nodes_protocol') AS "trigger"`,
        )
      ).rows[0]
    const step8 = async () =>
      (
        await db.pool.query(
          `SELECT EXISTS (SELECT FROM pg_trigger WHERE tgname = 'policy_controls_announce') AS "trigger",
                  to_regproc('pgsingleton.announce_control') IS NOT NULL AS announce`,
        )
      ).rows[0]
    const step9 = async () =>
      (
        await db.pool.query(
          `SELECT (SELECT prosrc FROM pg_proc WHERE oid = 'pgsingleton.resolve_leaf'::regproc) LIKE '%Locked before it is judged%' AS locked,
                  (SELECT prosrc FROM pg_proc WHERE oid = 'pgsingleton.remove_partition'::regproc) LIKE '%not being detached%' AS rechecked`,
        )
      ).rows[0]
    const latest = await signatures()
    expect(await read()).toMatchObject({ schema_version: 3, revision: 9, protocol: 3 })
    expect(await step9()).toEqual({ locked: true, rechecked: true })
    expect(await step5()).toEqual({ hand_over: true, protocol: true, trigger: true })
    expect(await step8()).toEqual({ trigger: true, announce: true })
    const kysely = new Kysely<unknown>({
      dialect: new PostgresDialect({ pool: new pg.Pool({ connectionString: db.url, max: 1 }) }),
    })
    try {
      const migrator = new Migrator({
        db: kysely,
        provider: migrationProvider,
        migrationTableSchema: 'pgsingleton',
        migrationTableName: 'pgsingleton_migration',
        migrationLockTableName: 'pgsingleton_migration_lock',
      })
      expect((await migrator.migrateTo('pgsingleton_0008_run_requests')).error).toBeUndefined()
      expect(await read()).toMatchObject({ schema_version: 3, revision: 8 })
      expect(await step9()).toEqual({ locked: false, rechecked: false })
      expect(await step8()).toEqual({ trigger: true, announce: true })
      expect((await migrator.migrateTo('pgsingleton_0007_plain_bounds')).error).toBeUndefined()
      expect(await read()).toMatchObject({ schema_version: 3, revision: 7 })
      expect(await step8()).toEqual({ trigger: false, announce: false })
      expect(await signatures()).toEqual(latest)
      expect((await migrator.migrateTo('pgsingleton_0006_equal_values')).error).toBeUndefined()
      expect(await read()).toMatchObject({ schema_version: 3, revision: 6 })
      const at6 = await signatures()
      expect(at6.bump).toEqual(latest.bump)
      expect(at6.batch?.body).not.toEqual(latest.batch?.body)
      expect({ args: at6.batch?.args, result: at6.batch?.result }).toEqual({
        args: latest.batch?.args,
        result: latest.batch?.result,
      })
      expect((await migrator.migrateTo('pgsingleton_0005_hand_over')).error).toBeUndefined()
      expect(await read()).toMatchObject({ schema_version: 3, revision: 5 })
      expect(await step5()).toEqual({ hand_over: true, protocol: true, trigger: true })
      const at5 = await signatures()
      expect(at5.bump).toEqual(latest.bump)
      expect(at5.batch?.body).not.toEqual(at6.batch?.body)
      expect({ args: at5.batch?.args, result: at5.batch?.result }).toEqual({
        args: latest.batch?.args,
        result: latest.batch?.result,
      })
      expect((await migrator.migrateTo('pgsingleton_0004_faster_batches')).error).toBeUndefined()
      expect(await read()).toMatchObject({ schema_version: 3, revision: 4 })
      expect(await step5()).toEqual({ hand_over: false, protocol: false, trigger: false })
      const at4 = await signatures()
      expect(at4.batch).toEqual(at5.batch)
      expect(at4.bump?.body).not.toEqual(latest.bump?.body)
      expect((await migrator.migrateTo('pgsingleton_0003_tasks')).error).toBeUndefined()
      const before = await signatures()
      expect(await read()).toEqual({ id: true, schema_version: 3, protocol: 3 })
      expect(before.bump).toEqual(at4.bump)
      for (const fn of ['batch', 'bump'] as const) {
        expect(before[fn]?.body).not.toEqual(latest[fn]?.body)
        expect({ args: before[fn]?.args, result: before[fn]?.result }).toEqual({
          args: latest[fn]?.args,
          result: latest[fn]?.result,
        })
      }
      await expect(assertSchemaCurrent(db.pool)).rejects.toMatchObject({
        code: 'SCHEMA_NOT_MIGRATED',
      })
      expect((await migrateToLatest(db.pool)).applied).toEqual([
        'pgsingleton_0004_faster_batches',
        'pgsingleton_0005_hand_over',
        'pgsingleton_0006_equal_values',
        'pgsingleton_0007_plain_bounds',
        'pgsingleton_0008_run_requests',
        'pgsingleton_0009_locked_leaves',
      ])
      expect(await signatures()).toEqual(latest)
      expect(await read()).toMatchObject({ schema_version: 3, revision: 9 })
      expect(await step5()).toEqual({ hand_over: true, protocol: true, trigger: true })
      expect(await step8()).toEqual({ trigger: true, announce: true })
      expect(await step9()).toEqual({ locked: true, rechecked: true })
    } finally {
      await kysely.destroy()
    }
  })

  it('steps down taken by a route that knows nothing of revisions are undone by the next migration', async () => {
    // An older pg-singleton's steps 3 and 2 down (run, say, by an app's own migrator whose
    // table never saw steps 4 to 9): schema version 1, the revision step 9 left, and step
    // 2's functions gone, steps 4 to 9's with them.
    await db.pool.query(`BEGIN; ${tasks.DOWN} ${safeDeletes.DOWN} COMMIT;`)
    expect(
      (await db.pool.query('SELECT to_jsonb(m) AS meta FROM pgsingleton.meta m')).rows[0]?.meta,
    ).toMatchObject({ schema_version: 1, revision: 9 })
    // The SQL files, as any route applies them: steps 2 to 9 again.
    for (const [name, text] of Object.entries(migrationFiles()))
      if (/^pgsingleton_000\d/.test(name)) await db.pool.query(text)
    await expect(assertSchemaCurrent(db.pool)).resolves.toBeUndefined()
    const { rows } = await db.pool.query(
      `SELECT to_jsonb(m) AS meta, to_regclass('pgsingleton.terms') IS NOT NULL AS terms,
              (SELECT prosrc FROM pg_proc WHERE oid = 'pgsingleton.cleanup_batch'::regproc) LIKE '%A plain table is deleted from by page range%' AS step4,
              to_regproc('pgsingleton.hand_over') IS NOT NULL AS step5,
              (SELECT prosrc FROM pg_proc WHERE oid = 'pgsingleton.cleanup_batch'::regproc) LIKE '%More rows than the limit share one value%' AS step6,
              (SELECT prosrc FROM pg_proc WHERE oid = 'pgsingleton.cleanup_batch'::regproc) LIKE '%OFFSET $3 LIMIT 1%' AS step7,
              EXISTS (SELECT FROM pg_trigger WHERE tgname = 'policy_controls_announce') AS step8,
              (SELECT prosrc FROM pg_proc WHERE oid = 'pgsingleton.resolve_leaf'::regproc) LIKE '%Locked before it is judged%' AS step9
         FROM pgsingleton.meta m`,
    )
    expect(rows[0]).toMatchObject({
      meta: { schema_version: 3, revision: 9, protocol: 3 },
      terms: true,
      step4: true,
      step5: true,
      step6: true,
      step7: true,
      step8: true,
      step9: true,
    })
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
