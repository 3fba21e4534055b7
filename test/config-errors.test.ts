import { writeFile } from 'node:fs/promises'
import { beforeAll, describe, expect, it } from 'vitest'
import { countRows, createEventsTable, insertRows } from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, startNode, writeConfig } from './support/nodes.js'

const good = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 hour',
  every: '1 second',
}
const db = useTestDatabase({
  async setup({ pool }) {
    await createEventsTable(pool)
    await pool.query('CREATE VIEW app.events_view AS SELECT * FROM app.events')
    await pool.query(
      'CREATE TABLE app.sessions (id int, created_at timestamptz, created_on date, created_local timestamp)',
    )
  },
})
failOnNodesLeftRunning()

/** Starts a node with this config and expects it to refuse, printing `message`. */
async function refuses(config: object | string, message: RegExp): Promise<void> {
  const path = typeof config === 'string' ? await writeConfig({}) : await writeConfig(config)
  if (typeof config === 'string') await writeFile(path, config)
  const node = startNode(db.url, path, `bad-${Math.random().toString(36).slice(2, 8)}`)
  const { code } = await node.exited
  expect(code, node.output()).toBe(1)
  expect(node.output()).toMatch(message)
}

describe('a bad configuration fails at start-up, names what is wrong, and deletes nothing', () => {
  beforeAll(async () => {
    await insertRows(db.pool, 500, '2 days')
  })

  it.each([
    [
      'a table that does not exist',
      { table: 'app.nope' },
      /policy "p", field table: "app\.nope" names no table.*\[INVALID_POLICY\]/,
    ],
    [
      'a table named in the wrong case',
      { table: 'app.Events' },
      /field table: "app\.Events" names no table \(looked for table "Events" in schema "app"/,
    ],
    [
      'a hostile identifier',
      { table: 'app.events"; DROP TABLE app.events; --' },
      /field table: "app\.events"; DROP TABLE app\.events; --" names no table/,
    ],
    ['a view', { table: 'app.events_view' }, /"app\.events_view" is not a table/],
    [
      'a column that does not exist',
      { column: 'nope' },
      /policy "p", field column: table "app\.events" has no column "nope"/,
    ],
    [
      'a column that holds no time',
      { column: 'payload' },
      /policy "p", field column: "payload" is text; it must be timestamptz, timestamp or date/,
    ],
    [
      'an interval that does not parse',
      { olderThan: '30 dayz' },
      /policy "p", field olderThan: "30 dayz" is refused: "30 dayz" is not a "<number> <unit>" term; write one or more "<number> <unit>" terms/,
    ],
    [
      'a negative interval',
      { olderThan: '-1 day' },
      /policy "p", field olderThan: "-1 day" is refused: signs are refused: every term must be positive/,
    ],
    [
      'an interval so long that the cut-off is outside the range of a timestamp',
      { olderThan: '300000 years' },
      /policy "p", field olderThan: "300000 years" is too long: now\(\) minus or plus it is outside the range of a PostgreSQL timestamp/,
    ],
    [
      'a schedule faster than a second',
      { every: '0.5 seconds' },
      /policy "p", field every: "0\.5 seconds" must be a positive interval of at least 1 second/,
    ],
    [
      'a unit PostgreSQL reads but pg-singleton does not accept',
      { every: '10 milliseconds' },
      /policy "p", field every: "10 milliseconds" is refused: "10 milliseconds" is not a "<number> <unit>" term/,
    ],
    [
      'a batch size that is not a number',
      { batchSize: 'lots' },
      /policy "p", field batchSize: "lots" is not an integer from 1 to 100000/,
    ],
    ['a misspelled field', { olderthan: '1 day' }, /policies\[0\]\.olderthan: unknown field/],
  ])('%s', async (_, patch, message) => {
    await refuses({ name: 'bad', policies: [{ ...good, name: 'p', ...patch }] }, message)
    expect(await countRows(db.pool, 'true')).toBe(500)
  })

  it('one bad policy stops the node before the good ones delete anything', async () => {
    await refuses(
      { name: 'bad', policies: [good, { ...good, name: 'p', column: 'nope' }] },
      /policy "p", field column/,
    )
    expect(await countRows(db.pool, 'true')).toBe(500)
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs')
    expect(rows[0].n).toBe(0)
  })

  it('refuses a config file that is not JSON, has unknown keys, or unsafe timings', async () => {
    await refuses('{ "name": "x", ', /config file .*: not valid JSON/)
    await refuses({ name: 'x', policies: [good], heartbeat: 5 }, /unknown key "heartbeat"/)
    await refuses(
      { name: 'x', policies: [good], fenceAfterMs: 5000 },
      /fenceAfterMs \(5000\) \+ heartbeatMs \(1000\) must not exceed idleSessionTimeoutMs \(3000\)/,
    )
    expect(await countRows(db.pool, 'true')).toBe(500)
  })

  it('accepts timestamp, date and timestamptz columns', async () => {
    const { createSingleton } = await import('../src/index.js')
    for (const column of ['created_at', 'created_on', 'created_local']) {
      const node = createSingleton({
        name: `types-${column.replace('_', '-')}`,
        connectionString: db.url,
        policies: [{ ...good, table: 'app.sessions', column, timeZone: 'UTC' }],
      })
      await node.start()
      await node.stop()
    }
  })

  it('warns at start-up, and still runs, when no index starts with the column', async () => {
    const config = await writeConfig({
      name: 'unindexed',
      policies: [{ ...good, table: 'app.sessions', column: 'created_at' }],
    })
    const node = startNode(db.url, config, 'unindexed-node')
    await waitFor('the warning', async () => /holding the singleton/.test(node.output()))
    expect(node.output()).toMatch(
      /WARN .*policy "old-events": no index starts with column "created_at" of "app\.sessions"; each run reads the whole table\. Consider CREATE INDEX ON "app"\."sessions" \("created_at"\)/,
    )
    node.signal('SIGTERM')
    expect((await node.exited).code).toBe(0)
  })
})
