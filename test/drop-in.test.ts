import { execFile } from 'node:child_process'
import { once } from 'node:events'
import { cp, mkdir, mkdtemp, readdir, rm, symlink, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { describe, expect, it } from 'vitest'
import { createSingleton, type RunReport, type SingletonWarning } from '../src/index.js'
import { createEventsTable, insertRows } from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'

const root = fileURLToPath(new URL('..', import.meta.url))
const db = useTestDatabase({
  setup: async ({ pool }) => {
    await createEventsTable(pool)
    await pool.query('CREATE TABLE app.unindexed (at timestamptz NOT NULL)')
  },
})

describe('pg-singleton inside an app that already exists', () => {
  it('refuses, at start(), a pg-boss outside the supported range, naming the version found and the range', async () => {
    // An app whose node_modules hold pg-boss 11 next to pg-singleton (as `npm install
    // --legacy-peer-deps` would leave it): pg-singleton uses the app's copy.
    const app = await mkdtemp(join(tmpdir(), 'pg-singleton-app-'))
    try {
      const modules = join(app, 'node_modules')
      await mkdir(join(modules, 'pg-singleton'), { recursive: true })
      for (const part of ['package.json', 'dist', 'bin'])
        await cp(join(root, part), join(modules, 'pg-singleton', part), { recursive: true })
      await mkdir(join(modules, 'pg-boss'))
      await writeFile(
        join(modules, 'pg-boss', 'package.json'),
        JSON.stringify({ name: 'pg-boss', version: '11.1.2', type: 'module', main: 'index.js' }),
      )
      await writeFile(join(modules, 'pg-boss', 'index.js'), 'export class PgBoss {}\n')
      for (const name of await readdir(join(root, 'node_modules'))) {
        if (name === 'pg-boss' || name.startsWith('.')) continue
        await symlink(join(root, 'node_modules', name), join(modules, name)).catch(() => {})
      }
      await writeFile(join(app, 'package.json'), JSON.stringify({ type: 'module' }))
      const script = `
        import { createSingleton } from 'pg-singleton'
        const node = createSingleton({ name: 'x', connectionString: process.env.DATABASE_URL,
          policies: [{ name: 'p', table: 'app.events', column: 'created_at', olderThan: '1 day', every: '1 hour' }] })
        try { await node.start(); console.log(JSON.stringify({ started: true })) }
        catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })) }`
      await writeFile(join(app, 'app.js'), script)
      const { stdout } = await promisify(execFile)(process.execPath, ['app.js'], {
        cwd: app,
        env: { ...process.env, DATABASE_URL: db.url },
      })
      const result = JSON.parse(stdout)
      expect(result.code).toBe('UNSUPPORTED_DEPENDENCY')
      expect(result.message).toMatch(
        /pg-singleton supports pg-boss >=12\.38\.0 <13, but pg-boss 11\.1\.2 is installed \(.*node_modules\/pg-boss\/package\.json\)\. Install a supported version in your app \(npm install pg-boss@12\)/,
      )
    } finally {
      await rm(app, { recursive: true, force: true })
    }
  })

  it('a stop in the middle of a run is not an error: the run waits for a retry, and no error event fires', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 3000, '2 days')
    const node = createSingleton({
      name: 'drop-in-stop',
      connectionString: db.url,
      batchPauseMs: 50,
      policies: [
        {
          name: 'p',
          table: 'app.events',
          column: 'created_at',
          olderThan: '1 day',
          every: '1 hour',
          batchSize: 50,
        },
      ],
    })
    const errors: Error[] = []
    node.on('error', (error) => errors.push(error))
    const reports: RunReport[] = []
    node.on('cleanup:done', (report) => reports.push(report))
    await node.start()
    await waitFor('a few batches', async () => {
      const { rows } = await db.pool.query(
        `SELECT batches FROM pgsingleton.cleanup_runs WHERE singleton = 'drop-in-stop' AND status = 'running'`,
      )
      return rows[0]?.batches >= 3
    })
    await node.stop()
    expect(errors).toEqual([])
    expect(reports).toMatchObject([{ status: 'failed', interrupted: true }])
    const { rows } = await db.pool.query(
      `SELECT status, failures FROM pgsingleton.cleanup_runs WHERE singleton = 'drop-in-stop'`,
    )
    expect(rows).toEqual([{ status: 'failed', failures: 0 }])
  })

  it('lockConnectionString: the lock session connects there, the pool where the app says', async () => {
    const role = `locker_${Math.random().toString(36).slice(2, 8)}`
    await db.pool.query(`CREATE ROLE ${role} LOGIN SUPERUSER PASSWORD 'x'`)
    try {
      const lockUrl = new URL(db.url)
      lockUrl.username = role
      lockUrl.password = 'x'
      const node = createSingleton({
        name: 'drop-in-lock-url',
        nodeId: 'lock-url-node',
        connectionString: db.url,
        lockConnectionString: lockUrl.toString(),
        policies: [
          {
            name: 'p',
            table: 'app.events',
            column: 'created_at',
            olderThan: '1 day',
            every: '1 hour',
          },
        ],
      })
      const acquired = once(node, 'lock:acquired')
      await node.start()
      await acquired
      const { rows } = await db.pool.query(
        `SELECT application_name, usename FROM pg_stat_activity
          WHERE application_name LIKE 'lock-url-node%' ORDER BY application_name`,
      )
      expect(rows.find((r) => r.application_name === 'lock-url-node')?.usename).toBe(role)
      expect(
        rows.filter((r) => r.application_name !== 'lock-url-node').every((r) => r.usename !== role),
      ).toBe(true)
      expect(await node.whereis()).toBe('lock-url-node')
      await node.stop()
    } finally {
      await db.pool.query(`DROP ROLE ${role}`)
    }
  })

  it('prints a warning to the console when the app gave neither a logger nor a listener, and not otherwise', async () => {
    const policies = [
      { name: 'p', table: 'app.unindexed', column: 'at', olderThan: '1 day', every: '1 hour' },
    ]
    const printed: Error[] = []
    const onWarning = (warning: Error) => printed.push(warning)
    process.on('warning', onWarning)
    try {
      const quiet = createSingleton({ name: 'drop-in-warn', connectionString: db.url, policies })
      await quiet.start()
      await quiet.stop()
      await waitFor('the printed warning', async () => printed.length > 0)
      expect(printed[0]).toMatchObject({
        name: 'PgSingletonWarning',
        code: 'UNINDEXED_COLUMN',
        message: expect.stringMatching(/no index starts with column "at"/),
      })

      printed.length = 0
      const heard: SingletonWarning[] = []
      const listened = createSingleton({ name: 'drop-in-warn', connectionString: db.url, policies })
      listened.on('warning', (warning) => heard.push(warning))
      const acquired = once(listened, 'lock:acquired')
      await listened.start()
      await acquired
      await listened.stop()
      expect(heard.map((w) => w.code)).toEqual(['UNINDEXED_COLUMN'])
      await new Promise((resolve) => setImmediate(resolve))
      expect(printed).toEqual([])
    } finally {
      process.off('warning', onWarning)
    }
  })
})
