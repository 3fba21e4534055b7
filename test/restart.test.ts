import { randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { chmod, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
// The built module: it starts initdb through a compiled helper next to it.
import { ensureEmbedded, stopEmbedded } from '../dist/src/cli/embedded.js'
import type { PolicyDefinition } from '../src/config/definition.js'
import { migrateToLatest } from '../src/db/migrate.js'
import * as runs from '../src/runs/runs.js'
import type { SingletonStatus } from '../src/status/read-status.js'
import {
  countRows,
  createEventsTable,
  insertRows,
  safetyViolations,
  statusOf,
} from './support/app-table.js'
import { waitFor } from './support/database.js'
import {
  failOnNodesLeftRunning,
  type NodeProcess,
  startNode,
  writeConfig,
} from './support/nodes.js'
import { definitionsOf, Holder, issueNow, LIMITS } from './support/run-harness.js'

// A server of its own, since these tests restart, crash and reconfigure it under the nodes.
let home: string
let dataDir: string
let port: number
let url: string
let pool: pg.Pool

beforeAll(async () => {
  home = await mkdtemp(join(tmpdir(), 'pg-singleton-restart-'))
  await chmod(home, 0o755) // as root, the server runs as the postgres user
  dataDir = join(home, 'pgdata')
  // Below the kernel's ephemeral range (32768 and up): a port there can be taken by some
  // client's outgoing connection, while the server is down or before it first starts.
  port = 20000 + (randomBytes(2).readUInt16BE(0) % 5000)
  url = (await ensureEmbedded(dataDir, port)).url
  pool = new pg.Pool({ connectionString: url, max: 2 })
  pool.on('error', () => {})
  await migrateToLatest(pool)
  await createEventsTable(pool)
})
afterAll(async () => {
  await pool?.end()
  if (dataDir) await stopEmbedded(dataDir)
  if (home) await rm(home, { recursive: true, force: true })
})
failOnNodesLeftRunning()

/**
 * The status once a holder that `accept`s holds with one node waiting, within `withinMs`;
 * fails at once when a node exits, and otherwise with the status and every node's output.
 */
async function holderAfter(
  event: string,
  name: string,
  nodes: NodeProcess[],
  accept: (row: SingletonStatus) => boolean,
  context = '',
  withinMs = 30_000,
): Promise<SingletonStatus> {
  return waitFor(
    `a holder after ${event}`,
    async () => {
      for (const node of nodes) {
        if (node.child.exitCode !== null) throw new Error(`${node.id} exited:\n${node.output()}`)
      }
      const row = await statusOf(pool, name).catch(() => undefined)
      return row?.nodeId && row.waitingNodes === 1 && accept(row) ? row : undefined
    },
    withinMs,
  ).catch(async (error: Error) => {
    const status = await statusOf(pool, name).catch((e) => e)
    throw new Error(
      `${error.message}; ${context ? `${context}; ` : ''}status: ${JSON.stringify(status)}\n${nodes.map((n) => `--- ${n.id}\n${n.output()}`).join('\n')}`,
    )
  })
}

/** A node config that cleans app.events every second, with `timings` over the defaults. */
const eventsConfig = (name: string, timings: object = {}) =>
  writeConfig({
    name,
    ...timings,
    policies: [
      {
        name: 'old',
        table: 'app.events',
        column: 'created_at',
        olderThan: '1 hour',
        every: '1 second',
      },
    ],
  })

describe('a database restart', () => {
  it('drops every session; the nodes live on, queue again, and one holds a higher epoch and cleans', async () => {
    const name = 'restart'
    const config = await eventsConfig(name)
    const nodes = [startNode(url, config, 'restart-1'), startNode(url, config, 'restart-2')]
    const before = await waitFor('a holder', async () => {
      const row = await statusOf(pool, name)
      return row?.nodeId && row.epoch !== null && row.waitingNodes === 1 ? row : undefined
    })

    expect(await stopEmbedded(dataDir)).toBe(true)
    await ensureEmbedded(dataDir, port)

    const after = await holderAfter(
      'the restart',
      name,
      nodes,
      (row) => (row.epoch ?? 0) > (before.epoch ?? 0),
    )
    expect(after.epoch).toBeGreaterThan(before.epoch ?? 0)
    for (const node of nodes) expect(node.child.exitCode, node.output()).toBeNull()

    await insertRows(pool, 200, '2 hours')
    await waitFor(
      'the rows outdated after the restart to be cleaned',
      async () => (await countRows(pool, 'true')) === 0,
      30_000,
    )

    for (const node of nodes) node.signal('SIGTERM')
    for (const node of nodes) expect((await node.exited).code, node.output()).toBe(0)
    expect(await safetyViolations(pool, name)).toEqual([])
  })
})

/**
 * Stops the server's WAL writer (SIGSTOP) and returns its pid: from then on a commit that
 * does not flush its WAL itself stays in the server's memory only, where a crash (SIGKILL
 * of the WAL writer: the server ends every session and recovers from the WAL on disk)
 * loses it. Stopped while it sleeps, never while it writes: stopped holding the WAL write
 * lock, it would hold up every flush.
 */
async function stopWalWriterAsleep(): Promise<number> {
  const { rows } = await pool.query<{ pid: number }>(
    `SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'`,
  )
  const walWriter = rows[0]?.pid
  if (!walWriter) throw new Error('no walwriter in pg_stat_activity')
  await waitFor('the WAL writer stopped while it sleeps', async () => {
    process.kill(walWriter, 'SIGSTOP')
    const { rows } = await pool.query<{ wait_event: string | null }>(
      'SELECT wait_event FROM pg_stat_activity WHERE pid = $1',
      [walWriter],
    )
    if (rows[0]?.wait_event === 'WalWriterMain') return true
    process.kill(walWriter, 'SIGCONT')
    await new Promise((resolve) => setTimeout(resolve, 5))
    return undefined
  })
  return walWriter
}

/** Names the synchronous standbys (null: none), and waits until the server has it. */
async function setStandbys(value: string | null): Promise<void> {
  // Before any standby is named: this commit must not wait for one.
  await pool.query('CREATE TABLE IF NOT EXISTS public.standby_probe (at timestamptz)')
  await pool.query(
    value === null
      ? 'ALTER SYSTEM RESET synchronous_standby_names'
      : `ALTER SYSTEM SET synchronous_standby_names = '${value}'`,
  )
  await pool.query('SELECT pg_reload_conf()')
  await waitFor('the setting in effect', async () => {
    const { rows } = await pool.query(`SELECT current_setting('synchronous_standby_names') AS v`)
    return rows[0]?.v === (value ?? '') ? true : undefined
  })
  if (value === null) return
  // A commit waits for a standby only once the checkpointer, too, has read the setting (it
  // sets the flag in shared memory that commits look at): until then one may return at
  // once, whatever the committing session reads. So: until a probe's commit waits.
  const probe = new pg.Client({ connectionString: url })
  await probe.connect()
  try {
    await waitFor('commits waiting for the standby', async () => {
      const commit = probe.query('INSERT INTO public.standby_probe VALUES (now())')
      const waited = await Promise.race([
        commit.then(() => false),
        new Promise<boolean>((resolve) => setTimeout(() => resolve(true), 200)),
      ])
      if (!waited) return undefined
      // Its wait cancelled: the commit is local, with a warning, and the probe goes on.
      await pool.query('SELECT pg_cancel_backend($1)', [
        (probe as unknown as { processID: number }).processID,
      ])
      await commit.catch(() => {})
      return true
    })
  } finally {
    await probe.end()
  }
}

describe('a server crash, with synchronous_commit off for the database', () => {
  it('never takes back an epoch bump once it was seen committed: the next holder gets a higher epoch', async () => {
    const name = 'crash'
    const { rows: db } = await pool.query<{ name: string }>('SELECT current_database() AS name')
    const database = pg.escapeIdentifier(db[0]?.name ?? '')
    // The app's choice for its own writes: commits return before their WAL is flushed.
    await pool.query(`ALTER DATABASE ${database} SET synchronous_commit = off`)
    const config = await eventsConfig(name)
    const nodes = [startNode(url, config, 'crash-1'), startNode(url, config, 'crash-2')]
    let walWriter: number | undefined
    try {
      const first = await waitFor('a holder', async () => {
        const row = await statusOf(pool, name)
        return row?.nodeId && row.epoch !== null && row.waitingNodes === 1 ? row : undefined
      })
      walWriter = await stopWalWriterAsleep()
      await pool.query('SELECT pg_terminate_backend($1)', [first.backendPid])
      const seen = await waitFor('the standby to take over', async () => {
        const row = await statusOf(pool, name)
        return row?.nodeId && (row.epoch ?? 0) > (first.epoch ?? 0) ? row : undefined
      })
      // A crash: the server ends every session and recovers from the WAL on disk.
      process.kill(walWriter, 'SIGKILL')
      walWriter = undefined
      const after = await holderAfter(
        'the crash',
        name,
        nodes,
        (row) => row.epoch !== null && row.backendPid !== seen.backendPid,
        `seen ${JSON.stringify(seen)}`,
      )
      expect(
        after.epoch,
        `epoch ${seen.epoch}, seen committed before the crash, was given again after it`,
      ).toBeGreaterThan(seen.epoch ?? 0)
      for (const node of nodes) node.signal('SIGTERM')
      for (const node of nodes) expect((await node.exited).code, node.output()).toBe(0)
      expect(await safetyViolations(pool, name)).toEqual([])
    } finally {
      if (walWriter) process.kill(walWriter, 'SIGCONT')
      for (const node of nodes) if (node.child.exitCode === null) node.signal('SIGKILL')
      await Promise.all(nodes.map((node) => node.exited))
      await waitFor('the server back', () =>
        pool.query(`ALTER DATABASE ${database} RESET synchronous_commit`).then(
          () => true,
          () => undefined,
        ),
      )
    }
  })
})

describe('a server crash while a new holder starts pg-boss', () => {
  it('is a lost session, not a holder unfit to hold: the node queues again at once, without the 30 s step-down cool-off', async () => {
    const name = 'crash-starting'
    const config = await eventsConfig(name)
    const nodes = [startNode(url, config, 'starting-1'), startNode(url, config, 'starting-2')]
    // Holds pg-boss's version table: a pg-boss that starts waits on it (it reads the version).
    const gate = new pg.Client({ connectionString: url })
    gate.on('error', () => {})
    try {
      const first = await waitFor('a holder', async () => {
        const row = await statusOf(pool, name)
        return row?.nodeId && row.epoch !== null && row.waitingNodes === 1 ? row : undefined
      })
      const standby = nodes.find((node) => node.id !== first.nodeId)
      if (!standby) throw new Error(`no node besides ${first.nodeId}`)
      await gate.connect()
      await gate.query('BEGIN')
      await gate.query('LOCK TABLE pgboss.version IN ACCESS EXCLUSIVE MODE')
      await pool.query('SELECT pg_terminate_backend($1)', [first.backendPid])
      const seen = await waitFor('the standby to take over', async () => {
        const row = await statusOf(pool, name)
        return row?.nodeId === standby.id && (row.epoch ?? 0) > (first.epoch ?? 0) ? row : undefined
      })
      await waitFor('its pg-boss to be starting, held at the version table', async () => {
        const { rows } = await pool.query(
          `SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'`,
          [`${standby.id} pg-boss`],
        )
        return rows.length > 0 ? true : undefined
      })
      const { rows } = await pool.query<{ pid: number }>(
        `SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'`,
      )
      if (!rows[0]) throw new Error('no walwriter in pg_stat_activity')
      // A crash: the server ends every session and recovers.
      process.kill(rows[0].pid, 'SIGKILL')
      // Well inside the 30 s a stepped-down node sits out before it queues again.
      const after = await holderAfter(
        'the crash',
        name,
        nodes,
        (row) => (row.epoch ?? 0) > (seen.epoch ?? 0),
        `seen ${JSON.stringify(seen)}`,
        20_000,
      )
      expect(after.waitingNodes).toBe(1)
      expect(standby.output()).not.toContain('pg-singleton migrate')
      for (const node of nodes) node.signal('SIGTERM')
      for (const node of nodes) expect((await node.exited).code, node.output()).toBe(0)
      expect(await safetyViolations(pool, name)).toEqual([])
    } finally {
      await gate.end().catch(() => {})
      for (const node of nodes) if (node.child.exitCode === null) node.signal('SIGKILL')
      await Promise.all(nodes.map((node) => node.exited))
      await waitFor('the server back', () =>
        pool.query('SELECT 1').then(
          () => true,
          () => undefined,
        ),
      )
    }
  })
})

describe('a server crash in the middle of a run, whose batches commit without waiting for their WAL flush', () => {
  it('takes back the last batches whole, deletes and accounts together; their rows are deleted again and the young ones kept', async () => {
    const name = 'crash-batches'
    const table = 'app.crash_events'
    await createEventsTable(pool, table)
    // Every delete leaves a row here, in the deleting transaction: it stands or falls with it.
    await pool.query(`CREATE TABLE app.crash_deleted (id bigint NOT NULL);
      CREATE FUNCTION app.log_crash_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO app.crash_deleted VALUES (OLD.id); RETURN OLD; END $$;
      CREATE TRIGGER log_delete AFTER DELETE ON ${table}
        FOR EACH ROW EXECUTE FUNCTION app.log_crash_delete();`)
    await insertRows(pool, 20_000, '2 hours', table)
    await insertRows(pool, 300, '10 minutes', table)
    const config = await writeConfig({
      name,
      batchPauseMs: 20,
      policies: [
        {
          name: 'old',
          table,
          column: 'created_at',
          olderThan: '1 hour',
          every: '1 second',
          batchSize: 40,
        },
      ],
    })
    const nodes = [
      startNode(url, config, 'crash-batches-1'),
      startNode(url, config, 'crash-batches-2'),
    ]
    const batchesOf = async (epoch: number) => {
      const { rows } = await pool.query<{ n: string }>(
        `SELECT count(*) AS n FROM pgsingleton.cleanup_batches b
           JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id AND r.singleton = $1
          WHERE b.epoch = $2`,
        [name, epoch],
      )
      return Number(rows[0]?.n)
    }
    let walWriter: number | undefined
    const crashes: string[] = []
    try {
      // A crash takes back only what was not yet on disk; any commit that waits for its
      // flush (a tick, pg-boss's own) puts every batch before it there. So a round that
      // lost no batch proves nothing either way: crash again, up to five times.
      for (let round = 1; round <= 5 && !crashes.some((c) => c.startsWith('lost')); round++) {
        const holder = await holderAfter(`round ${round}`, name, nodes, (row) => row.epoch !== null)
        const epoch = holder.epoch ?? 0
        await waitFor('batches of this epoch', async () => (await batchesOf(epoch)) >= 10, 30_000)
        walWriter = await stopWalWriterAsleep()
        await new Promise((resolve) => setTimeout(resolve, 150))
        const seen = await batchesOf(epoch)
        process.kill(walWriter, 'SIGKILL')
        walWriter = undefined
        await waitFor(
          'the server back',
          // Both of the pool's clients: each died with the server.
          () =>
            Promise.all([batchesOf(epoch), batchesOf(epoch)]).then(
              () => true,
              () => undefined,
            ),
          30_000,
        )
        const kept = await batchesOf(epoch)
        crashes.push(
          `${kept < seen ? 'lost' : 'kept'}: epoch ${epoch}, ${seen} batches seen, ${kept} after`,
        )
        if ((await countRows(pool, "created_at < now() - interval '1 hour'", table)) < 2_000) break
      }
      // A batch is whole or gone: every row gone was logged once by its batch, and every
      // batch's account is its deletes.
      const { rows: account } = await pool.query<{
        logged: string
        distinct_logged: string
        accounted: string
        back: string
      }>(
        `SELECT (SELECT count(*) FROM app.crash_deleted) AS logged,
                (SELECT count(DISTINCT id) FROM app.crash_deleted) AS distinct_logged,
                (SELECT coalesce(sum(b.rows_deleted), 0) FROM pgsingleton.cleanup_batches b
                   JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id AND r.singleton = $1) AS accounted,
                (SELECT count(*) FROM app.crash_deleted d JOIN ${table} e ON e.id = d.id) AS back`,
        [name],
      )
      expect(account[0], crashes.join('; ')).toMatchObject({
        logged: account[0]?.distinct_logged,
        accounted: account[0]?.logged,
        back: '0',
      })
      expect(
        crashes.some((c) => c.startsWith('lost')),
        `no crash took back a batch, so none was shown to commit without its flush: ${crashes.join('; ')}`,
      ).toBe(true)
      await waitFor(
        'the rows to be deleted again',
        async () => (await countRows(pool, "created_at < now() - interval '1 hour'", table)) === 0,
        60_000,
      )
      expect(await countRows(pool, 'true', table)).toBe(300)
      const { rows: gone } = await pool.query<{ n: string }>(
        'SELECT count(*) AS n FROM app.crash_deleted',
      )
      expect(Number(gone[0]?.n)).toBe(20_000)
      for (const node of nodes) node.signal('SIGTERM')
      for (const node of nodes) expect((await node.exited).code, node.output()).toBe(0)
      expect(await safetyViolations(pool, name)).toEqual([])
    } finally {
      if (walWriter) process.kill(walWriter, 'SIGCONT')
      for (const node of nodes) if (node.child.exitCode === null) node.signal('SIGKILL')
      await Promise.all(nodes.map((node) => node.exited))
    }
  })
})

/** A policy deleting `table`'s rows older than an hour, 40 a batch, as a node checks it. */
async function batchesOf40(table: string): Promise<PolicyDefinition> {
  const [definition] = await definitionsOf(pool, [
    {
      name: 'old',
      table,
      column: 'created_at',
      olderThan: '1 hour',
      every: '1 hour',
      batchSize: 40,
    },
  ])
  if (!definition) throw new Error('no definition')
  return definition
}

/**
 * `holder` (joined with `definition`) holds, issues its run and claims it, as a worker
 * does; `request` is a batch of that run from `cursor`, along the index.
 */
async function claimedRun(holder: Holder, definition: PolicyDefinition, table: string) {
  await holder.hold()
  const [issued] = await issueNow(pool, holder, definition)
  const claim = await runs.claim(pool, issued?.runId ?? '', holder.nodeId)
  if (typeof claim === 'string') throw new Error(claim)
  const { rows } = await pool.query<{ leaf: string }>(
    `SELECT l.leaf FROM pgsingleton.cleanup_leaves($1::regclass, 'created_at') l`,
    [table],
  )
  const leaf = Number(rows[0]?.leaf)
  const request = (cursor: unknown): runs.BatchRequest => ({
    leaf,
    strategy: 'index',
    cursor,
    limit: 40,
    span: 4,
    careful: false,
  })
  return { claim, request }
}

describe('a run whose last batches a server crash took back', () => {
  it('is not done: its record is short of what its batches returned, so it is retried from the start', async () => {
    const table = 'app.retaken_events'
    await createEventsTable(pool, table)
    // Nothing but this test commits on the server meanwhile (no autovacuum's analyze either).
    await pool.query(`ALTER TABLE ${table} SET (autovacuum_enabled = off)`)
    await insertRows(pool, 400, '2 hours', table)
    await insertRows(pool, 50, '10 minutes', table)
    const definition = await batchesOf40(table)
    const holder = await new Holder(url, 'retaken', 'retaken-a').join([definition])
    let walWriter: number | undefined
    try {
      const { claim, request } = await claimedRun(holder, definition, table)
      // The worker's own account of its batches, as run-cleanup keeps it.
      const returned = {
        rowsDeleted: claim.rowsDeleted,
        rowsSkipped: claim.rowsSkipped,
        batches: claim.batches,
      }
      let cursor: unknown = null
      const batch = async () => {
        const result = await runs.recordBatch(pool, LIMITS, claim, request(cursor))
        expect(result.outcome).toBe('deleted')
        cursor = result.cursor
        returned.rowsDeleted += result.deleted
        returned.rowsSkipped += result.skipped
        if (result.selected > 0) returned.batches += 1
      }
      for (let i = 0; i < 4; i++) await batch()
      // A checkpoint flushes the WAL: those four batches are on disk.
      await pool.query('CHECKPOINT')
      walWriter = await stopWalWriterAsleep()
      for (let i = 0; i < 3; i++) await batch()
      expect(await countRows(pool, "created_at < now() - interval '1 hour'", table)).toBe(120)
      process.kill(walWriter, 'SIGKILL')
      walWriter = undefined
      await waitFor('the server back', () =>
        Promise.all([countRows(pool, 'true', table), countRows(pool, 'true', table)]).then(
          () => true,
          () => undefined,
        ),
      )
      // The three batches after the WAL writer stopped are gone whole: rows and accounts.
      expect(await countRows(pool, "created_at < now() - interval '1 hour'", table)).toBe(240)
      const { rows: record } = await pool.query(
        'SELECT rows_deleted::int AS deleted, batches FROM pgsingleton.cleanup_runs WHERE id = $1',
        [claim.runId],
      )
      expect(record[0]).toEqual({ deleted: 160, batches: 4 })

      const completed = await runs.complete(pool, LIMITS, claim, returned)
      expect(completed.status).toBe('retaken')
      expect(completed).toMatchObject({
        reason: expect.stringContaining('160 rows deleted'),
        // What the run reports: what stayed deleted, not what the batches returned.
        record: { rowsDeleted: 160, rowsSkipped: 0, batches: 4 },
      })
      const { rows: after } = await pool.query(
        'SELECT status FROM pgsingleton.cleanup_runs WHERE id = $1',
        [claim.runId],
      )
      expect(after[0]?.status, 'the guard leaves the run to its caller, still running').toBe(
        'running',
      )
      // With the counts its record holds, the same run completes.
      expect(
        await runs.complete(pool, LIMITS, claim, { rowsDeleted: 160, rowsSkipped: 0, batches: 4 }),
      ).toEqual({ status: 'done' })
    } finally {
      if (walWriter) process.kill(walWriter, 'SIGCONT')
      await holder.close().catch(() => {})
    }
  })
})

describe('a batch, with a synchronous standby named', () => {
  it('waits for the standby, as the app commits do: a cleanup never runs ahead of it', async () => {
    const table = 'app.standby_events'
    await createEventsTable(pool, table)
    await insertRows(pool, 100, '2 hours', table)
    const definition = await batchesOf40(table)
    const holder = await new Holder(url, 'standby-batch', 'standby-a').join([definition])
    try {
      const { claim, request } = await claimedRun(holder, definition, table)
      const first = await runs.recordBatch(pool, LIMITS, claim, request(null))
      expect(first).toMatchObject({ outcome: 'deleted', deleted: 40 })
      await setStandbys('absent_standby')
      let answered = false
      const second = runs.recordBatch(pool, LIMITS, claim, request(first.cursor)).then((batch) => {
        answered = true
        return batch
      })
      await new Promise((resolve) => setTimeout(resolve, 1500))
      expect(answered, 'the batch returned without the standby').toBe(false)
      await setStandbys(null)
      expect(await second).toMatchObject({ outcome: 'deleted', deleted: 40 })
    } finally {
      await setStandbys(null)
      await holder.close().catch(() => {})
    }
  })
})

describe('an embedded server of another directory on the port', () => {
  it('is named in a clear error, not used as this directory’s, and the directory is left alone', async () => {
    const other = join(home, 'other-project', 'pgdata')
    await expect(ensureEmbedded(other, port)).rejects.toThrow(
      `port ${port} on 127.0.0.1 is taken by another embedded PostgreSQL, with its data in ${dataDir}`,
    )
    expect(existsSync(join(home, 'other-project'))).toBe(false)
    // Its own directory's server is reused as before.
    expect(await ensureEmbedded(dataDir, port)).toMatchObject({ started: false, port })
  })
})

describe('a server whose commits stall: a synchronous standby named, and none connected', () => {
  it('fences its holder, which cannot tell it from the standby promoted; once the standby is back a holder takes a higher epoch and cleans', async () => {
    const name = 'stall'
    // Tight timings: a heartbeat the standby does not confirm fences within 600 ms.
    const config = await eventsConfig(name, {
      heartbeatMs: 200,
      fenceAfterMs: 600,
      idleSessionTimeoutMs: 1000,
      lockWaitSliceMs: 500,
      deadConnectionAfterMs: 1000,
    })
    const nodes = [startNode(url, config, 'stall-1'), startNode(url, config, 'stall-2')]
    try {
      const before = await holderAfter('the start', name, nodes, (row) => row.epoch !== null)
      // From here every commit that wrote waits for a standby that never comes: the local
      // flush is done, the acknowledgement never. Seen from the primary, that standby may as
      // well have been promoted, with another node holding there: the holder must fence.
      await setStandbys('absent_standby')
      const holder = nodes.find((node) => node.id === before.nodeId)
      await waitFor(
        'the holder to fence itself',
        async () => holder?.output().includes('no heartbeat succeeded'),
        10_000,
      )
      await setStandbys(null)

      // The commits that waited go through, and a holder of a higher epoch cleans.
      await holderAfter(
        'the standby came back',
        name,
        nodes,
        (row) => (row.epoch ?? 0) > (before.epoch ?? 0),
      )
      await insertRows(pool, 200, '2 hours')
      await waitFor(
        'the rows outdated after the stall to be cleaned',
        async () => (await countRows(pool, 'true')) === 0,
        30_000,
      )
      for (const node of nodes) node.signal('SIGTERM')
      for (const node of nodes) expect((await node.exited).code, node.output()).toBe(0)
      expect(await safetyViolations(pool, name)).toEqual([])
    } finally {
      await setStandbys(null)
      for (const node of nodes) if (node.child.exitCode === null) node.signal('SIGKILL')
      await Promise.all(nodes.map((node) => node.exited))
    }
  })
})
