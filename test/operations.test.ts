import { describe, expect, it } from 'vitest'
import { readPolicyStatus } from '../src/status/read-policy-status.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, runCli, startNode, writeConfig } from './support/nodes.js'

const db = useTestDatabase({
  setup: async ({ pool }) => {
    await pool.query(`CREATE SCHEMA app;
      CREATE TABLE app.events (id serial PRIMARY KEY, created_at timestamptz NOT NULL);
      CREATE INDEX ON app.events (created_at);
      CREATE TABLE app.metrics (at timestamp NOT NULL) PARTITION BY RANGE (at);
      CREATE TABLE app.metrics_a PARTITION OF app.metrics FOR VALUES FROM ('2000-01-01') TO ('2025-01-01');
      CREATE TABLE app.metrics_b PARTITION OF app.metrics FOR VALUES FROM ('2025-01-01') TO ('2100-01-01');`)
  },
})
failOnNodesLeftRunning()

const events = {
  name: 'events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 day',
  every: '1 hour',
}

async function cli(args: string[], env: Record<string, string | undefined> = {}) {
  const node = runCli(args, { DATABASE_URL: db.url, ...env })
  const { code } = await node.exited
  return { code, output: node.output() }
}

async function count(where = 'true'): Promise<number> {
  const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM app.events WHERE ${where}`)
  return rows[0].n
}

async function seed(old: number, young = 10): Promise<void> {
  await db.pool.query('TRUNCATE app.events')
  await db.pool.query(
    `INSERT INTO app.events (created_at) SELECT now() - interval '3 days' - g * interval '1 minute' FROM generate_series(1, $1) g`,
    [old],
  )
  await db.pool.query(
    `INSERT INTO app.events (created_at) SELECT now() - interval '1 hour' FROM generate_series(1, $1)`,
    [young],
  )
}

describe('operators: plan, pause, resume, run-now, forget, policy_status', () => {
  it('plan counts exactly what each policy would delete, table by table, says how, and deletes nothing', async () => {
    await seed(1234, 20_000) // a small share outdated: the planner walks the index
    await db.pool.query(`INSERT INTO app.metrics SELECT '2020-06-01'::timestamp + g * interval '1 hour' FROM generate_series(1, 300) g;
      INSERT INTO app.metrics SELECT (now() AT TIME ZONE 'UTC') - interval '10 days' FROM generate_series(1, 70);
      INSERT INTO app.metrics SELECT (now() AT TIME ZONE 'UTC') - interval '1 hour' FROM generate_series(1, 5);
      ANALYZE app.events;`)
    const config = await writeConfig({
      name: 'ops-plan',
      policies: [
        events,
        {
          name: 'metrics',
          table: 'app.metrics',
          column: 'at',
          timeZone: 'UTC',
          olderThan: '7 days',
          every: '1 hour',
        },
      ],
    })
    const json = await cli(['plan', '--config', config, '--json'])
    expect(json.code, json.output).toBe(0)
    const { plans } = JSON.parse(json.output.slice(json.output.indexOf('{')))
    expect(plans[0]).toMatchObject({ policy: 'events', outdated: 1234 })
    expect(plans[0].tables[0]).toMatchObject({
      relation: 'app.events',
      strategy: 'index',
      access: expect.stringMatching(/Index Scan on events_created_at_idx/),
    })
    expect(plans[1]).toMatchObject({ policy: 'metrics', outdated: 370 })
    expect(plans[1].tables).toMatchObject([
      { relation: 'app.metrics_a', outdated: 300, strategy: 'tidrange', access: 'Tid Range Scan' },
      { relation: 'app.metrics_b', outdated: 70 },
    ])
    const human = await cli(['plan', '--config', config])
    expect(human.output).toMatch(
      /policy "events": delete rows of "app"\."events" whose "created_at" .* cut-off now/,
    )
    expect(human.output).toMatch(
      /app\.events: 1,234 outdated rows, the oldest .*; batches walk it in column order \(Index Scan on events_created_at_idx\)/,
    )
    expect(human.output).toMatch(/in all: 370 rows/)
    expect(await count()).toBe(21_234)
  })

  it('pause before any node ran the policy, then resume: the holder honours both', async () => {
    await seed(200)
    const paused = await cli(['pause', 'events', '--name', 'ops-pause'])
    expect(paused.code, paused.output).toBe(0)
    const config = await writeConfig({
      name: 'ops-pause',
      policies: [{ ...events, every: '1 second' }],
    })
    const node = startNode(db.url, config, 'ops-pause-node')
    await waitFor('the node to hold', async () => /holding the singleton/.test(node.output()))
    await new Promise((resolve) => setTimeout(resolve, 2000))
    expect(await count()).toBe(210) // paused: nothing ran
    const [status] = await readPolicyStatus(db.pool, 'ops-pause')
    expect(status).toMatchObject({ paused: true, agreement: 'agree', overdue: false })
    expect((await cli(['status', '--name', 'ops-pause'])).output).toMatch(/policy\s+events: PAUSED/)
    expect((await cli(['run-now', 'events', '--name', 'ops-pause'])).output).toMatch(
      /is paused; resume it first/,
    )

    expect((await cli(['resume', 'events', '--name', 'ops-pause'])).code).toBe(0)
    await waitFor('the resumed policy to clean', async () => (await count()) === 10)
    node.signal('SIGTERM')
    expect((await node.exited).code).toBe(0)
  })

  it('run-now with a node running runs the policy outside its schedule; pause stops a run in flight at its next batch', async () => {
    await seed(0)
    const config = await writeConfig({
      name: 'ops-now',
      batchPauseMs: 100,
      policies: [{ ...events, every: '1 hour', batchSize: 20 }],
    })
    const node = startNode(db.url, config, 'ops-now-node')
    await waitFor('the first (empty) run', async () => /cleanup run done/.test(node.output()))
    await seed(800)
    // Scheduled next in an hour: only run-now brings it forward.
    const now = await cli(['run-now', 'events', '--config', config])
    expect(now.code, now.output).toBe(0)
    await waitFor('a batch of the requested run', async () => (await count()) < 800, 10_000)

    expect((await cli(['pause', 'events', '--config', config])).code).toBe(0)
    const stopped = await waitFor('the run in flight to stop', async () => {
      const { rows } = await db.pool.query(
        `SELECT status, error FROM pgsingleton.cleanup_runs WHERE singleton = 'ops-now' AND status = 'fenced'`,
      )
      return rows[0]
    })
    expect(stopped.error).toMatch(/was paused/)
    const left = await count()
    expect(left).toBeGreaterThan(10)
    await new Promise((resolve) => setTimeout(resolve, 1000))
    expect(await count()).toBe(left)

    expect((await cli(['resume', 'events', '--config', config])).code).toBe(0)
    await waitFor(
      'the occurrence to be finished after resume',
      async () => (await count()) === 10,
      30_000,
    )
    const [status] = await readPolicyStatus(db.pool, 'ops-now')
    expect(status).toMatchObject({ paused: false, lastStatus: 'done', rowsDeleted24h: 800 })
    expect(status?.lastSuccessAt).toBeInstanceOf(Date)
    node.signal('SIGTERM')
    expect((await node.exited).code).toBe(0)
  })

  it('a policy with no success for over twice its interval is overdue', async () => {
    await db.pool.query(
      `INSERT INTO pgsingleton.schedules (singleton, policy, every, next_run_at, updated_epoch, created_at)
       VALUES ('ops-overdue', 'late', '1 minute', now(), 1, now() - interval '3 minutes'),
              ('ops-overdue', 'fresh', '1 minute', now(), 1, now() - interval '1 minute')`,
    )
    const rows = await readPolicyStatus(db.pool, 'ops-overdue')
    expect(rows.map((r) => [r.policy, r.overdue])).toEqual([
      ['fresh', false],
      ['late', true],
    ])
    expect((await cli(['status', '--name', 'ops-overdue'])).output).toMatch(/late: .*OVERDUE/)
  })

  it('forget is refused while a node of the singleton lives, and removes every record of it after', async () => {
    const config = await writeConfig({ name: 'ops-forget', policies: [events] })
    const node = startNode(db.url, config, 'ops-forget-node')
    await waitFor('the first run', async () => /cleanup run done/.test(node.output()))
    const refused = await cli(['forget', '--name', 'ops-forget'])
    expect(refused.code).toBe(1)
    expect(refused.output).toMatch(/still has live nodes \(ops-forget-node\)/)
    node.signal('SIGTERM')
    expect((await node.exited).code).toBe(0)
    const forgotten = await cli(['forget', '--config', config])
    expect(forgotten.code, forgotten.output).toBe(0)
    const { rows } = await db.pool.query(
      `SELECT (SELECT count(*) FROM pgsingleton.leases WHERE name = 'ops-forget')
            + (SELECT count(*) FROM pgsingleton.cleanup_runs WHERE singleton = 'ops-forget')
            + (SELECT count(*) FROM pgsingleton.schedules WHERE singleton = 'ops-forget')
            + (SELECT count(*) FROM pgsingleton.nodes WHERE singleton = 'ops-forget') AS n`,
    )
    expect(Number(rows[0].n)).toBe(0)
  })

  it('status --watch redraws until Ctrl-C', async () => {
    const watcher = runCli(['status', '--watch'], { DATABASE_URL: db.url })
    await waitFor(
      'two frames',
      async () => (watcher.output().match(/Ctrl-C to stop/g) ?? []).length >= 2,
      10_000,
    )
    watcher.signal('SIGINT')
    expect((await watcher.exited).code).toBe(0)
  })
})
