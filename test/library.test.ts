import { execFileSync } from 'node:child_process'
import { once } from 'node:events'
import net from 'node:net'
import pg from 'pg'
import { PgBoss } from 'pg-boss'
import { describe, expect, it } from 'vitest'
import { createSingleton, type RunReport } from '../src/index.js'
import type { Lease } from '../src/lock/lock-session.js'
import { Starter } from '../src/lock/starter.js'
import { queueName } from '../src/queue/cleanup-queue.js'
import {
  countRows,
  createEventsTable,
  insertRows,
  safetyViolations,
  statusOf,
} from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { runCli } from './support/nodes.js'

const policy = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 hour',
  every: '1 hour',
  batchSize: 300,
}
const db = useTestDatabase({ setup: ({ pool }) => createEventsTable(pool) })

/** By the database's own records: from a run request's write to the run's issue. */
async function issuedAfterRequestMs(runId: string): Promise<number | undefined> {
  return (
    await db.pool.query<{ ms: number }>(
      `SELECT (extract(epoch FROM r.created_at - c.changed_at) * 1000)::float8 AS ms
         FROM pgsingleton.cleanup_runs r
         JOIN pgsingleton.policy_controls c ON c.singleton = r.singleton AND c.policy = r.policy
        WHERE r.id = $1`,
      [runId],
    )
  ).rows[0]?.ms
}

describe('the library inside an app', () => {
  it('deletes exactly the outdated rows, in batches of at most batchSize, and records the run', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 1000, '2 hours')
    await insertRows(db.pool, 100, '61 minutes')
    await insertRows(db.pool, 400, '59 minutes') // young: one minute inside the window
    await insertRows(db.pool, 50, '-1 day') // from the future, as clocks sometimes write
    const node = createSingleton({
      name: 'lib-batches',
      connectionString: db.url,
      policies: [policy],
    })
    const acquired = once(node, 'lock:acquired')
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    const [lease] = await acquired
    expect(lease.epoch).toBe(1)
    const [report] = await done
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 1100, epoch: 1, batches: 4 })
    expect(await countRows(db.pool, 'true')).toBe(450)
    expect(await countRows(db.pool, `created_at < now() - interval '1 hour'`)).toBe(0)

    const { rows: runs } = await db.pool.query(
      `SELECT * FROM pgsingleton.cleanup_runs WHERE singleton = 'lib-batches'`,
    )
    expect(runs).toHaveLength(1)
    expect(runs[0]).toMatchObject({
      policy: 'old-events',
      status: 'done',
      rows_deleted: '1100',
      batches: 4,
      epoch: '1',
      error: null,
    })
    expect(runs[0].node_id).toBe(node.nodeId)
    const { rows: batches } = await db.pool.query(
      'SELECT rows_deleted FROM pgsingleton.cleanup_batches WHERE run_id = $1 ORDER BY batch',
      [runs[0].id],
    )
    expect(batches.map((b) => b.rows_deleted)).toEqual([300, 300, 300, 200])

    expect(await node.whereis()).toBe(node.nodeId)
    const status = await node.status()
    expect(status).toMatchObject({
      name: 'lib-batches',
      nodeId: node.nodeId,
      epoch: 1,
      waitingNodes: 0,
      lastRunRows: 1100,
      lastRunStatus: 'done',
    })
    await node.stop()
    expect(await statusOf(db.pool, 'lib-batches')).toMatchObject({
      nodeId: null,
      backendPid: null,
      epoch: null,
      lastEpoch: 1,
    })
  })

  it('cleans tables and columns whose names need quoting', async () => {
    await db.pool.query(
      `CREATE SCHEMA "App Data"; CREATE TABLE "App Data"."Events ""2024""" ("Created At" timestamptz, note text)`,
    )
    await db.pool.query(
      `INSERT INTO "App Data"."Events ""2024""" VALUES (now() - interval '2 days', 'old'), (now(), 'new')`,
    )
    const node = createSingleton({
      name: 'lib-quoting',
      connectionString: db.url,
      policies: [
        { ...policy, table: 'App Data.Events "2024"', column: 'Created At', olderThan: '1 day' },
      ],
    })
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    expect((await done)[0]).toMatchObject({ status: 'done', rowsDeleted: 1 })
    const { rows } = await db.pool.query(`SELECT note FROM "App Data"."Events ""2024"""`)
    expect(rows).toEqual([{ note: 'new' }])
    await node.stop()
  })

  it('runNow on the holder starts the run at once, not at the next tick of its scheduler', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 100, '2 hours')
    const node = createSingleton({
      name: 'lib-run-now',
      connectionString: db.url,
      policies: [policy],
    })
    const first = once(node, 'cleanup:done')
    await node.start()
    await first
    try {
      // With nothing due for an hour the holder's scheduler looks every 5 s, so a request
      // left for its next look waits 2-5 s in each of these rounds.
      for (const afterMs of [300, 1400, 2500]) {
        await insertRows(db.pool, 100, '2 hours')
        await new Promise((resolve) => setTimeout(resolve, afterMs))
        const done = once(node, 'cleanup:done') as Promise<[RunReport]>
        const { rows: clock } = await db.pool.query<{ at: string }>(
          'SELECT clock_timestamp()::text AS at',
        )
        await node.runNow('old-events')
        const [report] = await done
        expect(report.rowsDeleted).toBe(100)
        // By the database's own records: the run was issued within a second of the request.
        const { rows } = await db.pool.query<{ ms: number }>(
          `SELECT (extract(epoch FROM created_at - $1::timestamptz) * 1000)::float8 AS ms
             FROM pgsingleton.cleanup_runs WHERE id = $2`,
          [clock[0]?.at, report.runId],
        )
        expect(rows[0]?.ms).toBeGreaterThan(0)
        expect(rows[0]?.ms).toBeLessThan(1000)
      }
      expect(await countRows(db.pool, `created_at < now() - interval '1 hour'`)).toBe(0)
    } finally {
      await node.stop()
    }
  })

  it('a run asked for by a standby, the CLI or plain SQL starts at once on the holder, not at its next tick', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 100, '2 hours')
    const name = 'lib-run-now-anywhere'
    const heard: { asked: string }[] = []
    const listener = new pg.Client({ connectionString: db.url })
    await listener.connect()
    listener.on('notification', (message) => {
      const event = JSON.parse(message.payload ?? '{}')
      if (event.singleton === name && event.asked) heard.push({ asked: event.asked })
    })
    await listener.query('LISTEN pgsingleton')
    const a = createSingleton({ name, connectionString: db.url, policies: [policy], nodeId: 'a' })
    const b = createSingleton({ name, connectionString: db.url, policies: [policy], nodeId: 'b' })
    try {
      const first = once(a, 'cleanup:done')
      await a.start()
      await first
      await b.start()
      await waitFor('b queued', async () =>
        (await statusOf(db.pool, name))?.waitingNodeIds.includes('b'),
      )
      // With nothing due for an hour the holder looks every 5 s, from the look that issued
      // the last run: a request left for its next look waits 2-5 s in each of these rounds
      // (the CLI's own start-up, about a second, comes before its request).
      const asks: [string, number, () => Promise<unknown>][] = [
        ['the standby', 300, () => b.runNow('old-events')],
        [
          'the CLI',
          0,
          async () => {
            const cli = runCli(['run-now', 'old-events', '--name', name], { DATABASE_URL: db.url })
            expect((await cli.exited).code, cli.output()).toBe(0)
          },
        ],
        [
          'plain SQL',
          2500,
          () =>
            db.pool.query(
              `UPDATE pgsingleton.policy_controls SET run_now_at = now(), changed_at = now()
                WHERE singleton = $1 AND policy = 'old-events'`,
              [name],
            ),
        ],
      ]
      for (const [by, afterMs, ask] of asks) {
        await insertRows(db.pool, 100, '2 hours')
        await new Promise((resolve) => setTimeout(resolve, afterMs))
        const done = once(a, 'cleanup:done') as Promise<[RunReport]>
        await ask()
        const [report] = await done
        expect(report.rowsDeleted, by).toBe(100)
        // By the database's own records: issued within a second of the request's commit.
        // (A request that commits while a tick runs is taken by that tick, which began first.)
        const ms = await issuedAfterRequestMs(report.runId)
        expect(ms, by).toBeGreaterThan(-1000)
        expect(ms, by).toBeLessThan(1000)
      }
      // Only the holder listens, on a connection of its own.
      const listening = async () =>
        (
          await db.pool.query<{ name: string }>(
            `SELECT application_name AS name FROM pg_stat_activity
              WHERE datname = current_database() AND application_name IN ('a requests', 'b requests')
              ORDER BY 1`,
          )
        ).rows.map((row) => row.name)
      expect(await listening()).toEqual(['a requests'])
      await b.pause('old-events')
      await b.resume('old-events')
      await waitFor('the resume heard', async () => heard.length >= 4 || undefined)
      await new Promise((resolve) => setTimeout(resolve, 200))
      // One announcement per request; the holder's clearing of a request it took, and the
      // pause, announce nothing.
      expect(heard).toEqual([
        { asked: 'run' },
        { asked: 'run' },
        { asked: 'run' },
        { asked: 'resume' },
      ])
      expect((await statusOf(db.pool, name))?.nodeId).toBe('a')
      // After a hand-over the new holder listens, and the old one no longer does: its stop
      // resolves once its LISTEN connection has closed.
      const bHolds = once(b, 'lock:acquired')
      await a.stop()
      expect(await listening()).not.toContain('a requests')
      await bHolds
      await waitFor('b listening', async () =>
        (await listening()).join() === 'b requests' ? true : undefined,
      )
      // Its takeover's first ticks have passed: its next look is 2-5 s away.
      await new Promise((resolve) => setTimeout(resolve, 1000))
      await insertRows(db.pool, 100, '2 hours')
      const done = once(b, 'cleanup:done') as Promise<[RunReport]>
      await db.pool.query(
        `UPDATE pgsingleton.policy_controls SET run_now_at = now(), changed_at = now()
          WHERE singleton = $1 AND policy = 'old-events'`,
        [name],
      )
      const [report] = await done
      expect(report.rowsDeleted).toBe(100)
      const ms = await issuedAfterRequestMs(report.runId)
      expect(ms).toBeGreaterThan(-1000)
      expect(ms).toBeLessThan(1000)
    } finally {
      await b.stop()
      await a.stop()
      await listener.end()
    }
  })

  it('a holder whose LISTEN for run requests cannot start says so once, tries again until it listens, and then takes requests at once', async () => {
    await db.pool.query('TRUNCATE app.events')
    const name = 'lib-requests-retry'
    // A relay to the server that turns away the connections named "requests" while
    // `refusing`, and passes every other one (the lock session, the pool, pg-boss's).
    const target = new URL(db.url)
    let refusing = true
    let refused = 0
    const sockets = new Set<net.Socket>()
    const relay = net.createServer((client) => {
      sockets.add(client)
      client.on('error', () => {})
      client.once('data', (startup) => {
        if (refusing && startup.includes('a requests')) {
          refused++
          client.destroy()
          return
        }
        const upstream = net.connect(Number(target.port || 5432), target.hostname)
        sockets.add(upstream)
        upstream.on('error', () => client.destroy())
        upstream.write(startup)
        client.pipe(upstream)
        upstream.pipe(client)
        client.on('close', () => upstream.destroy())
        upstream.on('close', () => client.destroy())
      })
    })
    await new Promise<void>((resolve) => relay.listen(0, '127.0.0.1', resolve))
    const relayed = new URL(db.url)
    relayed.hostname = '127.0.0.1'
    relayed.port = String((relay.address() as net.AddressInfo).port)
    const a = createSingleton({
      name,
      connectionString: relayed.toString(),
      policies: [policy],
      nodeId: 'a',
    })
    const errors: string[] = []
    a.on('error', (error: Error) => errors.push(error.message))
    const notStarted = () =>
      errors.filter((message) => message.includes('the LISTEN for run requests could not start'))
    try {
      // Not events.once: it would reject on the 'error' this test expects.
      const first = new Promise((resolve) => a.once('cleanup:done', resolve))
      await a.start()
      await first
      // Turned away at least twice: the first attempt, and a retry after its backoff.
      await waitFor('a retry turned away', async () => (refused >= 2 ? true : undefined))
      expect(notStarted()).toHaveLength(1)
      expect(notStarted()[0]).toMatch(/until it can, the holder takes them at its next tick/)
      refusing = false
      await waitFor('a listening', async () =>
        (
          await db.pool.query(
            `SELECT 1 FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'a requests'`,
          )
        ).rowCount
          ? true
          : undefined,
      )
      // Its first ticks are past: its next look is seconds away.
      await new Promise((resolve) => setTimeout(resolve, 1000))
      await insertRows(db.pool, 100, '2 hours')
      const done = new Promise<RunReport>((resolve) => a.once('cleanup:done', resolve))
      await db.pool.query(
        `INSERT INTO pgsingleton.policy_controls (singleton, policy, run_now_at)
         VALUES ($1, 'old-events', now())
         ON CONFLICT (singleton, policy) DO UPDATE SET run_now_at = now(), changed_at = now()`,
        [name],
      )
      const report = await done
      expect(report.rowsDeleted).toBe(100)
      expect(await issuedAfterRequestMs(report.runId)).toBeLessThan(1000)
      // Reported once, however many attempts it took.
      expect(notStarted()).toHaveLength(1)
    } finally {
      try {
        await a.stop()
      } finally {
        for (const socket of sockets) socket.destroy()
        await new Promise((resolve) => relay.close(resolve))
      }
    }
  })

  it('a run asked for while the last run is still open starts as soon as that run ends', async () => {
    let release: () => void = () => {}
    let runs = 0
    const node = createSingleton({
      name: 'lib-run-after-run',
      connectionString: db.url,
      tasks: [
        {
          name: 'slow',
          every: '1 hour',
          handler: async () => {
            runs++
            if (runs === 1) await new Promise<void>((resolve) => (release = resolve))
          },
        },
      ],
    })
    const done: RunReport[] = []
    node.on('task:done', (report: RunReport) => done.push(report))
    await node.start()
    try {
      await waitFor('the first run under way', async () => (runs === 1 ? true : undefined))
      // Held back by the open run: the holder's next look is 5 s away once it has seen it.
      await node.runNow('slow')
      await new Promise((resolve) => setTimeout(resolve, 500))
      release()
      await waitFor('two runs done', async () => (done.length >= 2 ? true : undefined))
      const [first, second] = done
      const { rows } = await db.pool.query<{ ms: number }>(
        `SELECT (extract(epoch FROM s.created_at - f.finished_at) * 1000)::float8 AS ms
           FROM pgsingleton.cleanup_runs f, pgsingleton.cleanup_runs s
          WHERE f.id = $1 AND s.id = $2`,
        [first?.runId, second?.runId],
      )
      expect(rows[0]?.ms).toBeGreaterThan(0)
      expect(rows[0]?.ms).toBeLessThan(1000)
    } finally {
      release()
      await node.stop()
    }
  })

  it('an application_name in the URL does not hide the node id in pgsingleton.status', async () => {
    const url = new URL(db.url)
    url.searchParams.set('application_name', 'the app')
    const node = createSingleton({
      name: 'lib-app-name',
      connectionString: url.toString(),
      lockConnectionString: url.toString(),
      policies: [policy],
      nodeId: 'named-node',
    })
    const holds = once(node, 'lock:acquired')
    await node.start()
    try {
      await holds
      expect((await statusOf(db.pool, 'lib-app-name'))?.nodeId).toBe('named-node')
      expect(await node.whereis()).toBe('named-node')
      const { rows } = await db.pool.query<{ name: string }>(
        `SELECT DISTINCT application_name AS name FROM pg_stat_activity
          WHERE datname = current_database() AND application_name IN ('the app', 'named-node', 'named-node pool')
          ORDER BY 1`,
      )
      expect(rows.map((row) => row.name)).toEqual(['named-node', 'named-node pool'])
    } finally {
      await node.stop()
    }
  })

  it('hands over at once on stop(): the standby holds a higher epoch, and both lifecycles are idempotent', async () => {
    const a = createSingleton({
      name: 'lib-handover',
      connectionString: db.url,
      policies: [policy],
      nodeId: 'a',
    })
    const b = createSingleton({
      name: 'lib-handover',
      connectionString: db.url,
      policies: [policy],
      nodeId: 'b',
    })
    const aHolds = once(a, 'lock:acquired')
    expect(a.start()).toBe(a.start())
    await aHolds
    const bWaits = once(b, 'lock:waiting')
    await b.start()
    await bWaits
    await waitFor('b queued', async () =>
      (await statusOf(db.pool, 'lib-handover'))?.waitingNodeIds.includes('b'),
    )
    const bHolds = once(b, 'lock:acquired')
    const released = once(a, 'lock:released')
    const stopping = a.stop()
    expect(a.stop()).toBe(stopping)
    await stopping
    await released
    const [lease] = await bHolds
    expect(lease.epoch).toBe(2)
    expect(await b.whereis()).toBe('b')
    await b[Symbol.asyncDispose]()
    await expect(a.start()).rejects.toThrow(/stopped/)
  })

  describe('the hand-over', () => {
    /** Bumps announced on channel pgsingleton, with the backend that announced each. */
    const listen = async () => {
      const listener = new pg.Client({ connectionString: db.url })
      await listener.connect()
      const bumps: { singleton: string; epoch: number; node: string; by: number }[] = []
      listener.on('notification', (message) => {
        const event = JSON.parse(message.payload ?? '{}')
        if (event.node) bumps.push({ ...event, by: message.processId })
      })
      await listener.query('LISTEN pgsingleton')
      return { bumps, end: () => listener.end() }
    }
    const lease = async (name: string) =>
      (
        await db.pool.query<{ epoch: string; node_id: string; backend_pid: number }>(
          'SELECT epoch, node_id, backend_pid FROM pgsingleton.leases WHERE name = $1',
          [name],
        )
      ).rows[0]
    const terms = async (name: string) =>
      (
        await db.pool.query(
          `SELECT epoch::int, node_id, end_reason, closed_by FROM pgsingleton.terms
            WHERE name = $1 ORDER BY epoch`,
          [name],
        )
      ).rows
    /** Node a holds, node b waits. */
    const pair = async (name: string) => {
      const [a, b] = ['a', 'b'].map((nodeId) =>
        createSingleton({ name, connectionString: db.url, policies: [policy], nodeId }),
      ) as [ReturnType<typeof createSingleton>, ReturnType<typeof createSingleton>]
      const aHolds = once(a, 'lock:acquired')
      await a.start()
      const [aLease] = (await aHolds) as [Lease]
      // Its first run over: a batch in flight holds the lease row, and then the hand-over
      // leaves the bump to the next node, which a test of its own covers.
      await waitFor('the first run done', async () => {
        const { rows } = await db.pool.query(
          `SELECT count(*) FILTER (WHERE status = 'done')::int AS done,
                  count(*) FILTER (WHERE status IN ('scheduled', 'running', 'failed'))::int AS open
             FROM pgsingleton.cleanup_runs WHERE singleton = $1`,
          [name],
        )
        return rows[0].done >= 1 && rows[0].open === 0 ? true : undefined
      })
      await b.start()
      const waiting = await waitFor('b queued', async () => {
        const row = await statusOf(db.pool, name)
        return row?.waitingNodeIds.includes('b') ? row : undefined
      })
      const { rows } = await db.pool.query<{ pid: number }>(
        `SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'b'
            AND wait_event_type = 'Lock'`,
      )
      expect(waiting.nodeId).toBe('a')
      return { a, b, aPid: aLease.backendPid, bPid: rows[0]?.pid as number }
    }

    it("a stop bumps the next node's epoch in its own statement, which the next node takes as is", async () => {
      const heard = await listen()
      const { a, b, aPid, bPid } = await pair('lib-hand-epoch')
      try {
        const bHolds = once(b, 'lock:acquired')
        await a.stop()
        const [bLease] = (await bHolds) as [Lease]
        // One bump, announced by the stopping holder's session; the next node took it as is.
        expect(bLease).toMatchObject({ epoch: 2, backendPid: bPid })
        expect(await lease('lib-hand-epoch')).toEqual({
          epoch: '2',
          node_id: 'b',
          backend_pid: bPid,
        })
        await waitFor('the bump heard', async () => (heard.bumps.length >= 2 ? true : undefined))
        expect(heard.bumps.filter((bump) => bump.singleton === 'lib-hand-epoch')).toEqual([
          { singleton: 'lib-hand-epoch', epoch: 1, node: 'a', by: aPid },
          { singleton: 'lib-hand-epoch', epoch: 2, node: 'b', by: aPid },
        ])
        expect(await terms('lib-hand-epoch')).toEqual([
          { epoch: 1, node_id: 'a', end_reason: 'released', closed_by: 'holder' },
          { epoch: 2, node_id: 'b', end_reason: null, closed_by: null },
        ])
        expect(await b.whereis()).toBe('b')
      } finally {
        await Promise.all([a.stop(), b.stop()])
        await heard.end()
      }
    })

    it('while a batch of its epoch holds the lease, a stop only unlocks: the next node bumps once the batch ends', async () => {
      const heard = await listen()
      const { a, b, bPid } = await pair('lib-hand-batch')
      // What a batch's fence check holds on the lease row until the batch commits.
      const batch = await db.pool.connect()
      try {
        await batch.query('BEGIN')
        await batch.query(
          `SELECT 1 FROM pgsingleton.leases WHERE name = 'lib-hand-batch' AND epoch = 1 FOR KEY SHARE`,
        )
        const bHolds = once(b, 'lock:acquired')
        await a.stop()
        // Unlocked, not handed over: b waits for the batch, to bump.
        await waitFor('b granted the lock', async () =>
          (
            await db.pool.query(
              `SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' AND NOT granted`,
              [bPid],
            )
          ).rowCount === 0
            ? true
            : undefined,
        )
        expect(await lease('lib-hand-batch')).toMatchObject({ epoch: '1', node_id: 'a' })
        await batch.query('COMMIT')
        const [bLease] = (await bHolds) as [Lease]
        expect(bLease.epoch).toBe(2)
        await waitFor('the bump heard', async () =>
          heard.bumps.some((bump) => bump.epoch === 2) ? true : undefined,
        )
        expect(heard.bumps.find((bump) => bump.epoch === 2)).toMatchObject({ node: 'b', by: bPid })
      } finally {
        await batch.query('ROLLBACK').catch(() => {})
        batch.release()
        await Promise.all([a.stop(), b.stop()])
        await heard.end()
      }
    })

    it("a hand-over that does not answer closes the session, and the term ends as the holder's own account says", async () => {
      const name = 'lib-hand-silent'
      const [a, b] = ['a', 'b'].map((nodeId) =>
        createSingleton({
          name,
          connectionString: db.url,
          policies: [policy],
          nodeId,
          deadConnectionAfterMs: 800,
        }),
      ) as [ReturnType<typeof createSingleton>, ReturnType<typeof createSingleton>]
      const aHolds = once(a, 'lock:acquired')
      await a.start()
      const [aLease] = (await aHolds) as [Lease]
      // Its first run over: a batch in flight holds the lease row, and then the hand-over
      // leaves the bump to the next node, which a test of its own covers.
      await waitFor('the first run done', async () => {
        const { rows } = await db.pool.query(
          `SELECT count(*) FILTER (WHERE status = 'done')::int AS done,
                  count(*) FILTER (WHERE status IN ('scheduled', 'running', 'failed'))::int AS open
             FROM pgsingleton.cleanup_runs WHERE singleton = $1`,
          [name],
        )
        return rows[0].done >= 1 && rows[0].open === 0 ? true : undefined
      })
      await b.start()
      await waitFor('b queued', async () =>
        (await statusOf(db.pool, name))?.waitingNodeIds.includes('b') ? true : undefined,
      )
      // The term's row locked elsewhere: the hand-over's end_term waits, past its deadline.
      const blocker = await db.pool.connect()
      try {
        await blocker.query('BEGIN')
        await blocker.query(
          'SELECT 1 FROM pgsingleton.terms WHERE name = $1 AND epoch = 1 FOR UPDATE',
          [name],
        )
        const warned = once(a, 'warning')
        const bHolds = once(b, 'lock:acquired')
        const stopping = a.stop()
        const [warning] = await warned
        expect(warning).toMatchObject({ code: 'HAND_OVER_FAILED' })
        // The server ends the backend of the closed session within its connection check (1 s):
        // until then, the statement would still run, and hand over, once the row is free.
        await waitFor('the lock session gone', async () =>
          (
            await db.pool.query('SELECT 1 FROM pg_stat_activity WHERE pid = $1', [
              aLease.backendPid,
            ])
          ).rowCount === 0
            ? true
            : undefined,
        )
        await blocker.query('COMMIT')
        await stopping
        const [bLease] = (await bHolds) as [Lease]
        expect(bLease.epoch).toBe(2)
        expect(await terms(name)).toEqual([
          { epoch: 1, node_id: 'a', end_reason: 'released', closed_by: 'holder' },
          { epoch: 2, node_id: 'b', end_reason: null, closed_by: null },
        ])
        const { rows } = await db.pool.query(
          'SELECT detail FROM pgsingleton.terms WHERE name = $1 AND epoch = $2',
          [name, aLease.epoch],
        )
        expect(rows[0]?.detail).toMatch(/hand-over failed/)
      } finally {
        await blocker.query('ROLLBACK').catch(() => {})
        blocker.release()
        await Promise.all([a.stop(), b.stop()])
      }
    })

    it('a waiter that is not a live node speaking the protocol is handed nothing', async () => {
      for (const speaks of [false, true]) {
        const name = `lib-hand-stranger-${speaks}`
        const a = createSingleton({
          name,
          connectionString: db.url,
          policies: [policy],
          nodeId: 'a',
        })
        const aHolds = once(a, 'lock:acquired')
        await a.start()
        await aHolds
        // A session that registers as a node and queues on the lock, as a node of schema 2
        // would (it declares no protocol), or as one of this schema.
        const stranger = new pg.Client({ connectionString: db.url, application_name: 'stranger' })
        await stranger.connect()
        try {
          if (speaks) await stranger.query(`SET pgsingleton.protocol = '3'`)
          await stranger.query(
            `SELECT pg_advisory_lock(pgsingleton.member_key($1, 'stranger'));
             INSERT INTO pgsingleton.nodes (singleton, node_id, backend_pid, member_key)
             VALUES ($1, 'stranger', pg_backend_pid(), pgsingleton.member_key($1, 'stranger'))`.replace(
              /\$1/g,
              `'${name}'`,
            ),
          )
          const granted = stranger.query('SELECT pg_advisory_lock(pgsingleton.lock_key($1))', [
            name,
          ])
          await waitFor('the stranger queued', async () =>
            (await statusOf(db.pool, name))?.waitingNodes === 1 ? true : undefined,
          )
          await a.stop()
          await granted
          expect(await lease(name)).toMatchObject(
            speaks ? { epoch: '2', node_id: 'stranger' } : { epoch: '1', node_id: 'a' },
          )
        } finally {
          await a.stop()
          await stranger.end()
        }
      }
    })
  })

  it('a standby readies its session for the takeover and leaves no trace of it', async () => {
    // The readying bumps the epoch of a name no singleton can have and undoes it in the
    // same statement: no row of it may stay, no notification go out, no transaction stay open.
    const listener = new pg.Client({ connectionString: db.url })
    await listener.connect()
    const heard: string[] = []
    listener.on('notification', (message) => heard.push(message.payload ?? ''))
    await listener.query('LISTEN pgsingleton')
    const nodes = ['a', 'b'].map((nodeId) =>
      createSingleton({ name: 'lib-ready', connectionString: db.url, policies: [policy], nodeId }),
    )
    try {
      for (const node of nodes) await node.start()
      await waitFor('one holds, one waits', async () => {
        const row = await statusOf(db.pool, 'lib-ready')
        return row?.nodeId && row.waitingNodes === 1 ? row : undefined
      })
      const { rows } = await db.pool.query<{ leases: number; terms: number }>(
        `SELECT (SELECT count(*)::int FROM pgsingleton.leases WHERE name LIKE 'warm-up %') AS leases,
                (SELECT count(*)::int FROM pgsingleton.terms WHERE name LIKE 'warm-up %') AS terms`,
      )
      expect(rows[0]).toEqual({ leases: 0, terms: 0 })
      const { rows: sessions } = await db.pool.query<{ state: string; xid: string | null }>(
        `SELECT state, backend_xid::text AS xid FROM pg_stat_activity
          WHERE datname = current_database() AND application_name IN ('a', 'b')`,
      )
      expect(sessions).toHaveLength(2)
      for (const session of sessions) {
        expect(session.state).not.toMatch(/in transaction/)
        expect(session.xid).toBeNull()
      }
      // The holder readied its hand-over right after its takeover, on a key of its own:
      // no lock of it stays. Two membership locks and the singleton's are all that is held.
      await new Promise((resolve) => setTimeout(resolve, 500))
      const { rows: locks } = await db.pool.query(
        `SELECT count(*)::int AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.locktype = 'advisory' AND l.granted AND a.application_name IN ('a', 'b')`,
      )
      expect(locks).toEqual([{ n: 3 }])
      // The standby still takes over, at the next epoch; each bump is announced once.
      const [holder, standby] = (await nodes[0]?.whereis()) === 'a' ? nodes : [...nodes].reverse()
      const takes = once(standby as (typeof nodes)[number], 'lock:acquired')
      await holder?.stop()
      const [lease] = await takes
      expect(lease.epoch).toBe(2)
      const events = () =>
        heard.map(
          (payload) => JSON.parse(payload) as { singleton: string; epoch: number; node?: string },
        )
      await waitFor('the takeover heard', async () =>
        events().some((event) => event.singleton === 'lib-ready' && event.epoch === 2)
          ? true
          : undefined,
      )
      expect(events().filter((event) => event.singleton.startsWith('warm-up'))).toEqual([])
      expect(
        events()
          .filter((event) => event.singleton === 'lib-ready' && event.node)
          .map((event) => event.epoch),
      ).toEqual([1, 2])
    } finally {
      await Promise.all(nodes.map((node) => node.stop()))
      await listener.end()
    }
  })

  it("works with the app's own pool and pg-boss, and leaves them running on stop()", async () => {
    const pool = new pg.Pool({ connectionString: db.url, max: 5 })
    const boss = new PgBoss({ connectionString: db.url, schedule: false })
    boss.on('error', () => {})
    await boss.start()
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 10, '2 hours')
    const node = createSingleton({ name: 'lib-borrowed', pool, boss, policies: [policy] })
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    expect((await done)[0]).toMatchObject({ status: 'done', rowsDeleted: 10 })
    await node.stop()
    expect((await pool.query('SELECT 1 AS one')).rows[0].one).toBe(1)
    expect(await boss.getQueue(queueName('lib-borrowed'))).toBeTruthy()
    await boss.stop({ graceful: false, close: true })
    await pool.end()
  })

  it('a job carrying an old epoch deletes nothing and is recorded as fenced', async () => {
    await db.pool.query('TRUNCATE app.events')
    const node = () =>
      createSingleton({ name: 'lib-stale', connectionString: db.url, policies: [policy] })
    const first = node()
    const firstDone = once(first, 'cleanup:done')
    await first.start()
    await firstDone
    await first.stop()
    const second = node()
    const secondHolds = once(second, 'lock:acquired')
    await second.start()
    expect((await secondHolds)[0].epoch).toBe(2)
    await insertRows(db.pool, 25, '2 hours')

    // What a stale holder would have sent: a run and a job under epoch 1.
    const boss = new PgBoss({ connectionString: db.url, schedule: false, supervise: false })
    boss.on('error', () => {})
    await boss.start()
    const { rows } = await db.pool.query(
      `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, definition, fingerprint)
       SELECT 'lib-stale', 'old-events', 1, now(), 'a stale holder', definition, fingerprint
         FROM pgsingleton.node_policies WHERE singleton = 'lib-stale' LIMIT 1 RETURNING id`,
    )
    const runId = String(rows[0].id)
    const fenced = waitFor('the stale run to be fenced', async () => {
      const { rows: run } = await db.pool.query(
        'SELECT status, rows_deleted, error FROM pgsingleton.cleanup_runs WHERE id = $1',
        [runId],
      )
      return run[0]?.status === 'fenced' ? run[0] : undefined
    })
    await boss.send(
      queueName('lib-stale'),
      { runId, singleton: 'lib-stale', policy: 'old-events', epoch: 1, fingerprint: '' },
      { singletonKey: 'old-events' },
    )
    const run = await fenced
    expect(run.rows_deleted).toBe('0')
    expect(run.error).toMatch(/epoch 1|superseded/)
    const { rows: staleBatches } = await db.pool.query(
      `SELECT count(*)::int AS n FROM pgsingleton.cleanup_batches WHERE run_id = $1`,
      [runId],
    )
    expect(staleBatches[0].n).toBe(0)
    // The holder takes the unfinished occurrence over under its own epoch.
    await waitFor('the holder to finish the occurrence', async () => {
      const { rows: done } = await db.pool.query(
        `SELECT d.epoch, d.rows_deleted FROM pgsingleton.cleanup_runs d JOIN pgsingleton.cleanup_runs s
            ON s.id = $1 AND d.scheduled_for = s.scheduled_for AND d.singleton = s.singleton
         WHERE d.status = 'done'`,
        [runId],
      )
      return done[0]?.epoch === '2' && done[0].rows_deleted === '25'
    })
    expect(await countRows(db.pool, 'true')).toBe(0)
    await boss.stop({ graceful: false, close: true })
    await second.stop()
    expect(await safetyViolations(db.pool, 'lib-stale')).toEqual([])
  })

  it('a throwing listener does not break the node', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 5, '2 hours')
    const node = createSingleton({
      name: 'lib-listener',
      connectionString: db.url,
      policies: [policy],
    })
    node.on('lock:acquired', () => {
      throw new Error('a careless listener')
    })
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    expect((await done)[0]).toMatchObject({ status: 'done', rowsDeleted: 5 })
    await node.stop()
  })

  it('keeps its own history short with a policy on pgsingleton.cleanup_runs, as the README suggests', async () => {
    await db.pool.query(
      `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, status, created_at, finished_at, definition, fingerprint)
       SELECT 'lib-history', 'old-events', 1, now() - i * interval '1 day', 'a node long gone', 'done', now() - i * interval '1 day', now() - i * interval '1 day', '{}', '-'
         FROM generate_series(31, 40) AS i`,
    )
    const node = createSingleton({
      name: 'lib-history',
      connectionString: db.url,
      policies: [
        {
          name: 'history',
          table: 'pgsingleton.cleanup_runs',
          column: 'created_at',
          olderThan: '30 days',
          every: '1 hour',
          allowCascade: true, // the runs' batches go with them
        },
      ],
    })
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    expect((await done)[0]).toMatchObject({ status: 'done', rowsDeleted: 10 })
    await node.stop()
    const { rows } = await db.pool.query(
      `SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs WHERE created_at < now() - interval '30 days'`,
    )
    expect(rows[0].n).toBe(0)
  })

  /** A bare Starter (what a Singleton runs) on this database, and what its hooks saw. */
  function starterOf(
    name: string,
    onAcquired: (starter: Starter, lease: Lease) => void = () => {},
    stepDownCoolOffMs = 1000,
  ) {
    const losses: string[] = []
    let acquired: (lease: Lease) => void = () => {}
    const holds = new Promise<Lease>((resolve) => {
      acquired = resolve
    })
    const starter: Starter = new Starter(
      { connectionString: db.url },
      {
        name,
        nodeId: 'a',
        idleSessionTimeoutMs: 3000,
        lockWaitSliceMs: 1000,
        connectionCheckMs: 1000,
        deadAfterMs: 5000,
        definitions: [],
        heartbeatMs: 1000,
        fenceAfterMs: 2000,
        reconnectDelayMs: 100,
        stepDownCoolOffMs,
      },
      {
        onRegistered: () => {},
        onWaiting: () => {},
        onAcquired: (lease) => {
          onAcquired(starter, lease)
          acquired(lease)
        },
        onLost: (_lease, reason) => losses.push(reason),
        onError: () => {},
        onWarning: () => {},
        onFatal: () => {},
      },
    )
    return { starter, holds, losses }
  }
  const termOf = async (lease: Lease) =>
    (
      await db.pool.query(
        'SELECT end_reason, closed_by, detail FROM pgsingleton.terms WHERE name = $1 AND epoch = $2',
        [lease.name, lease.epoch],
      )
    ).rows

  it("a stop in the tick a step-down ended the hold leaves the step-down's own account of the term", async () => {
    // The stop's hand-over is for a node that holds: once another ending has ended the
    // hold, in the same tick, that ending records the term and unlocks, once.
    const { starter, holds, losses } = starterOf('lib-step-down-stop')
    await starter.start()
    const lease = await holds
    starter.stepDown('ticks keep failing')
    expect(await starter.stop(async () => {})).toBeUndefined()
    expect(losses).toEqual(['stepped down: ticks keep failing'])
    expect(await termOf(lease)).toEqual([
      { end_reason: 'released', closed_by: 'holder', detail: 'stepped down: ticks keep failing' },
    ])
  })

  it('a step-down whose lock session was lost meanwhile is a loss: the node queues again at once, not after the cool-off', async () => {
    // A database restart fails what made the holder step down (pg-boss could not start)
    // and its session alike. Here the session ends on the server in the tick the holder
    // steps down, before the node has heard of it (the event loop is blocked meanwhile).
    const leases: Lease[] = []
    const { starter, losses } = starterOf(
      'lib-step-down-lost',
      (self, lease) => {
        leases.push(lease)
        if (leases.length > 1) return
        execFileSync(
          process.execPath,
          [
            '--input-type=module',
            '-e',
            `import pg from 'pg'; const c = new pg.Client(process.env.URL); await c.connect();
             await c.query('SELECT pg_terminate_backend($1)', [${lease.backendPid}]); await c.end()`,
          ],
          { env: { ...process.env, URL: db.url } },
        )
        self.stepDown('pg-boss could not start')
      },
      60_000,
    )
    await starter.start()
    await waitFor(
      'the node to hold again',
      async () => (leases.length > 1 ? true : undefined),
      10_000,
    )
    expect(losses).toHaveLength(1)
    expect(losses[0]).toMatch(/\(and the lock session was lost meanwhile\)$/)
    expect(leases[1]?.epoch).toBeGreaterThan(leases[0]?.epoch ?? 0)
    await starter.stop(async () => {})
  })

  it('a stop from inside lock:acquired hands over too, before the work ends', async () => {
    let stopping: Promise<Lease | undefined> | undefined
    let freeDuringWork: boolean | undefined
    const { starter, holds } = starterOf('lib-stop-in-acquired', (self) => {
      stopping = self.stop(async () => {
        freeDuringWork = (await statusOf(db.pool, 'lib-stop-in-acquired'))?.nodeId === null
      })
    })
    await starter.start()
    const lease = await holds
    expect(await stopping).toEqual(lease)
    expect(freeDuringWork).toBe(true)
    expect(await termOf(lease)).toEqual([
      { end_reason: 'released', closed_by: 'holder', detail: 'stopped' },
    ])
  })

  it('a stop whose hand-over the server refuses frees the lock all the same, before the work ends', async () => {
    const { starter, holds } = starterOf('lib-refused-hand-over')
    await starter.start()
    const lease = await holds
    // The term cannot end as released: the hand-over's statement fails, unlock and all.
    await db.pool.query(
      `ALTER TABLE pgsingleton.terms ADD CONSTRAINT refuse_release
         CHECK (name <> 'lib-refused-hand-over' OR end_reason IS DISTINCT FROM 'released') NOT VALID`,
    )
    try {
      let holderDuringWork: string | null | undefined = 'unread'
      await starter.stop(async () => {
        holderDuringWork = (await statusOf(db.pool, lease.name))?.nodeId
      })
      expect(holderDuringWork).toBeNull()
    } finally {
      await db.pool.query('ALTER TABLE pgsingleton.terms DROP CONSTRAINT refuse_release')
    }
  })

  it('along the index, the first batch on a table whose outdated rows are scattered over its pages is small; the rest grow, and every outdated row goes', async () => {
    // 60,000 rows (about 800 pages) in random order, 5 % outdated: the run walks the index,
    // and 1000 rows would touch some 570 pages in its first batch.
    await db.pool.query(`DROP TABLE IF EXISTS app.scattered;
      CREATE TABLE app.scattered (id int PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
      INSERT INTO app.scattered
        SELECT i, CASE WHEN i <= 3000 THEN now() - interval '2 hours' - i * interval '1 second'
                       ELSE now() - (i % 3000) * interval '1 second' END, repeat('x', 80)
          FROM generate_series(1, 60000) AS i ORDER BY random();
      CREATE INDEX ON app.scattered (created_at);
      ANALYZE app.scattered;`)
    const node = createSingleton({
      name: 'lib-scattered',
      connectionString: db.url,
      policies: [{ ...policy, name: 'scattered', table: 'app.scattered', batchSize: 100_000 }],
    })
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    try {
      expect((await done)[0]).toMatchObject({ status: 'done', rowsDeleted: 3000 })
    } finally {
      await node.stop()
    }
    const { rows } = await db.pool.query<{ rows_deleted: number }>(
      `SELECT b.rows_deleted FROM pgsingleton.cleanup_batches b
         JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id
        WHERE r.singleton = 'lib-scattered' ORDER BY b.batch`,
    )
    expect(rows[0]?.rows_deleted).toBeGreaterThan(0)
    expect(rows[0]?.rows_deleted).toBeLessThanOrEqual(200)
    expect(Math.max(...rows.map((r) => r.rows_deleted))).toBeGreaterThan(200)
    const { rows: left } = await db.pool.query(
      `SELECT count(*)::int AS n, count(*) FILTER (WHERE created_at < now() - interval '1 hour')::int AS outdated
         FROM app.scattered`,
    )
    expect(left[0]).toEqual({ n: 57000, outdated: 0 })
  })
})
