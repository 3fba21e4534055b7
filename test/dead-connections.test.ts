import { once } from 'node:events'
import { access, readFile } from 'node:fs/promises'
import pg from 'pg'
import { describe, expect, it } from 'vitest'
import { withClient } from '../src/db/transaction.js'
import { errorMessage } from '../src/errors.js'
import { createSingleton, type Lease } from '../src/index.js'
import { LockSession } from '../src/lock/lock-session.js'
import { countRows, createEventsTable, dbNow, insertRows, statusOf } from './support/app-table.js'
import { createTestDatabase, useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, startNode, stopAll, writeConfig } from './support/nodes.js'
import { openClient } from './support/run-harness.js'
import { CoalescingRelay, PartitionableProxy } from './support/tcp-proxy.js'

const db = useTestDatabase({ setup: ({ pool }) => createEventsTable(pool) })
failOnNodesLeftRunning()

const policy = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 hour',
  every: '1 minute',
}

/** The test database's URL through a relay of `kind`, listening on 127.0.0.1. */
async function relayed<R extends { listen(): Promise<number> }>(
  kind: new (host: string, port: number) => R,
): Promise<{ relay: R; url: string }> {
  const target = new URL(db.url)
  const relay = new kind(target.hostname, Number(target.port || 5432))
  const url = new URL(db.url)
  url.hostname = '127.0.0.1'
  url.port = String(await relay.listen())
  return { relay, url: url.toString() }
}

async function proxied(): Promise<{ proxy: PartitionableProxy; url: string }> {
  const { relay, url } = await relayed(PartitionableProxy)
  return { proxy: relay, url }
}

/**
 * `count` CLI nodes of singleton `singleton` on a database of their own, cleaning app.events
 * every second, which the test can close to new connections and open again (from another
 * database: a session cannot close its own); `reader` is opened first and kept, so the test
 * reads through it while the database is closed.
 */
async function nodesOnTheirOwnDatabase(singleton: string, count: number, options: object = {}) {
  const own = await createTestDatabase()
  const name = new URL(own.url).pathname.slice(1)
  const reader = new pg.Pool({ connectionString: own.url, max: 1, idleTimeoutMillis: 0 })
  reader.on('error', () => {})
  await createEventsTable(own.pool)
  const config = await writeConfig({
    name: singleton,
    ...options,
    policies: [{ ...policy, every: '1 second' }],
  })
  const nodes = Array.from({ length: count }, (_, i) =>
    startNode(own.url, config, `${singleton}-${i + 1}`),
  )
  const door = (open: boolean) => db.pool.query(`ALTER DATABASE ${name} ALLOW_CONNECTIONS ${open}`)
  return {
    reader,
    nodes,
    close: () => door(false),
    open: () => door(true),
    /** The status once a node holds and all the others wait. */
    settled: () =>
      waitFor(`a holder and ${count - 1} waiting`, async () => {
        const row = await statusOf(reader, singleton)
        return row?.nodeId && row.epoch !== null && row.waitingNodes === count - 1 ? row : undefined
      }),
    node: (id: string | null) => {
      const node = nodes.find((n) => n.id === id)
      if (!node) throw new Error(`no node ${id}`)
      return node
    },
    dispose: async () => {
      await door(true).catch(() => {})
      await stopAll(nodes)
      await reader.end()
      await own.drop()
    },
  }
}

describe('dead connections are noticed, and the cluster is never stuck', () => {
  it('default timings: a standby whose path dies without a word notices within 15 s, its backend leaves the queue, and it takes over within 20 s of the holder dying', async () => {
    const config = await writeConfig({ name: 'silent', policies: [policy] })
    const { proxy, url } = await proxied()
    try {
      const holder = startNode(db.url, config, 'silent-holder')
      await waitFor(
        'the holder',
        async () => (await statusOf(db.pool, 'silent'))?.nodeId === 'silent-holder',
      )
      const standby = startNode(url, config, 'silent-standby')
      await waitFor('the standby queued', async () =>
        (await statusOf(db.pool, 'silent'))?.waitingNodeIds.includes('silent-standby'),
      )
      // The path dies: nothing crosses, nothing is closed, for 20 s.
      const cutAt = Date.now()
      proxy.partition({ drop: true })
      const noticed = await waitFor(
        'the standby to notice',
        async () =>
          standby
            .output()
            .split('\n')
            .find((line) => /did not answer a wait slice within \d+ ms: taken as dead/.test(line)),
        20_000,
      )
      const noticedAt = new Date(noticed.split(' ')[0] as string).getTime()
      expect(noticedAt - cutAt).toBeLessThan(15_000)
      // Its backend, whose client the server still believes in (the relay answers for it),
      // has left the lock queue by now: each wait slice ends and then the session idles
      // past idle_session_timeout.
      await waitFor(
        'its backend to leave the lock queue',
        async () => !(await statusOf(db.pool, 'silent'))?.waitingNodeIds.includes('silent-standby'),
        15_000 - (Date.now() - cutAt),
      )
      await new Promise((resolve) =>
        setTimeout(resolve, Math.max(0, 20_000 - (Date.now() - cutAt))),
      )
      proxy.heal()

      const before = await statusOf(db.pool, 'silent')
      const killedAt = await dbNow(db.pool)
      holder.signal('SIGKILL')
      const after = await waitFor(
        'the standby to take over',
        async () => {
          const row = await statusOf(db.pool, 'silent')
          return row?.nodeId === 'silent-standby' && (row.epoch ?? 0) > (before?.epoch ?? 0)
            ? row
            : undefined
        },
        25_000,
      )
      expect(
        (after.acquiredAt?.getTime() ?? Number.POSITIVE_INFINITY) - killedAt.getTime(),
      ).toBeLessThan(20_000)
      await holder.exited
      standby.signal('SIGTERM')
      expect((await standby.exited).code, standby.output()).toBe(0)
    } finally {
      await proxy.close()
    }
  }, 90_000)

  it('an idle cluster (a holder and standbys) writes no ERROR into the server log, however long the standbys wait', async () => {
    const name = new URL(db.url).pathname.slice(1)
    const rollbacks = async () =>
      Number(
        (
          await db.pool.query('SELECT xact_rollback FROM pg_stat_database WHERE datname = $1', [
            name,
          ])
        ).rows[0].xact_rollback,
      )
    const config = await writeConfig({ name: 'quiet', policies: [policy], lockWaitSliceMs: 200 })
    const nodes = [1, 2, 3].map((n) => startNode(db.url, config, `quiet-${n}`))
    await waitFor(
      'a holder and two queued',
      async () => (await statusOf(db.pool, 'quiet'))?.waitingNodes === 2,
    )
    await db.pool.query('SELECT pg_stat_force_next_flush()').catch(() => {})
    const before = await rollbacks()
    const logFile = '/var/log/postgresql/postgresql-15-main.log'
    const log =
      process.env.TEST_DATABASE_URL &&
      (await access(logFile).then(
        () => true,
        () => false,
      ))
    const logBefore = log ? (await readFile(logFile, 'utf8')).length : 0
    // 25 wait slices for each standby: before, each one ended in a logged ERROR.
    await new Promise((resolve) => setTimeout(resolve, 5000))
    await db.pool.query('SELECT pg_stat_force_next_flush()').catch(() => {})
    await new Promise((resolve) => setTimeout(resolve, 1500))
    // An ERROR that reaches the top of a statement rolls its transaction back; a slice
    // that ends quietly does not.
    expect(await rollbacks()).toBe(before)
    if (log) {
      const added = (await readFile(logFile, 'utf8')).slice(logBefore)
      expect(added.split('\n').filter((l) => l.includes(`@${name} `) && /ERROR/.test(l))).toEqual(
        [],
      )
    }
    for (const node of nodes) node.signal('SIGTERM')
    for (const node of nodes) expect((await node.exited).code).toBe(0)
  })

  it('a holder whose ticks keep failing, with no other node waiting, holds on and says so: stepping down would leave no holder', async () => {
    const { proxy, url } = await proxied()
    const alone = createSingleton({
      name: 'alone',
      policies: [{ ...policy, every: '1 second' }],
      batchStatementTimeoutMs: 500,
      deadConnectionAfterMs: 500,
      stepDownAfterMs: 2000,
      nodeId: 'alone',
      connectionString: url,
      lockConnectionString: db.url,
    })
    alone.on('error', () => {})
    const warnings: string[] = []
    alone.on('warning', (warning) => warnings.push(warning.code))
    const lost: string[] = []
    alone.on('lock:lost', ({ reason }) => lost.push(reason))
    try {
      const held = once(alone, 'lock:acquired')
      await alone.start()
      const [lease] = (await held) as [Lease]
      proxy.partition({ drop: true })
      await waitFor('the holder to hold on', async () =>
        warnings.includes('STEP_DOWN_SKIPPED') ? true : undefined,
      )
      expect(lost).toEqual([])
      expect(await statusOf(db.pool, 'alone')).toMatchObject({
        nodeId: 'alone',
        epoch: lease.epoch,
      })
      proxy.heal()
      // Its ticks run again in the same term: a run gets done.
      await insertRows(db.pool, 10, '2 hours')
      await waitFor(
        'a run done after the path healed',
        async () => {
          const { rows } = await db.pool.query(
            `SELECT 1 FROM pgsingleton.cleanup_runs WHERE singleton = 'alone' AND status = 'done' AND rows_deleted > 0`,
          )
          return rows.length > 0 ? true : undefined
        },
        20_000,
      )
      expect(lost).toEqual([])
    } finally {
      proxy.heal()
      await alone.stop()
      await proxy.close()
    }
  })

  it('a holder whose ticks keep failing (its pool broken, its lock session fine) steps down, says why, and queues again later', async () => {
    const { proxy, url } = await proxied()
    const options = {
      name: 'step-down',
      policies: [{ ...policy, every: '1 second' }],
      batchStatementTimeoutMs: 500,
      deadConnectionAfterMs: 500,
      stepDownAfterMs: 2000,
    }
    // The sick node's pool goes through the relay, its lock session does not.
    const sick = createSingleton({
      ...options,
      nodeId: 'sick',
      connectionString: url,
      lockConnectionString: db.url,
    })
    const healthy = createSingleton({ ...options, nodeId: 'healthy', connectionString: db.url })
    for (const node of [sick, healthy]) node.on('error', () => {})
    try {
      const held = once(sick, 'lock:acquired')
      await sick.start()
      await held
      await healthy.start()
      await waitFor(
        'healthy queued',
        async () => (await statusOf(db.pool, 'step-down'))?.waitingNodes === 1,
      )
      // Not events.once, which rejects on the 'error' events the failing ticks emit.
      const lost = new Promise<{ lease: Lease; reason: string }>((resolve) =>
        sick.once('lock:lost', resolve),
      )
      proxy.partition({ drop: true })
      const { reason } = await lost
      expect(reason).toMatch(
        /stepped down: its schedule ticks have failed for \d+ s \(stepDownAfterMs 2000\)/,
      )
      await waitFor(
        'the healthy node to hold',
        async () => (await statusOf(db.pool, 'step-down'))?.nodeId === 'healthy',
      )
      // After the cool-off it queues again.
      await waitFor('the sick node queued again', async () =>
        (await statusOf(db.pool, 'step-down'))?.waitingNodeIds.includes('sick'),
      )
    } finally {
      proxy.heal()
      await sick.stop()
      await healthy.stop()
      await proxy.close()
    }
  })

  it('a database that takes no new connection (as at max_connections) leaves the holder holding: its 10 s session check is skipped, with a warning', async () => {
    // A database of its own, closed to new connections for a while.
    const cluster = await nodesOnTheirOwnDatabase('closed', 2)
    const { reader, nodes } = cluster
    try {
      const before = await cluster.settled()
      const holder = cluster.node(before.nodeId)
      // Settled first: this test is about a holder at work (a run done means its pg-boss
      // started); a new holder whose pg-boss cannot start is the next test's.
      await waitFor('a run done by the holder', async () => {
        const { rows } = await reader.query(
          `SELECT 1 FROM pgsingleton.cleanup_runs WHERE singleton = 'closed' AND status = 'done'`,
        )
        return rows.length > 0 ? true : undefined
      })
      await cluster.close()
      // The first check comes 10 s into the holdership.
      await waitFor(
        'the holder to skip its session check, or to let go',
        async () => /SESSION_CHECK_SKIPPED|fenced: no longer the holder/.test(holder.output()),
        20_000,
      )
      // Another second, so that a holder that had let go would show it.
      await new Promise((resolve) => setTimeout(resolve, 1000))
      expect(holder.output()).not.toContain('fenced: no longer the holder')
      expect(holder.output()).toContain('is not currently accepting connections')
      expect(await statusOf(reader, 'closed')).toMatchObject({
        nodeId: before.nodeId,
        epoch: before.epoch,
        backendPid: before.backendPid,
        waitingNodes: 1,
      })
      await cluster.open()

      // The same term cleans on once the door opens.
      await insertRows(reader, 100, '2 hours')
      await waitFor(
        'the rows outdated after the reopening to be cleaned',
        async () => (await countRows(reader, 'true')) === 0,
        30_000,
      )
      expect((await statusOf(reader, 'closed'))?.epoch).toBe(before.epoch)
      await stopAll(nodes)
      for (const node of nodes) expect(node.child.exitCode, node.output()).toBe(0)
    } finally {
      await cluster.dispose()
    }
  })

  it('a new holder whose pg-boss cannot open its connections (the database closed to them) holds on, and starts it when they open: no step-down, no 30 s without a holder', async () => {
    const cluster = await nodesOnTheirOwnDatabase('door', 2)
    const { reader, nodes } = cluster
    try {
      const before = await cluster.settled()
      const holder = cluster.node(before.nodeId)
      const standby = cluster.node(before.waitingNodeIds[0] ?? null)
      // The standby takes over on its lock session, which needs no new connection; its
      // pg-boss, which starts with the holdership, does.
      await cluster.close()
      holder.signal('SIGKILL')
      await holder.exited
      const taken = await waitFor('the standby to take over', async () => {
        const row = await statusOf(reader, 'door')
        return row?.nodeId === standby.id && (row.epoch ?? 0) > (before.epoch ?? 0)
          ? row
          : undefined
      })
      await waitFor('its pg-boss to fail to start', async () =>
        /QUEUE_NOT_STARTED|pg-boss could not start/.test(standby.output()),
      )
      // A few of its tries, with the door still shut: it holds on.
      await new Promise((resolve) => setTimeout(resolve, 3000))
      expect(standby.output()).not.toContain('fenced: no longer the holder')
      expect(standby.output()).not.toContain('pg-singleton migrate')
      expect(await statusOf(reader, 'door')).toMatchObject({
        nodeId: standby.id,
        epoch: taken.epoch,
        backendPid: taken.backendPid,
      })
      await insertRows(reader, 100, '2 hours')
      await cluster.open()
      // Well inside the 30 s a stepped-down node would sit out before it queued again.
      await waitFor(
        'the same term to start pg-boss and clean',
        async () => (await countRows(reader, 'true')) === 0,
        20_000,
      )
      expect((await statusOf(reader, 'door'))?.epoch).toBe(taken.epoch)
      expect(standby.output()).not.toContain('fenced: no longer the holder')
      await stopAll(nodes)
      expect(standby.child.exitCode, standby.output()).toBe(0)
    } finally {
      await cluster.dispose()
    }
  })

  it('a new holder whose pg-boss stays unable to start steps down after stepDownAfterMs to a node that waits; the last one, with no one waiting, holds on and cleans once it can', async () => {
    const cluster = await nodesOnTheirOwnDatabase('shut', 3, { stepDownAfterMs: 2000 })
    const { reader, nodes } = cluster
    try {
      const before = await cluster.settled()
      const holder = cluster.node(before.nodeId)
      await cluster.close()
      holder.signal('SIGKILL')
      await holder.exited
      // The first standby to take over cannot start pg-boss; the other one waits.
      const first = await waitFor('a standby to take over', async () => {
        const row = await statusOf(reader, 'shut')
        return row?.nodeId && (row.epoch ?? 0) > (before.epoch ?? 0) ? row : undefined
      })
      const ended = await waitFor(
        'its term to end',
        async () => {
          const { rows } = await reader.query<{ end_reason: string; detail: string }>(
            'SELECT end_reason, detail FROM pgsingleton.terms WHERE name = $1 AND epoch = $2 AND ended_at IS NOT NULL',
            ['shut', first.epoch],
          )
          return rows[0]
        },
        15_000,
      )
      expect(ended.end_reason).toBe('released')
      expect(ended.detail).toMatch(/pg-boss has not started for \d+ s \(stepDownAfterMs 2000\)/)
      // The other standby holds now; the one that stepped down cannot queue again (its
      // new connection is refused), so no one waits: the holder holds on.
      const last = await waitFor('the other standby to take over', async () => {
        const row = await statusOf(reader, 'shut')
        return row?.nodeId && row.nodeId !== first.nodeId && (row.epoch ?? 0) > (first.epoch ?? 0)
          ? row
          : undefined
      })
      const lastNode = cluster.node(last.nodeId)
      await waitFor(
        'the last holder to hold on',
        async () => lastNode.output().includes('STEP_DOWN_SKIPPED') || undefined,
        15_000,
      )
      expect(lastNode.output()).not.toContain('fenced: no longer the holder')
      for (const node of nodes) expect(node.output()).not.toContain('pg-singleton migrate')
      await insertRows(reader, 100, '2 hours')
      await cluster.open()
      await waitFor(
        'the last holder to clean, in the same term',
        async () => (await countRows(reader, 'true')) === 0,
        30_000,
      )
      expect((await statusOf(reader, 'shut'))?.epoch).toBe(last.epoch)
      await stopAll(nodes)
      for (const node of nodes.filter((n) => n !== holder))
        expect(node.child.exitCode, node.output()).toBe(0)
    } finally {
      await cluster.dispose()
    }
  })

  it('a stop while the holder’s pg-boss start waits behind a lock returns within two query deadlines; that pg-boss is stopped once it is up', async () => {
    const node = createSingleton({
      name: 'gated',
      nodeId: 'gated',
      connectionString: db.url,
      policies: [policy],
      // Query deadlines of 1 s; pg-boss's own queries wait up to a minute.
      batchStatementTimeoutMs: 500,
      deadConnectionAfterMs: 500,
    })
    node.on('error', () => {})
    const gate = await openClient(db.url)
    try {
      await gate.query('BEGIN')
      await gate.query('LOCK TABLE pgboss.version IN ACCESS EXCLUSIVE MODE')
      const held = once(node, 'lock:acquired')
      await node.start()
      await held
      await waitFor('its pg-boss to wait at the version table', async () => {
        const { rows } = await db.pool.query(
          `SELECT 1 FROM pg_stat_activity WHERE application_name = 'gated pg-boss' AND wait_event_type = 'Lock'`,
        )
        return rows.length > 0 ? true : undefined
      })
      const asked = performance.now()
      await node.stop()
      const tookMs = performance.now() - asked
      // Two deadlines are 2 s; without the bound it waited for pg-boss's minute.
      expect(tookMs).toBeLessThan(15_000)
      await gate.query('ROLLBACK')
      await waitFor(
        'the pg-boss left behind to be stopped once it came up',
        async () => {
          const { rows } = await db.pool.query(
            `SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'gated pg-boss%'`,
          )
          return rows.length === 0 ? true : undefined
        },
        30_000,
      )
    } finally {
      await gate.end().catch(() => {})
      await node.stop()
    }
  })

  it('a stop while the new holder waits to bump its epoch is honoured at once', async () => {
    const node = createSingleton({
      name: 'bump-wait',
      connectionString: db.url,
      policies: [policy],
    })
    // A first holdership makes the lease row; then a transaction holds it the way a batch
    // of an old epoch would, so the next bump waits.
    const first = once(node, 'lock:acquired')
    await node.start()
    await first
    await node.stop()
    const batch = await openClient(db.url)
    await batch.query(
      `BEGIN; SELECT 1 FROM pgsingleton.leases WHERE name = 'bump-wait' FOR KEY SHARE`,
    )
    const second = createSingleton({
      name: 'bump-wait',
      connectionString: db.url,
      policies: [policy],
    })
    try {
      await second.start()
      await waitFor('the bump to wait', async () => {
        const { rows } = await db.pool.query(
          // The bump waits on the row lock (not on the advisory lock of a wait slice).
          `SELECT 1 FROM pg_stat_activity
            WHERE wait_event_type = 'Lock' AND wait_event <> 'advisory' AND query LIKE '%pgsingleton.%'`,
        )
        return rows.length > 0
      })
      const started = performance.now()
      await second.stop()
      expect(performance.now() - started).toBeLessThan(3000)
    } finally {
      await batch.query('ROLLBACK')
      await batch.end()
    }
  })

  it('a lock session goes on, and says so, when the server refuses a setting', async () => {
    // A value the server refuses stands in for a platform that does not support
    // client_connection_check_interval.
    const session = new LockSession(
      { connectionString: db.url },
      {
        name: 'refused',
        nodeId: 'refused-node',
        idleSessionTimeoutMs: 3000,
        lockWaitSliceMs: 1000,
        connectionCheckMs: -5,
        deadAfterMs: 2000,
      },
    )
    await session.connect()
    expect(session.warnings).toEqual([
      {
        code: 'SESSION_SETTING_REFUSED',
        message: expect.stringMatching(
          /^the lock session goes on without a setting the server refused: client_connection_check_interval: /,
        ),
      },
    ])
    await session.close()
  })

  it('a pooled connection whose session ends in the same read as the ReadyForQuery that made it ready is heard, not a crash', async () => {
    // Seen as a node process dying with "Unhandled 'error' event" when a holder's backends
    // were terminated right after its takeover: its scheduler's first tick was opening a
    // pool connection.
    const { relay, url } = await relayed(CoalescingRelay)
    const pool = new pg.Pool({
      connectionString: url,
      max: 1,
      application_name: 'coalesced',
    })
    pool.on('error', () => {})
    const unheard: Error[] = []
    const onUncaught = (error: Error) => unheard.push(error)
    process.on('uncaughtException', onUncaught)
    try {
      const work = withClient(pool, (client) => client.query('SELECT 1'))
      work.catch(() => {})
      // The backend has sent its ReadyForQuery (held in the relay) and waits: end it.
      await waitFor('the backend, ready', async () => {
        const { rows } = await db.pool.query<{ ended: boolean }>(
          `SELECT pg_terminate_backend(pid) AS ended FROM pg_stat_activity
            WHERE application_name = 'coalesced' AND state = 'idle'`,
        )
        return rows[0]?.ended
      })
      // The FATAL reached the client before `work` ran (as the relay meant it to), so the
      // query found the client broken: the error came through the listener.
      await expect(work).rejects.toThrow(/not queryable/)
      // The pool is usable again once the path is: the broken connection left it.
      expect(pool.totalCount).toBe(0)
    } finally {
      process.off('uncaughtException', onUncaught)
      await pool.end()
      await relay.close()
    }
    expect(unheard.map(errorMessage)).toEqual([])
  })

  it('what is thrown without being an Error keeps its content', () => {
    expect(errorMessage({ code: 'X1', detail: 'why' })).toBe('{"code":"X1","detail":"why"}')
    expect(errorMessage({ message: 'said' })).toBe('said')
    expect(errorMessage('text')).toBe('text')
    const circular: Record<string, unknown> = {}
    circular.self = circular
    expect(errorMessage(circular)).toBe('[object Object]')
  })
})
