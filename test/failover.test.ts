import { readdir, readFile, readlink } from 'node:fs/promises'
import { describe, expect, it } from 'vitest'
import {
  countRows,
  createEventsTable,
  dbNow,
  insertRows,
  safetyViolations,
  statusOf,
  waitUntilSettled,
} from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import {
  failOnNodesLeftRunning,
  type NodeProcess,
  runCli,
  startNode,
  stopAll,
  writeConfig,
} from './support/nodes.js'
import { PartitionableProxy } from './support/tcp-proxy.js'

// Short timings so that the pause test finishes fast: the server cuts a silent holder
// after 1 s; the holder fences itself after 600 ms without a successful heartbeat.
const TIMING = { heartbeatMs: 200, fenceAfterMs: 600, idleSessionTimeoutMs: 1000 }
const POLICY = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 hour',
  every: '1 second',
  batchSize: 200,
}

const db = useTestDatabase({ setup: ({ pool }) => createEventsTable(pool) })
failOnNodesLeftRunning()
let nameSeq = 0

async function cluster(
  count: number,
  extra: object = {},
): Promise<{ name: string; nodes: NodeProcess[] }> {
  const name = `failover-${++nameSeq}`
  const config = await writeConfig({ name, policies: [POLICY], ...TIMING, ...extra })
  const nodes = Array.from({ length: count }, (_, i) =>
    startNode(db.url, config, `${name}-node-${i + 1}`),
  )
  await waitFor('a holder and all others queued', async () => {
    const row = await statusOf(db.pool, name)
    return row?.nodeId && row.epoch !== null && row.waitingNodes === count - 1 ? row : undefined
  })
  return { name, nodes }
}

const byId = (nodes: NodeProcess[], id: string | null) => {
  const node = nodes.find((n) => n.id === id)
  if (!node) throw new Error(`no node ${id}`)
  return node
}

/** How pgsingleton.terms recorded the end of a holdership. */
async function termOf(name: string, epoch: number | null | undefined) {
  const { rows } = await db.pool.query<{
    node_id: string
    acquired_at: Date
    ended_at: Date | null
    end_reason: string | null
    closed_by: string | null
    detail: string | null
  }>(
    'SELECT node_id, acquired_at, ended_at, end_reason, closed_by, detail FROM pgsingleton.terms WHERE name = $1 AND epoch = $2',
    [name, epoch],
  )
  return rows[0]
}

describe('failover between real node processes', () => {
  it('kill -9 of the holder: another node holds a higher epoch within 1 s and cleans rows outdated after the kill', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 3000, '2 hours')
    await insertRows(db.pool, 1000, '10 minutes')
    const { name, nodes } = await cluster(3)
    await waitFor(
      'the first cleanup',
      async () => (await countRows(db.pool, `created_at < now() - interval '1 hour'`)) === 0,
    )

    const before = await statusOf(db.pool, name)
    const holder = byId(nodes, before?.nodeId ?? null)
    const killedAt = await dbNow(db.pool)
    holder.signal('SIGKILL')
    const after = await waitFor('a new holder', async () => {
      const row = await statusOf(db.pool, name)
      return row?.nodeId && (row.epoch ?? 0) > (before?.epoch ?? 0) ? row : undefined
    })
    expect(after.nodeId).not.toBe(before?.nodeId)
    const takeoverMs =
      (after.acquiredAt?.getTime() ?? Number.POSITIVE_INFINITY) - killedAt.getTime()
    expect(takeoverMs).toBeLessThan(1000)
    expect((await holder.exited).signal).toBe('SIGKILL')
    // A killed holder cannot say how its term ended: its successor closes it, at the
    // moment it took over.
    const killed = await termOf(name, before?.epoch)
    expect(killed).toMatchObject({
      node_id: holder.id,
      end_reason: 'lost',
      closed_by: 'successor',
      ended_at: after.acquiredAt,
    })
    expect(await termOf(name, after.epoch)).toMatchObject({ node_id: after.nodeId, ended_at: null })

    await insertRows(db.pool, 1500, '3 hours')
    await waitFor(
      'the new holder to clean rows outdated after the kill',
      async () => (await countRows(db.pool, `created_at < now() - interval '1 hour'`)) === 0,
    ).catch(async (error) => {
      const { rows } = await db.pool.query(
        `SELECT id, policy, epoch, status, node_id, error, created_at::time AS at FROM pgsingleton.cleanup_runs WHERE singleton = $1 ORDER BY id DESC LIMIT 8`,
        [name],
      )
      throw new Error(
        `${error.message}\nruns: ${JSON.stringify(rows)}\n${nodes.map((n) => `--- ${n.id}\n${n.output().slice(-3000)}`).join('\n')}`,
      )
    })
    expect(await countRows(db.pool, 'true')).toBe(1000) // the young rows, every one
    // What deleted them: batches of newer epochs only, judged from the audit trail.
    const { rows: deleters } = await db.pool.query(
      `SELECT DISTINCT b.epoch FROM pgsingleton.cleanup_batches b JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id
        WHERE r.singleton = $1 AND b.began_at >= $2 AND b.rows_deleted > 0`,
      [name, after.acquiredAt],
    )
    expect(deleters.length).toBeGreaterThan(0)
    for (const row of deleters) expect(Number(row.epoch)).toBeGreaterThan(before?.epoch ?? 0)

    const survivors = nodes.filter((n) => n !== holder)
    await waitUntilSettled(db.pool, name)
    await stopAll(survivors)
    for (const node of survivors) expect((await node.exited).code, node.output()).toBe(0)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('a job a dead worker left active after its run finished does not hold the next run back', async () => {
    await db.pool.query('TRUNCATE app.events')
    const { name, nodes } = await cluster(1, { policies: [{ ...POLICY, every: '1 hour' }] })
    // Its job completed too: the worker records the run done before pg-boss completes the
    // job, and a completion after the UPDATE below would overwrite the state it sets.
    const first = await waitFor('the first run done, and its job completed', async () => {
      const { rows } = await db.pool.query(
        `SELECT r.id, r.job_id FROM pgsingleton.cleanup_runs r
           JOIN pgboss.job j ON j.id::text = r.job_id AND j.state = 'completed'
          WHERE r.singleton = $1 AND r.status = 'done'`,
        [name],
      )
      return rows[0]
    })
    // What a worker killed between recording its run done and completing its pg-boss job
    // leaves: the run finished on a node that is gone, its job still active.
    await db.pool.query(`UPDATE pgsingleton.cleanup_runs SET node_id = 'gone-node' WHERE id = $1`, [
      first.id,
    ])
    await db.pool.query(
      `UPDATE pgboss.job SET state = 'active', started_on = now() WHERE id = $1`,
      [first.job_id],
    )
    await insertRows(db.pool, 300, '2 hours')
    const runNow = runCli(['run-now', POLICY.name, '--name', name], { DATABASE_URL: db.url })
    expect((await runNow.exited).code, runNow.output()).toBe(0)
    await waitFor(
      'the next run to clean',
      async () => (await countRows(db.pool, `created_at < now() - interval '1 hour'`)) === 0,
      20_000,
    )
    const { rows: job } = await db.pool.query('SELECT state FROM pgboss.job WHERE id = $1', [
      first.job_id,
    ])
    expect(job[0]?.state).toBe('cancelled')
    await stopAll(nodes)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('SIGTERM of the holder: it finishes, releases, exits 0, and the next node takes over at once', async () => {
    const { name, nodes } = await cluster(2)
    const before = await statusOf(db.pool, name)
    const holder = byId(nodes, before?.nodeId ?? null)
    const signalledAt = await dbNow(db.pool)
    holder.signal('SIGTERM')
    expect((await holder.exited).code, holder.output()).toBe(0)
    const after = await waitFor('the standby to take over', async () => {
      const row = await statusOf(db.pool, name)
      return row?.nodeId && (row.epoch ?? 0) > (before?.epoch ?? 0) ? row : undefined
    })
    expect(after.nodeId).not.toBe(before?.nodeId)
    expect(
      (after.acquiredAt?.getTime() ?? Number.POSITIVE_INFINITY) - signalledAt.getTime(),
    ).toBeLessThan(1000)
    expect(holder.output()).toContain('released the singleton')
    // Released by the holder itself, in the statement that unlocked, before the next began.
    const released = await termOf(name, before?.epoch)
    expect(released).toMatchObject({ end_reason: 'released', closed_by: 'holder' })
    expect(released?.ended_at?.getTime()).toBeLessThanOrEqual(after.acquiredAt?.getTime() ?? 0)
    await waitUntilSettled(db.pool, name)
    await stopAll(nodes)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('pg_terminate_backend of the lock session: the node lives on and queues again, another takes over', async () => {
    const { name, nodes } = await cluster(2)
    const before = await statusOf(db.pool, name)
    const holder = byId(nodes, before?.nodeId ?? null)
    await db.pool.query('SELECT pg_terminate_backend($1)', [before?.backendPid])
    const after = await waitFor('a takeover and the old holder queued again', async () => {
      const row = await statusOf(db.pool, name)
      return row?.nodeId &&
        row.nodeId !== before?.nodeId &&
        (row.epoch ?? 0) > (before?.epoch ?? 0) &&
        row.waitingNodeIds.includes(holder.id)
        ? row
        : undefined
    })
    expect(after.epoch).toBeGreaterThan(before?.epoch ?? 0)
    expect(holder.child.exitCode).toBeNull()
    // Lost, whoever wrote it first: the holder on its failed session, or its successor.
    const ended = await termOf(name, before?.epoch)
    expect(ended?.end_reason).toBe('lost')
    expect(ended?.ended_at?.getTime()).toBeLessThanOrEqual(after.acquiredAt?.getTime() ?? 0)
    await waitUntilSettled(db.pool, name)
    await stopAll(nodes)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('every connection of the holder terminated at once, round after round: no node process ends, and each round a holder returns', async () => {
    // The server ends all of a holder's sessions together (a restart does the same): its
    // lock session, pool, pg-boss pool and LISTEN connection. The node lets go of pg-boss
    // while the server's goodbye is still arriving on those sockets, which once ended the
    // process (an 'error' on pg-boss's LISTEN client with no listener left).
    await db.pool.query('TRUNCATE app.events')
    const { name, nodes } = await cluster(2)
    const ids = nodes.map((n) => n.id)
    let epoch = (await statusOf(db.pool, name))?.epoch ?? 0
    for (let round = 0; round < 12; round++) {
      await insertRows(db.pool, 20, '2 hours')
      // A run in flight, or just done: the moment the race needs.
      await new Promise((resolve) => setTimeout(resolve, 200 + Math.random() * 1000))
      const { rows } = await db.pool.query<{ n: number }>(
        `SELECT count(pg_terminate_backend(a.pid))::int AS n FROM pg_stat_activity a
          JOIN pgsingleton.status s ON s.name = $1 AND a.application_name LIKE s.node_id || '%'`,
        [name],
      )
      expect(rows[0]?.n).toBeGreaterThanOrEqual(2)
      const next = await waitFor(`a holder again (round ${round + 1})`, async () => {
        for (const node of nodes)
          if (node.child.exitCode !== null) throw new Error(`${node.id} exited:\n${node.output()}`)
        const row = await statusOf(db.pool, name)
        return row?.nodeId && (row.epoch ?? 0) > epoch && row.waitingNodes === 1 ? row : undefined
      })
      epoch = next.epoch ?? 0
    }
    for (const node of nodes) expect(node.child.exitCode, node.output()).toBeNull()
    await insertRows(db.pool, 50, '2 hours')
    await waitFor('the rows outdated after the last round to be cleaned', async () => {
      return (await countRows(db.pool, 'true')) === 0
    })
    await waitUntilSettled(db.pool, name)
    await stopAll(nodes)
    for (const node of nodes) expect((await node.exited).code, node.output()).toBe(0)
    expect(ids).toHaveLength(2)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it("the holder's LISTEN connection terminated alone: the node keeps holding, listens again on a new connection, and runs go on", async () => {
    await db.pool.query('TRUNCATE app.events')
    const { name, nodes } = await cluster(2)
    const before = await statusOf(db.pool, name)
    const listener = async () => {
      const { rows } = await db.pool.query<{ pid: number }>(
        `SELECT pid FROM pg_stat_activity WHERE application_name = $1 || ' pg-boss listen' AND query LIKE 'LISTEN %'`,
        [before?.nodeId],
      )
      return rows[0]?.pid
    }
    const first = await waitFor('the holder listening', listener)
    await db.pool.query('SELECT pg_terminate_backend($1)', [first])
    const second = await waitFor('the holder listening again', async () => {
      const pid = await listener()
      return pid !== undefined && pid !== first ? pid : undefined
    })
    expect(second).not.toBe(first)
    await insertRows(db.pool, 50, '2 hours')
    await waitFor('the rows outdated after it to be cleaned', async () => {
      return (await countRows(db.pool, 'true')) === 0
    })
    const after = await statusOf(db.pool, name)
    expect(after?.epoch).toBe(before?.epoch)
    expect(after?.nodeId).toBe(before?.nodeId)
    const holder = byId(nodes, before?.nodeId ?? null)
    expect(holder.output()).toMatch(/LISTEN connection lost \(pg-boss\): terminating connection/)
    await waitUntilSettled(db.pool, name)
    await stopAll(nodes)
    for (const node of nodes) expect((await node.exited).code, node.output()).toBe(0)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('SIGSTOP of the holder: the server cuts it off, another takes over; on SIGCONT it fences itself and queues', async () => {
    await db.pool.query('TRUNCATE app.events')
    const { name, nodes } = await cluster(2)
    const before = await statusOf(db.pool, name)
    const holder = byId(nodes, before?.nodeId ?? null)
    const pausedAt = await dbNow(db.pool)
    holder.signal('SIGSTOP')
    const after = await waitFor('a takeover from the paused holder', async () => {
      const row = await statusOf(db.pool, name)
      // The holder columns fill in once the new holder has bumped the epoch.
      return row?.nodeId && row.nodeId !== before?.nodeId && (row.epoch ?? 0) > (before?.epoch ?? 0)
        ? row
        : undefined
    })
    const takeoverMs =
      (after.acquiredAt?.getTime() ?? Number.POSITIVE_INFINITY) - pausedAt.getTime()
    // The server's idle timer started at the holder's last heartbeat, up to heartbeatMs
    // before the pause: the takeover came from idle_session_timeout, not from anything sooner.
    expect(takeoverMs).toBeGreaterThanOrEqual(TIMING.idleSessionTimeoutMs - TIMING.heartbeatMs - 50)
    expect(takeoverMs).toBeLessThan(TIMING.idleSessionTimeoutMs + 4000)

    await insertRows(db.pool, 700, '2 hours')
    holder.signal('SIGCONT')
    await waitFor('the resumed node to queue again', async () =>
      (await statusOf(db.pool, name))?.waitingNodeIds.includes(holder.id),
    )
    await waitFor(
      'the rows to be cleaned',
      async () => (await countRows(db.pool, `created_at < now() - interval '1 hour'`)) === 0,
    )
    expect(holder.output()).toMatch(/fenced: no longer the holder/)
    // The successor closed the term as lost when it took over; the resumed holder then
    // gave its own reason, and the end time stayed the successor's.
    const paused = await waitFor('the resumed holder to record its term', async () => {
      const term = await termOf(name, before?.epoch)
      return term?.closed_by === 'holder' ? term : undefined
    })
    expect(['fenced', 'lost', 'superseded']).toContain(paused.end_reason)
    expect(paused.ended_at).toEqual(after.acquiredAt)
    const stale = await db.pool.query(
      `SELECT count(*)::int AS n FROM pgsingleton.cleanup_batches b JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id
        WHERE r.singleton = $1 AND b.epoch < $2 AND b.began_at >= $3`,
      [name, after.epoch, after.acquiredAt],
    )
    expect(stale.rows[0].n).toBe(0)
    await waitUntilSettled(db.pool, name)
    await stopAll(nodes)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('a run of the old epoch is fenced mid-run: it deletes nothing after the takeover, and the new holder finishes the occurrence', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertRows(db.pool, 10_000, '2 hours')
    // 50 batches of 200 with 50 ms between them: the run is still going when the holder loses its session.
    const { name, nodes } = await cluster(2, { batchPauseMs: 50 })
    const before = await statusOf(db.pool, name)
    await waitFor('the first batches', async () => {
      const { rows } = await db.pool.query(
        `SELECT count(*)::int AS n FROM pgsingleton.cleanup_batches b JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id WHERE r.singleton = $1`,
        [name],
      )
      return rows[0].n >= 3
    })
    await db.pool.query('SELECT pg_terminate_backend($1)', [before?.backendPid])
    const after = await waitFor('a new holder', async () => {
      const row = await statusOf(db.pool, name)
      return row?.nodeId && (row.epoch ?? 0) > (before?.epoch ?? 0) ? row : undefined
    })
    await waitFor(
      'every outdated row deleted',
      async () => (await countRows(db.pool, 'true')) === 0,
    )
    // The old holder's run deleted rows before the takeover. Its run was then either closed
    // by the new holder (fenced, its occurrence issued again) or, stopped between batches
    // first, left waiting as failed and taken into the new epoch as it was, and finished.
    const { rows: early } = await db.pool.query(
      `SELECT coalesce(sum(b.rows_deleted), 0)::int AS n FROM pgsingleton.cleanup_batches b
         JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id WHERE r.singleton = $1 AND b.epoch = $2`,
      [name, before?.epoch],
    )
    expect(early[0].n).toBeGreaterThan(0)
    const late = await db.pool.query(
      `SELECT count(*)::int AS n FROM pgsingleton.cleanup_batches b JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id
        WHERE r.singleton = $1 AND b.epoch = $2 AND b.ended_at >= $3`,
      [name, before?.epoch, after.acquiredAt],
    )
    expect(late.rows[0].n).toBe(0)
    const { rows: total } = await db.pool.query(
      `SELECT sum(rows_deleted)::int AS n FROM pgsingleton.cleanup_runs WHERE singleton = $1`,
      [name],
    )
    expect(total[0].n).toBe(10_000) // every row deleted exactly once, across both epochs
    await waitUntilSettled(db.pool, name)
    await stopAll(nodes)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('a partitioned holder fences itself before the server hands the lock on, and queues again once healed', async () => {
    const name = `failover-${++nameSeq}`
    const config = await writeConfig({ name, policies: [POLICY], ...TIMING })
    const target = new URL(db.url)
    const proxy = new PartitionableProxy(target.hostname, Number(target.port || 5432))
    const proxied = new URL(db.url)
    proxied.port = String(await proxy.listen())
    proxied.hostname = '127.0.0.1'
    try {
      const cut = startNode(proxied.toString(), config, `${name}-behind-the-proxy`)
      const before = await waitFor('the proxied node to hold', async () => {
        const row = await statusOf(db.pool, name)
        return row?.nodeId === cut.id && row.epoch !== null ? row : undefined
      })
      const other = startNode(db.url, config, `${name}-direct`)
      await waitFor('the direct node to queue', async () =>
        (await statusOf(db.pool, name))?.waitingNodeIds.includes(other.id),
      )

      proxy.partition()
      const after = await waitFor('the direct node to take over', async () => {
        const row = await statusOf(db.pool, name)
        return row?.nodeId === other.id && (row.epoch ?? 0) > (before.epoch ?? 0) ? row : undefined
      })
      const fencedLine = await waitFor('the cut-off node to fence itself', async () =>
        cut
          .output()
          .split('\n')
          .find((line) => line.includes('fenced: no longer the holder')),
      )
      // Both clocks are this machine's: the node's log line and the server's acquired_at.
      const fencedAt = new Date(fencedLine.split(' ')[0] as string).getTime()
      expect(fencedAt).toBeLessThan(after.acquiredAt?.getTime() ?? 0)
      expect(cut.child.exitCode).toBeNull()

      proxy.heal()
      // Once its path is back, the cut-off holder records that it fenced itself; the end
      // time stays the successor's.
      const fenced = await waitFor(
        'the healed holder to record its term',
        async () => {
          const term = await termOf(name, before.epoch)
          return term?.closed_by === 'holder' ? term : undefined
        },
        30_000,
      )
      expect(fenced.end_reason).toBe('fenced')
      expect(fenced.ended_at).toEqual(after.acquiredAt)
      await waitFor(
        'the healed node to queue again',
        async () => (await statusOf(db.pool, name))?.waitingNodeIds.includes(cut.id),
        30_000,
      )
      await waitUntilSettled(db.pool, name)
      await stopAll([cut, other])
      expect(await safetyViolations(db.pool, name)).toEqual([])
    } finally {
      await proxy.close()
    }
  })

  it('kill -9 of a worker that is not the holder: the holder sees its node gone and has the occurrence completed', async () => {
    await db.pool.query('TRUNCATE app.events')
    await db.pool.query('CREATE TABLE IF NOT EXISTS app.visits (created_at timestamptz NOT NULL)')
    await insertRows(db.pool, 10_000, '2 hours')
    await db.pool.query(
      `INSERT INTO app.visits SELECT now() - interval '2 hours' FROM generate_series(1, 10000)`,
    )
    // Two slow runs, due together: each worker takes one, so one runs on the standby (every
    // node works the queue).
    const visits = { ...POLICY, name: 'old-visits', table: 'app.visits', every: '1 hour' }
    const { name, nodes } = await cluster(2, {
      workQueue: 'always',
      batchPauseMs: 50,
      policies: [{ ...POLICY, every: '1 hour' }, visits],
    })
    const holderId = (await statusOf(db.pool, name))?.nodeId
    const running = await waitFor('a run on the standby', async () => {
      const { rows } = await db.pool.query(
        `SELECT id, policy, scheduled_for, node_id FROM pgsingleton.cleanup_runs
          WHERE singleton = $1 AND status = 'running' AND node_id <> $2 AND batches >= 2`,
        [name, holderId],
      )
      return rows[0]
    })
    const worker = byId(nodes, running.node_id)
    worker.signal('SIGKILL')
    await worker.exited
    await waitFor(
      'the occurrence to be completed by the surviving node',
      async () => {
        // Matched in SQL: a JS Date would cut the occurrence's microseconds.
        const { rows } = await db.pool.query(
          `SELECT d.node_id FROM pgsingleton.cleanup_runs d JOIN pgsingleton.cleanup_runs k
              ON k.id = $1 AND d.singleton = k.singleton AND d.policy = k.policy AND d.scheduled_for = k.scheduled_for
           WHERE d.status = 'done'`,
          [running.id],
        )
        return rows[0]?.node_id === holderId
      },
      30_000,
    )
    const { rows: lost } = await db.pool.query(
      'SELECT status, error FROM pgsingleton.cleanup_runs WHERE id = $1',
      [running.id],
    )
    expect(lost[0]).toMatchObject({ status: 'fenced', error: expect.stringMatching(/is gone/) })
    expect(await countRows(db.pool, 'true')).toBe(0)
    const { rows: left } = await db.pool.query('SELECT count(*)::int AS n FROM app.visits')
    expect(left[0].n).toBe(0)
    await waitUntilSettled(db.pool, name)
    await stopAll(nodes.filter((n) => n !== worker))
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it.runIf(process.platform === 'linux')(
    "a holder's lock session has the highest descriptor of its connections, which Linux closes first when the process is killed",
    async () => {
      const { name, nodes } = await cluster(1)
      try {
        const holder = byId(nodes, `${name}-node-1`)
        // The pool and pg-boss connect once the node holds and its first tick has run.
        const backends = await waitFor('the holder opened its other connections', async () => {
          const { rows } = await db.pool.query<{ application_name: string; client_port: number }>(
            `SELECT application_name, client_port FROM pg_stat_activity
              WHERE application_name = $1 OR application_name LIKE $1 || ' %'`,
            [holder.id],
          )
          return rows.length >= 3 ? rows : undefined
        })
        // Each connection's descriptor in the process, found by its socket's local port. Only
        // the holder's own sockets are read from /proc/net/tcp: another socket on the same
        // port (a TIME_WAIT entry, inode 0, or another process's) cannot stand in for one.
        const fdByInode = new Map<string, number>()
        const dir = `/proc/${holder.child.pid}/fd`
        for (const fd of await readdir(dir)) {
          const target = await readlink(`${dir}/${fd}`).catch(() => '')
          const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1]
          if (inode) fdByInode.set(inode, Number(fd))
        }
        const fdByPort = new Map<number, number>()
        for (const file of ['/proc/net/tcp', '/proc/net/tcp6']) {
          const lines = (await readFile(file, 'utf8').catch(() => '')).split('\n').slice(1)
          for (const line of lines) {
            const fields = line.trim().split(/\s+/)
            const fd = fdByInode.get(fields[9] ?? '')
            if (fd !== undefined)
              fdByPort.set(Number.parseInt(fields[1]?.split(':')[1] ?? '', 16), fd)
          }
        }
        const fds = backends.map((b) => ({
          name: b.application_name,
          fd: fdByPort.get(b.client_port),
        }))
        expect(
          fds.every((x) => x.fd !== undefined),
          JSON.stringify(fds),
        ).toBe(true)
        const lock = fds.find((x) => x.name === holder.id)
        const others = fds.filter((x) => x !== lock).map((x) => x.fd ?? 0)
        expect(lock?.fd, JSON.stringify(fds)).toBeGreaterThan(Math.max(...others))
      } finally {
        await stopAll(nodes)
      }
    },
  )
})
