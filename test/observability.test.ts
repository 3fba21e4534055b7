/**
 * What operators watch: the Prometheus metrics a CLI node serves, and the dashboard seen in
 * a real browser (Debian's Chromium, driven by playwright-core), both across a kill -9 of
 * the holder.
 */
import { writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'
import { describe, expect, it } from 'vitest'
import { insertRows, statusOf } from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import {
  failOnNodesLeftRunning,
  type NodeProcess,
  runCli,
  startNode,
  stopAll,
  writeConfig,
} from './support/nodes.js'

const db = useTestDatabase({
  setup: async ({ pool }) => {
    await pool.query(`CREATE SCHEMA IF NOT EXISTS app;
      CREATE TABLE app.seen (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
      CREATE INDEX ON app.seen (created_at);`)
  },
})
failOnNodesLeftRunning()

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'
const TIMING = { heartbeatMs: 200, fenceAfterMs: 600, idleSessionTimeoutMs: 1000 }

async function freePort(): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  await new Promise((resolve) => server.close(resolve))
  return port
}

/** A task module that does nothing but succeed. */
async function beatModule(): Promise<string> {
  const path = join(tmpdir(), `pg-singleton-beat-${process.pid}.mjs`)
  await writeFile(path, 'export default async function () {}\n')
  return path
}

async function config(name: string): Promise<string> {
  return writeConfig({
    name,
    policies: [
      {
        name: 'old-seen',
        table: 'app.seen',
        column: 'created_at',
        olderThan: '1 hour',
        every: '1 second',
        batchSize: 100,
      },
    ],
    tasks: [{ name: 'beat', module: await beatModule(), every: '1 second' }],
    ...TIMING,
  })
}

/** The value of the first sample of `metric` whose labels include every one of `labels`. */
function sample(
  text: string,
  metric: string,
  labels: Record<string, string> = {},
): number | undefined {
  for (const line of text.split('\n')) {
    const match = /^([a-z_]+)(?:\{([^}]*)\})? (\S+)/.exec(line)
    if (!match || match[1] !== metric) continue
    const have = Object.fromEntries(
      [...(match[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((m) => [m[1], m[2]]),
    )
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(match[3])
  }
  return undefined
}

async function scrape(port: number): Promise<string> {
  const response = await fetch(`http://127.0.0.1:${port}/metrics`)
  expect(response.status).toBe(200)
  return response.text()
}

describe('observability', () => {
  it('each node serves Prometheus metrics: who holds, rows deleted, task runs, success age; after a kill -9 the standby reports the holdership', async () => {
    const name = 'metrics-1'
    await insertRows(db.pool, 500, '2 hours', 'app.seen')
    await insertRows(db.pool, 50, '10 minutes', 'app.seen')
    const file = await config(name)
    const ports = [await freePort(), await freePort()]
    const nodes = ports.map((port, i) =>
      runCli(
        ['run', '--config', file, '--node-id', `${name}-${i}`, '--metrics-port', String(port)],
        {
          DATABASE_URL: db.url,
        },
      ),
    )
    try {
      const first = await waitFor('a holder and a standby', async () => {
        const row = await statusOf(db.pool, name)
        return row?.nodeId && row.waitingNodes === 1 ? row : undefined
      })
      const h = nodes.findIndex((n) => n.id === first.nodeId)
      const s = 1 - h
      const holderPort = ports[h] as number
      const standbyPort = ports[s] as number

      const text = await waitFor(
        'the holder to report 500 rows deleted and a done task run',
        async () => {
          const t = await scrape(holderPort)
          return sample(t, 'pgsingleton_rows_deleted_total', { policy: 'old-seen' }) === 500 &&
            (sample(t, 'pgsingleton_task_runs_total', { task: 'beat', status: 'done' }) ?? 0) >= 1
            ? t
            : undefined
        },
        30_000,
      )
      const me = { singleton: name, node: first.nodeId as string }
      expect(sample(text, 'pgsingleton_is_holder', me)).toBe(1)
      expect(sample(text, 'pgsingleton_epoch', me)).toBe(first.epoch)
      expect(sample(text, 'pgsingleton_holderships_total', { singleton: name })).toBe(1)
      expect(
        sample(text, 'pgsingleton_batch_duration_seconds_count', { policy: 'old-seen' }),
      ).toBeGreaterThanOrEqual(5) // 500 rows in batches of at most 100
      for (const policy of ['old-seen', 'beat']) {
        const age = sample(text, 'pgsingleton_last_success_age_seconds', { policy })
        expect(age, policy).toBeGreaterThanOrEqual(0)
        expect(age, policy).toBeLessThan(30)
      }

      // The standby: not the holder, nothing deleted, no success ages (it reads nothing).
      const idle = await scrape(standbyPort)
      expect(
        sample(idle, 'pgsingleton_is_holder', { singleton: name, node: nodes[s]?.id as string }),
      ).toBe(0)
      expect(sample(idle, 'pgsingleton_rows_deleted_total')).toBeUndefined()
      expect(sample(idle, 'pgsingleton_last_success_age_seconds')).toBeUndefined()
      expect(sample(idle, 'pgsingleton_epoch')).toBeUndefined()

      nodes[h]?.signal('SIGKILL')
      await nodes[h]?.exited
      const after = await waitFor(
        'the standby to report that it holds',
        async () => {
          const t = await scrape(standbyPort)
          return sample(t, 'pgsingleton_is_holder', { singleton: name }) === 1 ? t : undefined
        },
        15_000,
      )
      const row = await statusOf(db.pool, name)
      expect(row?.nodeId).toBe(nodes[s]?.id)
      expect(sample(after, 'pgsingleton_epoch', { singleton: name })).toBe(row?.epoch)
      expect(sample(after, 'pgsingleton_holderships_total', { singleton: name })).toBe(1)
    } finally {
      await stopAll(nodes)
    }
    for (const node of nodes.filter((n) => n.child.signalCode === null))
      expect((await node.exited).code, node.output()).toBe(0)
  }, 90_000)

  it('`--metrics-port` takes a port number, and says so otherwise', async () => {
    const cli = runCli(['run', '--config', await config('metrics-bad'), '--metrics-port', 'x'], {
      DATABASE_URL: db.url,
    })
    expect((await cli.exited).code).not.toBe(0)
    expect(cli.output()).toMatch(/--metrics-port: "x" is not a port number \(1-65535\)/)
  })

  it('the dashboard in a browser: who holds, the queue, the terms and runs; it follows a kill -9 of the holder without a reload', async () => {
    const name = 'dashboard-1'
    await insertRows(db.pool, 300, '2 hours', 'app.seen')
    const file = await config(name)
    const nodes = [1, 2].map((i) => startNode(db.url, file, `${name}-node-${i}`))
    const dashboard = runCli(['dashboard', '--port', '0'], { DATABASE_URL: db.url })
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] })
    try {
      const first = await waitFor('a holder and a standby', async () => {
        const row = await statusOf(db.pool, name)
        return row?.nodeId && row.waitingNodes === 1 ? row : undefined
      })
      const url = await waitFor(
        'the dashboard address',
        async () => /^(http:\/\/\S+)$/m.exec(dashboard.output())?.[1],
      )
      const page = await browser.newPage({ viewport: { width: 1200, height: 900 } })
      await page.goto(url)
      const section = page.locator(`section.singleton[data-name="${name}"]`)
      const holderAttr = () => section.locator('.holder-line').getAttribute('data-holder')
      expect(await holderAttr()).toBe(first.nodeId)
      const standby = nodes.find((n) => n.id !== first.nodeId) as NodeProcess
      expect(await section.locator('.queue').textContent()).toBe(standby.id)
      await page.waitForFunction(
        `/done/.test(document.querySelector('section[data-name="${name}"] table.policies')?.textContent ?? '')`,
        undefined,
        { timeout: 15_000 },
      )
      const policies = await section.locator('table.policies').textContent()
      expect(policies).toMatch(/old-seen\s*cleanup/)
      expect(policies).toMatch(/beat\s*task/)

      // The page is not reloaded: what changes arrives by server-sent events.
      await page.evaluate('window.marker = 42')
      const holder = nodes.find((n) => n.id === first.nodeId) as NodeProcess
      holder.signal('SIGKILL')
      await holder.exited
      await page.waitForFunction(
        `document.querySelector('section[data-name="${name}"] .holder-line')?.getAttribute('data-holder') === ${JSON.stringify(standby.id)}`,
        undefined,
        { timeout: 15_000 },
      )
      expect(await page.evaluate('window.marker')).toBe(42)
      // The cleanup is done (by one holder or the other): the page shows the rows deleted.
      await page.waitForFunction(
        `/300 rows in 24 h/.test(document.querySelector('section[data-name="${name}"] table.policies')?.textContent ?? '')`,
        undefined,
        { timeout: 20_000 },
      )
      // The killed holder's term, closed by its successor as lost. Waited for: the holder
      // line reads the lock itself, which the successor holds a moment before its bump
      // (which closes that term) commits, and a page drawn in that moment shows the old
      // term still held until the next push (the bump's NOTIFY, or the tick).
      const closed = new RegExp(`${first.epoch}${holder.id}.*lost \\(closed by the next holder\\)`)
      await page
        .waitForFunction(
          `new RegExp(${JSON.stringify(closed.source)}).test(document.querySelector('section[data-name="${name}"] table.terms')?.textContent ?? '')`,
          undefined,
          { timeout: 15_000 },
        )
        .catch(() => {})
      const terms = await section.locator('table.terms').textContent()
      expect(terms).toMatch(closed)
      if (process.env.DASHBOARD_SCREENSHOT) {
        await page.screenshot({ path: process.env.DASHBOARD_SCREENSHOT, fullPage: true })
      }

      // The same data as JSON, and nothing but reads.
      const api = (await (await fetch(`${url}api/status`)).json()) as {
        singletons: { name: string; node_id: string | null }[]
      }
      expect(api.singletons.find((s) => s.name === name)?.node_id).toBe(standby.id)
      expect((await fetch(url, { method: 'POST' })).status).toBe(405)
    } finally {
      await browser.close()
      await stopAll([...nodes, dashboard])
    }
    expect((await dashboard.exited).code, dashboard.output()).toBe(0)
  }, 90_000)
})
