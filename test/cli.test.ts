import { execFile } from 'node:child_process'
import { chmod, mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import pg from 'pg'
import { describe, expect, it } from 'vitest'
import { createEventsTable, insertRows } from './support/app-table.js'
import { createTestDatabase, useTestDatabase, waitFor } from './support/database.js'
import { BIN, failOnNodesLeftRunning, runCli, startNode, writeConfig } from './support/nodes.js'

const execFileAsync = promisify(execFile)

const db = useTestDatabase({ migrate: false })
failOnNodesLeftRunning()

async function finish(args: string[], env: Record<string, string | undefined>, cwd?: string) {
  const cli = runCli(args, env, cwd)
  const { code } = await cli.exited
  return { code, output: cli.output() }
}

describe('the pg-singleton command', () => {
  it('prints help', async () => {
    const { code, output } = await finish(['--help'], {})
    expect(code).toBe(0)
    expect(output).toMatch(/pg-singleton migrate/)
    expect(output).toMatch(/pg-singleton status \[--json\]/)
  })

  it('migrates idempotently, runs, and reports status for people and as JSON', async () => {
    const env = { DATABASE_URL: db.url }
    expect((await finish(['migrate'], env)).output).toMatch(/Applied pgsingleton_0001_initial/)
    expect((await finish(['migrate'], env)).output).toMatch(/up to date/)
    await createEventsTable(db.pool)
    await insertRows(db.pool, 42, '2 days')
    const config = await writeConfig({
      name: 'cli',
      policies: [
        {
          name: 'old',
          table: 'app.events',
          column: 'created_at',
          olderThan: '1 day',
          every: '1 minute',
        },
      ],
    })
    const node = startNode(db.url, config, 'cli-node')
    await waitFor('the first run', async () => /cleanup run done/.test(node.output()))

    const json = await finish(['status', '--json'], env)
    expect(json.code).toBe(0)
    const rows = JSON.parse(json.output)
    expect(rows).toHaveLength(1)
    expect(rows[0]).toMatchObject({
      name: 'cli',
      nodeId: 'cli-node',
      epoch: 1,
      waitingNodes: 0,
      lastRunRows: 42,
      lastRunStatus: 'done',
    })
    const human = await finish(['status'], env)
    expect(human.output).toMatch(/holder\s+cli-node \(backend \d+, epoch 1/)
    expect(human.output).toMatch(/last run\s+old done at .*, 42 rows deleted/)

    node.signal('SIGINT')
    expect((await node.exited).code).toBe(0)
    expect((await finish(['status'], env)).output).toMatch(
      /holder\s+none \(last: cli-node, epoch 1\)/,
    )
  })

  it('migrates once when ten nodes run `migrate` at the same moment', async () => {
    const fresh = await createTestDatabase({ migrate: false })
    try {
      const runs = await Promise.all(
        Array.from({ length: 10 }, () => finish(['migrate'], { DATABASE_URL: fresh.url })),
      )
      for (const run of runs) expect(run.code, run.output).toBe(0)
      expect(
        runs.filter((run) => /Applied pgsingleton_0001_initial/.test(run.output)),
      ).toHaveLength(1)
      expect(runs.filter((run) => /up to date/.test(run.output))).toHaveLength(9)
    } finally {
      await fresh.drop()
    }
  })

  it('reads DATABASE_URL from a .env file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'pg-singleton-dotenv-'))
    try {
      await writeFile(join(dir, '.env'), `DATABASE_URL=${db.url}\n`)
      const { code, output } = await finish(['status', '--json'], { DATABASE_URL: undefined }, dir)
      expect(code, output).toBe(0)
      expect(JSON.parse(output)[0].name).toBe('cli')
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('without DATABASE_URL, `migrate`, `status` and `run` start nothing and say what to set', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'pg-singleton-no-url-'))
    try {
      const config = await writeConfig({ name: 'x', policies: [] })
      for (const args of [
        ['migrate'],
        ['status'],
        ['status', '--json'],
        ['run', '--config', config],
      ]) {
        const { code, output } = await finish(args, { DATABASE_URL: undefined }, dir)
        expect(code, output).not.toBe(0)
        expect(output).toMatch(
          /DATABASE_URL is not set: .* pass --embedded\. Nothing was started\./,
        )
      }
      expect(await readdir(dir)).toEqual([]) // no .pg-singleton, no data directory
    } finally {
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('runs the demo of the README in a new project: three nodes, the holder killed, every outdated row deleted and every young one kept', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'pg-singleton-demo-'))
    await chmod(dir, 0o755) // as root, the server runs as the postgres user, who must reach the project
    const env = {
      DATABASE_URL: undefined,
      PG_SINGLETON_EMBEDDED_PORT: String(32000 + Math.floor(Math.random() * 700)),
    }
    try {
      const demo = await finish(['demo'], env, dir)
      expect(demo.code, demo.output).toBe(0)
      expect(demo.output).toMatch(
        /demo\.events: 20000 rows, 10000 of them older than 5 minutes .*10000 written in the last 20 seconds/,
      )
      expect(demo.output).toMatch(
        /Holder: demo-node-\d\. The other two wait inside pg_advisory_lock\./,
      )
      expect(demo.output).toMatch(/kill -9 demo-node-\d \(pid \d+\)/)
      expect(demo.output).toMatch(/demo-node-\d took over with epoch 2 after \d+ ms/)
      expect(demo.output).toMatch(
        /Left in demo\.events: 10000 of the 10000 young rows, 0 of the 15000 outdated ones\./,
      )
      // What the database recorded, read after the demo, on the server it left running.
      // The URL alone on stdout (what the server is doing goes to stderr), for scripts.
      const { stdout: url } = await execFileAsync(process.execPath, [BIN, 'embedded', 'url'], {
        cwd: dir,
        env: { ...process.env, ...env },
      })
      expect(url).toMatch(/^postgres:\/\/\S+\n$/)
      const client = new pg.Client({ connectionString: url.trim() })
      await client.connect()
      try {
        const runs = await client.query(
          `SELECT coalesce(sum(rows_deleted), 0)::int AS deleted, count(*) FILTER (WHERE status <> 'done')::int AS not_done
             FROM pgsingleton.cleanup_runs WHERE singleton = 'demo-cleaner'`,
        )
        expect(runs.rows[0]).toEqual({ deleted: 15000, not_done: 0 })
        const terms = await client.query(
          `SELECT epoch::int, end_reason FROM pgsingleton.terms WHERE name = 'demo-cleaner' ORDER BY epoch LIMIT 2`,
        )
        // The killed holder's term was closed by its successor as lost; the successor's ended
        // when the demo stopped the nodes.
        expect(terms.rows).toEqual([
          { epoch: 1, end_reason: 'lost' },
          { epoch: 2, end_reason: 'released' },
        ])
        const left = await client.query(
          `SELECT payload, count(*)::int AS n FROM demo.events GROUP BY payload ORDER BY payload`,
        )
        expect(left.rows).toEqual([{ payload: 'young', n: 10000 }])
      } finally {
        await client.end()
      }
    } finally {
      const stop = await finish(['embedded', 'stop'], env, dir)
      expect(stop.output).toMatch(/Stopped the embedded PostgreSQL/)
      await rm(dir, { recursive: true, force: true })
    }
  })

  it('with --embedded, starts an embedded PostgreSQL under the project, however long its path, says so, and migrates it', async () => {
    // Deeper than a Unix socket path may be (107 bytes): the server listens on TCP only.
    const base = await mkdtemp(join(tmpdir(), 'pg-singleton-embedded-'))
    const dir = join(base, 'a-project-folder-with-a-long-name', 'x'.repeat(60), 'y'.repeat(40))
    await mkdir(dir, { recursive: true })
    for (let p = dir; p.startsWith(base); p = join(p, '..')) await chmod(p, 0o755) // as root, the server runs as the postgres user, who must reach the project
    const env = {
      DATABASE_URL: undefined,
      // Below the kernel's ephemeral ports (32768 to 60999), which any outgoing connection may hold.
      PG_SINGLETON_EMBEDDED_PORT: String(30000 + Math.floor(Math.random() * 2000)),
    }
    expect(dir.length).toBeGreaterThan(150)
    try {
      const first = await finish(['migrate', '--embedded'], env, dir)
      expect(first.code, first.output).toBe(0)
      expect(first.output).toMatch(
        /Embedded PostgreSQL: started the one on 127\.0\.0\.1:\d+ \(data in .*\.pg-singleton\/pgdata\)/,
      )
      expect(first.output).toMatch(/up to date/) // resolving the connection already migrated it
      const second = await finish(['status', '--embedded'], env, dir)
      expect(second.output).toMatch(/Embedded PostgreSQL: using the one/)
      expect(second.output).toMatch(/No singleton has run against this database yet/)
      const url = await finish(['embedded', 'url'], env, dir)
      expect(url.output).toMatch(/postgres:\/\/postgres:.*@127\.0\.0\.1:\d+\/postgres/)
    } finally {
      const stop = await finish(['embedded', 'stop'], env, dir)
      expect(stop.output).toMatch(/Stopped the embedded PostgreSQL/)
      await rm(base, { recursive: true, force: true })
    }
  })
})
