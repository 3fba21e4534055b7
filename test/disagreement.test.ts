import { describe, expect, it } from 'vitest'
import { readPolicyStatus } from '../src/status/read-policy-status.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, runCli, startNode, writeConfig } from './support/nodes.js'

const db = useTestDatabase({
  setup: async ({ pool }) => {
    await pool.query(`CREATE SCHEMA app;
      CREATE TABLE app.events (id serial PRIMARY KEY, created_at timestamptz NOT NULL, age text);
      CREATE INDEX ON app.events (created_at);`)
  },
})
failOnNodesLeftRunning()

const policy = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '30 days',
  every: '1 second',
}

async function seed(): Promise<void> {
  await db.pool.query(`TRUNCATE app.events;
    INSERT INTO app.events (created_at, age) SELECT now() - interval '2 days', '2 days' FROM generate_series(1, 100);
    INSERT INTO app.events (created_at, age) SELECT now() - interval '40 days', '40 days' FROM generate_series(1, 100);`)
}

async function ages(): Promise<Record<string, number>> {
  const { rows } = await db.pool.query(
    'SELECT age, count(*)::int AS n FROM app.events GROUP BY age ORDER BY age',
  )
  return Object.fromEntries(rows.map((r) => [r.age, r.n]))
}

function cli(args: string[]) {
  const node = runCli(args, { DATABASE_URL: db.url })
  return node.exited.then(({ code }) => ({ code, output: node.output() }))
}

describe('nodes that disagree on a policy', () => {
  it('hold it back, say so in SQL and in `status`, and once the odd node is gone the remaining definition applies', async () => {
    await seed()
    const keep = await writeConfig({ name: 'dis', policies: [policy] })
    const eager = await writeConfig({ name: 'dis', policies: [{ ...policy, olderThan: '1 day' }] })
    const a = startNode(db.url, keep, 'dis-a')
    await waitFor('node a to hold', async () => /holding the singleton/.test(a.output()))
    // a alone agrees with itself: the 40-day-old rows go at once.
    await waitFor('a first clean', async () => (await ages())['40 days'] === undefined)
    const b = startNode(db.url, eager, 'dis-b')
    const status = await waitFor('the disagreement to show', async () => {
      const [row] = await readPolicyStatus(db.pool, 'dis')
      return row?.agreement === 'disagree' ? row : undefined
    })
    // Outdated by both definitions, and still held back while they disagree. (Inserted only
    // now: before b registered, a alone agreed with itself and would rightly delete them.)
    await db.pool.query(
      `INSERT INTO app.events (created_at, age) SELECT now() - interval '40 days', '40 days' FROM generate_series(1, 100)`,
    )
    expect(status.definition).toBeNull()
    expect(
      status.nodeDefinitions?.map((n) => [
        n.nodeId,
        (n.definition as { olderThan?: string } | null)?.olderThan,
      ]),
    ).toEqual([
      ['dis-a', '30 days'],
      ['dis-b', '1 day'],
    ])
    await waitFor('the holder to say it holds the policy back', async () =>
      /POLICY_DISAGREEMENT|hold different definitions of "old-events"/.test(
        a.output() + b.output(),
      ),
    )
    // Held back: whoever holds, nothing of either definition is deleted while they disagree.
    const runsBefore = await db.pool.query(
      `SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs WHERE singleton = 'dis'`,
    )
    await new Promise((resolve) => setTimeout(resolve, 3000))
    expect(await ages()).toEqual({ '2 days': 100, '40 days': 100 })
    const runsAfter = await db.pool.query(
      `SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs WHERE singleton = 'dis' AND status = 'done'`,
    )
    expect(runsAfter.rows[0].n).toBeLessThanOrEqual(runsBefore.rows[0].n)

    const human = await cli(['status', '--name', 'dis'])
    expect(human.code).toBe(0)
    expect(human.output).toMatch(
      /policy\s+old-events: DISAGREE: held back until every live node holds the same definition/,
    )
    expect(human.output).toMatch(/dis-b: differs from dis-a in olderThan "1 day" vs "30 days"/)
    const json = await cli(['status', '--json', '--name', 'dis'])
    const [singleton] = JSON.parse(json.output)
    expect(singleton.policies[0]).toMatchObject({
      policy: 'old-events',
      agreement: 'disagree',
      nodeDefinitions: [
        { nodeId: 'dis-a', definition: { olderThan: '30 days' } },
        { nodeId: 'dis-b', definition: { olderThan: '1 day' } },
      ],
    })

    // The node with the odd definition leaves (a rolling deploy rolled back): a's applies.
    b.signal('SIGTERM')
    expect((await b.exited).code).toBe(0)
    await waitFor(
      'the remaining definition to apply',
      async () => (await ages())['40 days'] === undefined,
    )
    expect(await ages()).toEqual({ '2 days': 100 })
    const [after] = await readPolicyStatus(db.pool, 'dis')
    expect(after).toMatchObject({ agreement: 'agree', definition: { olderThan: '30 days' } })
    a.signal('SIGTERM')
    expect((await a.exited).code).toBe(0)
  })

  it('a node that joins with another definition stops a run in flight at its next batch', async () => {
    await db.pool.query(`TRUNCATE app.events;
      INSERT INTO app.events (created_at, age) SELECT now() - interval '40 days', '40 days' FROM generate_series(1, 3000);`)
    const slow = { ...policy, batchSize: 10, every: '1 hour' }
    const a = startNode(
      db.url,
      await writeConfig({ name: 'dis2', policies: [slow], batchPauseMs: 100 }),
      'dis2-a',
    )
    const run = await waitFor('a run with a few batches', async () => {
      const { rows } = await db.pool.query(
        `SELECT id FROM pgsingleton.cleanup_runs WHERE singleton = 'dis2' AND status = 'running' AND batches >= 3`,
      )
      return rows[0]
    })
    const b = startNode(
      db.url,
      await writeConfig({ name: 'dis2', policies: [{ ...slow, olderThan: '60 days' }] }),
      'dis2-b',
    )
    const fenced = await waitFor('the run to stop', async () => {
      const { rows } = await db.pool.query(
        `SELECT status, error, batches FROM pgsingleton.cleanup_runs WHERE id = $1 AND status <> 'running'`,
        [run.id],
      )
      return rows[0]
    })
    expect(fenced).toMatchObject({
      status: 'fenced',
      error: expect.stringMatching(/no longer all hold this definition/),
    })
    // Batches after b's registration: at most the one that was in flight as it committed.
    const { rows: late } = await db.pool.query(
      `SELECT count(*)::int AS n FROM pgsingleton.cleanup_batches
        WHERE run_id = $1 AND began_at > (SELECT registered_at FROM pgsingleton.nodes WHERE singleton = 'dis2' AND node_id = 'dis2-b')`,
      [run.id],
    )
    expect(late[0].n).toBeLessThanOrEqual(1)
    const left = (await ages())['40 days'] ?? 0
    expect(left).toBeGreaterThan(0)
    await new Promise((resolve) => setTimeout(resolve, 1500))
    expect((await ages())['40 days']).toBe(left)
    for (const node of [a, b]) node.signal('SIGTERM')
    for (const node of [a, b]) expect((await node.exited).code).toBe(0)
  })
})
