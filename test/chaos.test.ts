/**
 * The chaos suite: seeded trials of every fault a production cluster sees, each against
 * three CLI nodes (each behind a relay of its own, so that its path can die) cleaning two
 * tables that a feeder keeps filling with outdated, young and almost-outdated rows, and
 * running a task that writes through fenced(). What happened is judged from the
 * database's records only.
 *
 *   npm test               one trial of each fault (CHAOS_TRIALS=1)
 *   npm run test:chaos     CHAOS_TRIALS=20, and writes docs/reliability.md
 *   CHAOS_SEED=n           replays a run; CHAOS_FAULTS=a,b limits it to some faults
 */
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest'
import { ensureEmbedded, stopEmbedded } from '../dist/src/cli/embedded.js'
import { migrateToLatest } from '../src/db/migrate.js'
import { safetyViolations, statusOf, unfinishedOccurrences } from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { type NodeProcess, reapNodes, startNode, writeConfig } from './support/nodes.js'
import { PgBouncer } from './support/pgbouncer.js'
import { PartitionableProxy } from './support/tcp-proxy.js'

const TRIALS = Number(process.env.CHAOS_TRIALS ?? 1)
const SEED = Number(process.env.CHAOS_SEED ?? Math.floor(Math.random() * 2 ** 31))
const REPORT = process.env.CHAOS_REPORT
/** Short timings, so that trials are quick; the bounds below follow from them. */
const TIMING = {
  heartbeatMs: 200,
  fenceAfterMs: 600,
  idleSessionTimeoutMs: 1000,
  lockWaitSliceMs: 500,
  deadConnectionAfterMs: 1000,
  reconnectDelayMs: 50,
  batchPauseMs: 10,
}

interface Fault {
  /** Short, for table and singleton names. */
  id: string
  name: string
  /** The longest takeover allowed, for faults that take the holder away. */
  boundMs?: number
  /** A server of its own (a restart), or a pooler in front. */
  setup?: 'restart' | 'pgbouncer'
  /**
   * How the term of the holder the fault took away may read in pgsingleton.terms
   * (`reason/closed_by`): a holder killed outright cannot give its own account.
   */
  termEnds?: string[]
  run(trial: Trial): Promise<void>
  /** What else the fault's trial must show, beyond every trial's oracles. */
  verify?(trial: Trial): Promise<string[]>
}

interface Outcome {
  fault: string
  trial: number
  violations: string[]
  takeoverMs: number | null
}

const db = useTestDatabase()
const outcomes: Outcome[] = []
const random = mulberry32(SEED)
let restartServer: { url: string; dataDir: string; home: string } | undefined
let bouncer: PgBouncer | undefined

beforeAll(() => {
  process.stderr.write(
    `chaos: seed ${SEED}, ${TRIALS} trial(s) of each fault (replay with CHAOS_SEED=${SEED})\n`,
  )
})
afterAll(async () => {
  await bouncer?.stop()
  if (restartServer) {
    await stopEmbedded(restartServer.dataDir)
    await rm(restartServer.home, { recursive: true, force: true })
  }
  if (REPORT) await writeReport(REPORT)
})

class Trial {
  readonly name: string
  readonly proxies: PartitionableProxy[] = []
  readonly nodes: NodeProcess[] = []
  /** Node processes replaced by a restart, with how they exited. */
  readonly retired: { node: NodeProcess; code: number | null; signal: string | null }[] = []
  #config = ''
  readonly #nodeStarts: (() => NodeProcess)[] = []
  url = ''
  pool!: pg.Pool
  faultAt: Date | undefined
  epochBefore = 0
  #feeding = true
  #feeder: Promise<void> | undefined
  /** Table b's rows, as the watcher last found them: when each was last there, and by when it was gone. */
  readonly #watched = new Map<number, { createdAt: Date; seenAt: Date; goneBy?: Date }>()
  #watcher: Promise<void> | undefined

  constructor(
    readonly fault: Fault,
    readonly index: number,
  ) {
    this.name = `chaos-${fault.id}-${index}`
  }

  async start(): Promise<void> {
    this.url = this.fault.setup === 'restart' ? await ownServer() : db.url
    this.pool = new pg.Pool({ connectionString: this.url, max: 3 })
    this.pool.on('error', () => {})
    if (this.fault.setup === 'restart') await migrateToLatest(this.pool)
    for (const t of ['a', 'b']) {
      await this.pool.query(`CREATE SCHEMA IF NOT EXISTS chaos;
        CREATE TABLE chaos."${this.name}_${t}" (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
        CREATE INDEX ON chaos."${this.name}_${t}" (created_at);
        -- deleted_at: by when it was gone; seen_at: when it was last known to be there.
        CREATE TABLE IF NOT EXISTS chaos.deleted (tbl text, id bigint, created_at timestamptz, deleted_at timestamptz, seen_at timestamptz);
        CREATE INDEX IF NOT EXISTS deleted_tbl_id ON chaos.deleted (tbl, id);
        -- After each of the feeder's inserts has committed: every id up to upto is visible
        -- to a transaction that begins after committed_by (ids rise in commit order: one feeder).
        CREATE TABLE IF NOT EXISTS chaos.fed (tbl text, upto bigint, committed_by timestamptz);
        CREATE OR REPLACE FUNCTION chaos.log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO chaos.deleted VALUES (TG_TABLE_NAME, OLD.id, OLD.created_at, now(), now());
          RETURN OLD;
        END $$;`)
    }
    // Table a logs its deletes by trigger, which makes its batches select, delete and account
    // row by row. Table b is plain, as most apps' tables are, so its batches take the one-
    // statement paths; the watcher finds its deletes from outside.
    await this.pool.query(
      `CREATE TRIGGER log_delete AFTER DELETE ON chaos."${this.name}_a" FOR EACH ROW EXECUTE FUNCTION chaos.log_delete()`,
    )
    // What the task writes through fenced(), with the database clock at the write.
    await this.pool.query(`CREATE TABLE IF NOT EXISTS chaos.task_writes (
        singleton text, scheduled_for timestamptz, epoch bigint, node text, written_at timestamptz)`)
    const module = join(tmpdir(), `pg-singleton-chaos-task-${process.pid}-${this.name}.mjs`)
    await writeFile(
      module,
      `export default async function (ctx) {
         // Some work before the write, so that faults also land inside a task's run.
         await new Promise((resolve) => setTimeout(resolve, Math.random() * 300))
         await ctx.fenced((client) => client.query(
           'INSERT INTO chaos.task_writes VALUES ($1, $2, $3, $4, clock_timestamp())',
           [${JSON.stringify(this.name)}, ctx.scheduledFor, ctx.epoch, ctx.nodeId]))
       }\n`,
    )
    this.#feeder = this.#feed()
    this.#watcher = this.#watch()
    const target = new URL(this.url)
    const policies = ['a', 'b'].map((t) => ({
      name: `events-${t}`,
      table: `chaos.${this.name}_${t}`,
      column: 'created_at',
      olderThan: '1 hour',
      every: '1 second',
      batchSize: 40,
    }))
    // Every node works the queue, so faults hit workers that do not hold as well.
    const tasks = [{ name: 'mark', module, every: '1 second' }]
    this.#config = await writeConfig({
      name: this.name,
      policies,
      tasks,
      workQueue: 'always',
      ...TIMING,
    })
    for (let n = 1; n <= 3; n++) {
      const proxy = new PartitionableProxy(target.hostname, Number(target.port || 5432))
      const url = new URL(this.url)
      url.hostname = '127.0.0.1'
      url.port = String(await proxy.listen())
      this.proxies.push(proxy)
      const env: Record<string, string> = {}
      let nodeUrl = url.toString()
      if (this.fault.setup === 'pgbouncer') {
        // The pool and pg-boss through a transaction pooler, the lock session direct.
        env.PG_SINGLETON_LOCK_URL = nodeUrl
        nodeUrl = bouncer?.url ?? ''
      }
      const start = () => startNode(nodeUrl, this.#config, `${this.name}-node-${n}`, env)
      this.#nodeStarts.push(start)
      this.nodes.push(start())
    }
    await this.settled()
    this.epochBefore = (await statusOf(this.pool, this.name))?.epoch ?? 0
  }

  /** A holder, two nodes queued, and a run done. */
  async settled(): Promise<void> {
    await waitFor(
      'a holder, two queued, and a first run done',
      async () => {
        const row = await statusOf(this.pool, this.name)
        const { rows } = await this.pool.query(
          `SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs WHERE singleton = $1 AND status = 'done'`,
          [this.name],
        )
        return row?.nodeId && row.waitingNodes === 2 && rows[0].n > 0 ? true : undefined
      },
      30_000,
    )
  }

  /**
   * Stops a node with SIGTERM, as a deploy does, waits for it to exit, and starts it again
   * with the same node id and path.
   */
  async restart(node: NodeProcess): Promise<void> {
    const i = this.nodes.indexOf(node)
    node.signal('SIGTERM')
    const exit = await Promise.race([
      node.exited,
      new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), 30_000)),
    ])
    if (!exit) throw new Error(`${node.id} did not exit within 30 s of SIGTERM`)
    this.retired.push({ node, code: exit.code, signal: exit.signal })
    this.nodes[i] = (this.#nodeStarts[i] as () => NodeProcess)()
  }

  /** Outdated, young and almost-outdated rows, ten times a second. */
  async #feed(): Promise<void> {
    while (this.#feeding) {
      for (const t of ['a', 'b']) {
        await this.pool
          .query(
            `WITH fed AS (
               INSERT INTO chaos."${this.name}_${t}" (created_at, payload)
               SELECT now() - CASE WHEN g <= 12 THEN interval '2 hours'
                                   WHEN g <= 16 THEN interval '30 minutes'
                                   ELSE interval '59 minutes 59 seconds' END, 'x'
                 FROM generate_series(1, 20) AS g
               RETURNING id, created_at)
             SELECT max(id) AS upto, json_agg(json_build_array(id, created_at)) AS fed,
                    clock_timestamp() AS at FROM fed`,
          )
          .then(({ rows }) => {
            // Before its commit: a time at which the rows were there, or not yet deleted.
            if (t === 'b')
              for (const [id, createdAt] of rows[0].fed as [number, string][])
                this.#watched.set(Number(id), {
                  createdAt: new Date(createdAt),
                  seenAt: rows[0].at,
                })
            // A statement of its own, after the insert's commit returned.
            return this.pool.query('INSERT INTO chaos.fed VALUES ($1, $2, clock_timestamp())', [
              `${this.name}_${t}`,
              rows[0].upto,
            ])
          })
          .catch(() => {})
      }
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }

  /** Table b has no trigger: which of its rows are there, five times a second. */
  async #watch(): Promise<void> {
    while (this.#feeding) {
      await this.#look().catch(() => {})
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
  }

  async #look(): Promise<void> {
    // One statement: its now() is no later than the snapshot it reads.
    const { rows } = await this.pool.query(
      `SELECT now() AS at, coalesce(array_agg(id), '{}') AS ids FROM chaos."${this.name}_b"`,
    )
    const at: Date = rows[0].at
    const there = new Set((rows[0].ids as string[]).map(Number))
    for (const [id, row] of this.#watched) {
      if (row.seenAt >= at) continue
      // Back after a server crash took the delete back: it was not deleted after all.
      if (there.has(id)) Object.assign(row, { seenAt: at, goneBy: undefined })
      else row.goneBy ??= at
    }
  }

  /** What the watcher saw go, into chaos.deleted, as the trigger logs table a's. */
  async #recordWatched(): Promise<void> {
    await this.#look()
    const gone = [...this.#watched].filter(([, row]) => row.goneBy)
    await this.pool.query(
      `INSERT INTO chaos.deleted SELECT $1, g.id, g.created_at, g.gone_by, g.seen_at
         FROM unnest($2::bigint[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[])
           AS g(id, created_at, gone_by, seen_at)`,
      [
        `${this.name}_b`,
        gone.map(([id]) => id),
        gone.map(([, row]) => row.createdAt),
        gone.map(([, row]) => row.goneBy),
        gone.map(([, row]) => row.seenAt),
      ],
    )
    this.#watched.clear()
  }

  node(id: string | null | undefined): { node: NodeProcess; proxy: PartitionableProxy } {
    const i = this.nodes.findIndex((n) => n.id === id)
    if (i < 0) throw new Error(`no node ${id}`)
    return { node: this.nodes[i] as NodeProcess, proxy: this.proxies[i] as PartitionableProxy }
  }

  async holder() {
    return this.node((await statusOf(this.pool, this.name))?.nodeId)
  }

  async standby() {
    return this.node((await statusOf(this.pool, this.name))?.waitingNodeIds[0])
  }

  /** A node that is running a cleanup run now (not the holder, when there is such). */
  async worker(): Promise<{ node: NodeProcess; proxy: PartitionableProxy; nodeId: string }> {
    const holder = (await statusOf(this.pool, this.name))?.nodeId
    const row = await waitFor(
      'a run in flight',
      async () => {
        const { rows } = await this.pool.query(
          `SELECT node_id FROM pgsingleton.cleanup_runs WHERE singleton = $1 AND status = 'running' AND batches > 0
            ORDER BY node_id = $2, random() LIMIT 1`,
          [this.name, holder],
        )
        return rows[0]
      },
      20_000,
    )
    return { ...this.node(row.node_id), nodeId: row.node_id }
  }

  async markFault(): Promise<void> {
    this.faultAt = (
      await this.pool.query<{ now: Date }>('SELECT clock_timestamp() AS now')
    ).rows[0]?.now
  }

  /**
   * The next holder's epoch bump (the first after the fault, when more followed), measured
   * from the fault by the database clock.
   */
  async takeover(boundMs: number): Promise<number> {
    await waitFor(
      'a new holder',
      async () => {
        const r = await statusOf(this.pool, this.name)
        return r?.nodeId && (r.epoch ?? 0) > this.epochBefore ? r : undefined
      },
      Math.max(30_000, boundMs * 3),
    )
    const { rows } = await this.pool.query<{ acquired_at: Date }>(
      'SELECT acquired_at FROM pgsingleton.terms WHERE name = $1 AND epoch = $2',
      [this.name, this.epochBefore + 1],
    )
    return (rows[0]?.acquired_at.getTime() ?? 0) - (this.faultAt?.getTime() ?? 0)
  }

  /** Every row outdated when this is called is gone soon after: cleaning goes on. */
  async cleaningGoesOn(): Promise<void> {
    for (const t of ['a', 'b']) {
      const { rows } = await this.pool.query(`SELECT max(id) AS id FROM chaos."${this.name}_${t}"`)
      const upTo = rows[0].id ?? 0
      await waitFor(
        `table ${t} cleaned after the fault`,
        async () => {
          const { rows: left } = await this.pool.query(
            `SELECT count(*)::int AS n FROM chaos."${this.name}_${t}" WHERE id <= $1 AND created_at < now() - interval '1 hour' - interval '5 seconds'`,
            [upTo],
          )
          return left[0].n === 0 ? true : undefined
        },
        45_000,
      )
    }
  }

  /** The task goes on too: an occurrence after the fault is done and written. */
  async taskGoesOn(): Promise<void> {
    await waitFor(
      'a task write after the fault',
      async () => {
        const { rows } = await this.pool.query(
          'SELECT 1 FROM chaos.task_writes WHERE singleton = $1 AND written_at > $2 LIMIT 1',
          [this.name, this.faultAt ?? new Date(0)],
        )
        return rows[0] ? true : undefined
      },
      45_000,
    )
  }

  async violations(): Promise<string[]> {
    const problems = await safetyViolations(this.pool, this.name)
    const { rows: young } = await this.pool.query(
      `SELECT tbl, id, created_at, deleted_at FROM chaos.deleted
        WHERE tbl LIKE $1 AND created_at >= deleted_at - interval '1 hour' LIMIT 5`,
      [`${this.name}%`],
    )
    for (const row of young)
      problems.push(
        `row ${row.tbl}#${row.id} (created ${row.created_at.toISOString()}) was deleted at ${row.deleted_at.toISOString()}, younger than an hour`,
      )
    problems.push(...(await unfinishedOccurrences(this.pool, this.name)))
    problems.push(...(await this.#doneRunViolations()))
    problems.push(...(await this.#taskViolations()))
    problems.push(...(await this.#termViolations()))
    problems.push(...((await this.fault.verify?.(this)) ?? []))
    return problems
  }

  /**
   * A run recorded done, with no row skipped, left no row behind that it should have
   * deleted: every row committed before the run began, and older than the earliest cut-off
   * of its batches (cut-offs only rise, and every batch deletes below its own), was gone
   * when the run completed, that is, is neither in the table nor deleted after it.
   */
  async #doneRunViolations(): Promise<string[]> {
    const problems: string[] = []
    for (const t of ['a', 'b']) {
      const tbl = `${this.name}_${t}`
      const { rows } = await this.pool.query(
        `WITH done AS (
           SELECT r.id, r.started_at, r.finished_at, min(b.cutoff) AS cut,
                  (SELECT max(f.upto) FROM chaos.fed f
                    WHERE f.tbl = $3 AND f.committed_by < r.started_at) AS upto
             FROM pgsingleton.cleanup_runs r
             JOIN pgsingleton.cleanup_batches b ON b.run_id = r.id
            WHERE r.singleton = $1 AND r.policy = $2 AND r.status = 'done' AND r.rows_skipped = 0
            GROUP BY r.id)
         SELECT d.id AS run, d.finished_at, d.cut, x.id, x.deleted_at
           FROM done d
           CROSS JOIN LATERAL (
             (SELECT e.id, NULL::timestamptz AS deleted_at FROM chaos."${tbl}" e
               WHERE e.id <= d.upto AND e.created_at < d.cut LIMIT 1)
             UNION ALL
             (SELECT l.id, l.seen_at FROM chaos.deleted l
               WHERE l.tbl = $3 AND l.id <= d.upto AND l.created_at < d.cut
                 AND l.seen_at > d.finished_at LIMIT 1)
             LIMIT 1) x
          ORDER BY d.id LIMIT 5`,
        [this.name, `events-${t}`, tbl],
      )
      for (const row of rows)
        problems.push(
          `run ${row.run} of events-${t} is done (at ${row.finished_at.toISOString()}, cut-off ${row.cut.toISOString()}) but left row ${row.id}, ${row.deleted_at ? `still there at ${row.deleted_at.toISOString()}` : 'still there'}`,
        )
      const { rows: checked } = await this.pool.query(
        `SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs
          WHERE singleton = $1 AND policy = $2 AND status = 'done' AND rows_skipped = 0`,
        [this.name, `events-${t}`],
      )
      // A short trial may end before a run of a table is done: counted over the suite.
      doneRunsChecked += checked[0].n
    }
    return problems
  }

  /**
   * What the task wrote through fenced(): each occurrence once, exactly the occurrences
   * whose runs are done (the write and the completion commit together), and never after
   * a newer holder's term began.
   */
  async #taskViolations(): Promise<string[]> {
    const problems: string[] = []
    const { rows: twice } = await this.pool.query(
      `SELECT scheduled_for, count(*)::int AS n FROM chaos.task_writes WHERE singleton = $1
        GROUP BY scheduled_for HAVING count(*) > 1`,
      [this.name],
    )
    for (const row of twice)
      problems.push(`task occurrence ${row.scheduled_for.toISOString()} written ${row.n} times`)
    const { rows: unmatched } = await this.pool.query(
      `SELECT coalesce(w.scheduled_for, r.scheduled_for) AS at, w.scheduled_for IS NULL AS unwritten
         FROM (SELECT scheduled_for FROM chaos.task_writes WHERE singleton = $1) w
         FULL JOIN (SELECT scheduled_for FROM pgsingleton.cleanup_runs
                     WHERE singleton = $1 AND policy = 'mark' AND status = 'done') r
           -- ctx.scheduledFor is a JS Date: the slot cut to the millisecond
           ON date_trunc('milliseconds', r.scheduled_for) = w.scheduled_for
        WHERE w.scheduled_for IS NULL OR r.scheduled_for IS NULL LIMIT 5`,
      [this.name],
    )
    for (const row of unmatched)
      problems.push(
        row.unwritten
          ? `task run ${row.at.toISOString()} is done but its write is missing`
          : `task occurrence ${row.at.toISOString()} was written without a done run`,
      )
    const { rows: late } = await this.pool.query(
      `SELECT w.scheduled_for, w.epoch, w.written_at, t.epoch AS newer, t.acquired_at
         FROM chaos.task_writes w
         JOIN pgsingleton.terms t ON t.name = w.singleton AND t.epoch > w.epoch
                                 AND t.acquired_at <= w.written_at
        WHERE w.singleton = $1 LIMIT 5`,
      [this.name],
    )
    for (const row of late)
      problems.push(
        `task write of epoch ${row.epoch} at ${row.written_at.toISOString()} came after epoch ${row.newer} began at ${row.acquired_at.toISOString()}`,
      )
    const { rows: count } = await this.pool.query(
      'SELECT count(*)::int AS n FROM chaos.task_writes WHERE singleton = $1',
      [this.name],
    )
    if (count[0].n === 0) problems.push('the task wrote nothing')
    return problems
  }

  /**
   * The terms: one per epoch from the first, none overlapping the next, every one but the
   * last closed with a reason, and the faulted holder's term ended as the fault allows.
   */
  async #termViolations(): Promise<string[]> {
    const problems: string[] = []
    const { rows: terms } = await this.pool.query<{
      epoch: string
      acquired_at: Date
      ended_at: Date | null
      end_reason: string | null
      closed_by: string | null
    }>(
      'SELECT epoch, acquired_at, ended_at, end_reason, closed_by FROM pgsingleton.terms WHERE name = $1 ORDER BY epoch',
      [this.name],
    )
    const lease = await statusOf(this.pool, this.name)
    if (Number(terms.at(-1)?.epoch) !== lease?.epoch)
      problems.push(`the last term is epoch ${terms.at(-1)?.epoch}, the lease's ${lease?.epoch}`)
    terms.forEach((term, i) => {
      const next = terms[i + 1]
      if (Number(term.epoch) !== i + 1) problems.push(`term ${i + 1} is missing`)
      if (!next) return
      if (!term.ended_at || !term.end_reason || !term.closed_by)
        problems.push(`term ${term.epoch} was never closed though epoch ${next.epoch} followed`)
      else if (term.ended_at > next.acquired_at)
        problems.push(
          `term ${term.epoch} ended at ${term.ended_at.toISOString()}, after term ${next.epoch} began at ${next.acquired_at.toISOString()}`,
        )
    })
    const faulted = terms.find((t) => Number(t.epoch) === this.epochBefore)
    const allowed = this.fault.termEnds
    if (allowed && faulted) {
      const ended = `${faulted.end_reason}/${faulted.closed_by}`
      if (!allowed.includes(ended))
        problems.push(
          `the faulted holder's term ${faulted.epoch} ended as ${ended}, not ${allowed.join(' or ')}`,
        )
    }
    return problems
  }

  async finish(): Promise<void> {
    for (const proxy of this.proxies) proxy.heal()
    for (const node of this.nodes) node.signal('SIGCONT')
    this.#feeding = false
    await this.#feeder
    await this.#watcher
    if (this.#watched.size > 0) await this.#recordWatched()
  }

  async close(): Promise<void> {
    for (const node of this.nodes)
      if (node.child.exitCode === null && node.child.signalCode === null) node.signal('SIGTERM')
    await Promise.race([
      Promise.all(this.nodes.map((n) => n.exited)),
      new Promise((resolve) => setTimeout(resolve, 20_000)),
    ])
    await reapNodes()
    for (const proxy of this.proxies) await proxy.close()
    await this.pool.end()
  }
}

const pause = (min: number, max: number) =>
  new Promise((resolve) => setTimeout(resolve, min + random() * (max - min)))

const FAULTS: Fault[] = [
  {
    id: 'kill-holder',
    termEnds: ['lost/successor'],
    name: 'kill -9 of the holder',
    boundMs: 1000,
    async run(t) {
      const { node } = await t.holder()
      await pause(0, 1500)
      await t.markFault()
      node.signal('SIGKILL')
    },
  },
  {
    id: 'term-holder',
    termEnds: ['released/holder'],
    name: 'SIGTERM of the holder, restarted, three times over (a rolling deploy)',
    boundMs: 1000,
    async run(t) {
      for (let round = 1; round <= 3; round++) {
        if (round > 1) await t.settled()
        const { node } = await t.holder()
        // Anywhere in its work: a batch, a task, a tick, or idle between them.
        await pause(0, 1500)
        if (round === 1) await t.markFault()
        await t.restart(node)
      }
      await t.settled()
    },
    async verify(t) {
      const problems: string[] = []
      // Every stop handed over as a stop should: it exited cleanly, the hand-over did not
      // fail, and its term reads as its own account.
      for (const { node, code, signal } of t.retired) {
        if (code !== 0) problems.push(`${node.id} exited with ${code ?? signal} after SIGTERM`)
        if (node.output().includes('HAND_OVER_FAILED'))
          problems.push(`${node.id}'s hand-over failed: ${node.output().slice(-500)}`)
      }
      const { rows } = await t.pool.query(
        `SELECT epoch, end_reason, closed_by FROM pgsingleton.terms
          WHERE name = $1 AND epoch >= $2 AND ended_at IS NOT NULL ORDER BY epoch`,
        [t.name, t.epochBefore],
      )
      if (rows.length < 3) problems.push(`only ${rows.length} terms ended after the first stop`)
      for (const row of rows)
        if (`${row.end_reason}/${row.closed_by}` !== 'released/holder')
          problems.push(
            `term ${row.epoch} ended as ${row.end_reason}/${row.closed_by}, not released/holder`,
          )
      return problems
    },
  },
  {
    id: 'stop-holder',
    termEnds: ['lost/successor', 'lost/holder', 'fenced/holder', 'superseded/holder'],
    name: 'SIGSTOP/SIGCONT of the holder',
    boundMs: TIMING.idleSessionTimeoutMs + 1500,
    async run(t) {
      const { node } = await t.holder()
      await pause(0, 1500)
      await t.markFault()
      node.signal('SIGSTOP')
      await pause(2000, 4000)
      node.signal('SIGCONT')
    },
  },
  {
    id: 'stop-worker',
    name: 'SIGSTOP of a worker mid-batch',
    async run(t) {
      const { node } = await t.worker()
      await t.markFault()
      node.signal('SIGSTOP')
      await pause(2000, 4000)
      node.signal('SIGCONT')
    },
  },
  {
    id: 'cut-holder',
    termEnds: ['lost/successor', 'lost/holder', 'fenced/holder', 'superseded/holder'],
    name: 'silent partition of the holder (path dead)',
    boundMs: TIMING.idleSessionTimeoutMs + 1500,
    async run(t) {
      const { proxy } = await t.holder()
      await pause(0, 1500)
      await t.markFault()
      proxy.partition({ drop: true })
    },
  },
  {
    id: 'blip-holder',
    termEnds: ['lost/successor', 'lost/holder', 'fenced/holder', 'superseded/holder'],
    name: 'silent partition of the holder (path restored)',
    boundMs: TIMING.idleSessionTimeoutMs + 1500,
    async run(t) {
      const { proxy } = await t.holder()
      await pause(0, 1500)
      await t.markFault()
      proxy.partition()
      await pause(2000, 4000)
      proxy.heal()
    },
  },
  {
    id: 'cut-standby',
    termEnds: ['lost/successor'],
    name: 'silent partition of a standby, then kill -9 of the holder',
    boundMs: TIMING.lockWaitSliceMs + TIMING.deadConnectionAfterMs + 10_000,
    async run(t) {
      const { proxy } = await t.standby()
      proxy.partition({ drop: true })
      await pause(3000, 5000)
      proxy.heal()
      const { node } = await t.holder()
      await t.markFault()
      node.signal('SIGKILL')
    },
  },
  {
    id: 'cut-worker',
    name: 'silent partition of a worker mid-batch',
    async run(t) {
      const { proxy } = await t.worker()
      await t.markFault()
      proxy.partition({ drop: random() < 0.5 })
      await pause(2000, 4000)
      proxy.heal()
    },
  },
  {
    id: 'kill-lock',
    termEnds: ['lost/successor', 'lost/holder'],
    name: 'pg_terminate_backend of the lock session',
    boundMs: 1000,
    async run(t) {
      const row = await statusOf(t.pool, t.name)
      await pause(0, 1500)
      await t.markFault()
      await t.pool.query('SELECT pg_terminate_backend($1)', [row?.backendPid])
    },
  },
  {
    id: 'kill-worker',
    name: 'pg_terminate_backend of a worker mid-batch',
    async run(t) {
      const { nodeId } = await t.worker()
      await t.markFault()
      await t.pool.query(
        `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1`,
        [`${nodeId} pool`],
      )
    },
  },
  {
    id: 'restart',
    termEnds: ['lost/successor', 'lost/holder'],
    name: 'PostgreSQL restart',
    boundMs: 15_000,
    setup: 'restart',
    async run(t) {
      await pause(0, 1500)
      await t.markFault()
      const server = restartServer
      if (!server) throw new Error('no server of its own')
      await stopEmbedded(server.dataDir)
      await ensureEmbedded(server.dataDir, Number(new URL(server.url).port))
    },
  },
  {
    id: 'row-locks',
    name: 'app transactions holding row locks on outdated rows',
    async run(t) {
      const app = new pg.Client({ connectionString: t.url })
      app.on('error', () => {})
      await app.connect()
      try {
        await app.query('BEGIN')
        await app.query(
          `SELECT 1 FROM chaos."${t.name}_a" WHERE created_at < now() - interval '1 hour' AND id % 7 = 0 FOR UPDATE`,
        )
        await t.markFault()
        await pause(3000, 5000)
        await app.query('COMMIT')
      } finally {
        await app.end()
      }
    },
  },
  {
    id: 'pgbouncer',
    termEnds: ['lost/successor'],
    name: 'PgBouncer in transaction mode (pool pooled, lock session direct), kill -9 of the holder',
    boundMs: 1000,
    setup: 'pgbouncer',
    async run(t) {
      const { node } = await t.holder()
      await pause(0, 1500)
      await t.markFault()
      node.signal('SIGKILL')
    },
  },
]

const selected = process.env.CHAOS_FAULTS?.split(',').map((s) => s.trim())
/** The runs the done-run oracle looked at, over every trial: it must have had some. */
let doneRunsChecked = 0

describe(`chaos: ${TRIALS} seeded trial(s) of each fault`, () => {
  beforeAll(async () => {
    bouncer = await new PgBouncer(db.url, 'transaction', 8).start()
  })

  for (const fault of FAULTS.filter((f) => !selected || selected.some((s) => f.name.includes(s)))) {
    it(
      fault.name,
      async () => {
        for (let n = 1; n <= TRIALS; n++) {
          const trial = new Trial(fault, n)
          let takeoverMs: number | null = null
          const problems: string[] = []
          try {
            await trial.start()
            await fault.run(trial)
            if (fault.boundMs !== undefined) {
              takeoverMs = await trial.takeover(fault.boundMs)
              if (takeoverMs > fault.boundMs)
                problems.push(
                  `takeover took ${takeoverMs} ms, over the bound of ${fault.boundMs} ms`,
                )
            }
            await trial.cleaningGoesOn()
            await trial.taskGoesOn()
            await trial.finish()
            problems.push(...(await trial.violations()))
          } catch (error) {
            problems.push(`the trial failed: ${(error as Error).message}`)
          } finally {
            await trial.finish().catch(() => {})
            await trial.close().catch(() => {})
          }
          if (problems.length > 0) printNodeOutput(trial)
          outcomes.push({ fault: fault.name, trial: n, violations: problems, takeoverMs })
          expect(problems, `${fault.name}, trial ${n} (CHAOS_SEED=${SEED})`).toEqual([])
        }
      },
      120_000 * TRIALS,
    )
  }

  it('the done-run oracle had runs to check', () => {
    expect(doneRunsChecked).toBeGreaterThan(0)
  })
})

/**
 * A failed trial's story as its nodes told it (their logs, the retired ones' too), on
 * stderr: the database records what happened, the logs say why.
 */
function printNodeOutput(trial: Trial): void {
  for (const { id, output } of [...trial.retired.map((r) => r.node), ...trial.nodes])
    console.error(`--- ${trial.name}: ${id}\n${output()}`)
}

/** A server of its own for the restart trials: it is stopped and started under the nodes. */
async function ownServer(): Promise<string> {
  if (restartServer) return restartServer.url
  const home = await mkdtemp(join(tmpdir(), 'pg-singleton-chaos-'))
  await chmod(home, 0o755) // as root, the server runs as the postgres user
  const dataDir = join(home, 'pgdata')
  // Below the kernel's ephemeral range (32768 and up): while the server restarts, a port
  // there can be taken by some client's outgoing connection, and the server cannot listen.
  const port = 26000 + Math.floor(random() * 4000)
  const { url } = await ensureEmbedded(dataDir, port)
  restartServer = { url, dataDir, home }
  return url
}

function mulberry32(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

async function writeReport(path: string): Promise<void> {
  const label = inject('serverLabel')
  const section = [
    `## ${label}`,
    '',
    `Measured ${new Date().toISOString()} on ${cpus().length} × ${cpus()[0]?.model ?? 'unknown CPU'}, ${Math.round(totalmem() / 2 ** 30)} GiB RAM, Node ${process.version}; seed ${SEED} (CHAOS_SEED=${SEED} replays it).`,
    '',
    '| fault | trials | violations | worst takeover | median takeover | bound |',
    '|---|---|---|---|---|---|',
    ...FAULTS.filter((f) => outcomes.some((o) => o.fault === f.name)).map((fault) => {
      const mine = outcomes.filter((o) => o.fault === fault.name)
      const takeovers = mine
        .flatMap((o) => (o.takeoverMs === null ? [] : [o.takeoverMs]))
        .sort((a, b) => a - b)
      const median = takeovers[Math.floor(takeovers.length / 2)]
      const fmt = (ms: number | undefined) => (ms === undefined ? '-' : `${ms} ms`)
      return `| ${fault.name} | ${mine.length} | ${mine.reduce((n, o) => n + o.violations.length, 0)} | ${fmt(takeovers[takeovers.length - 1])} | ${fmt(median)} | ${fault.boundMs === undefined ? 'cleaning goes on' : `${fault.boundMs} ms`} |`
    }),
    '',
    ...outcomes.flatMap((o) => o.violations.map((v) => `- ${o.fault}, trial ${o.trial}: ${v}`)),
    '',
  ].join('\n')
  const header = `# Reliability: the chaos suite

\`npm run test:chaos\` runs seeded trials of each fault against three CLI nodes (each behind
a relay of its own, so that its path can die) cleaning two tables a feeder keeps filling
with outdated, young and almost-outdated rows, and running a task (every second) that
writes a row through \`fenced()\`, and writes this file. The oracles are the database's
records only: batches of different epochs never overlap and commit in epoch order
(\`cleanup_batches\`); no row younger than the cut-off is deleted (on the first table a
trigger logs every delete with its transaction's time, so its batches take the row-by-row
path; the second is plain, as most apps' tables are, so its batches take the one-statement
paths, and a watcher reads its ids five times a second: when each row was last there, and
by when it was gone); no occurrence is completed twice, and none is left
unfinished; a run recorded done with no row skipped left no row behind that was older
than its cut-off and committed before it began (the feeder logs, after each commit, the
ids it made visible); the task wrote each occurrence once, exactly the occurrences whose runs are
done, and never after a newer holder's term began (by the database clock); the terms
(\`pgsingleton.terms\`) run one per epoch, none ends after the next began, and the term
of the holder the fault took away ended as that fault allows (a holder killed with
\`kill -9\` is closed by its successor as \`lost\`; in a rolling deploy every stop exits
0, its hand-over does not fail, and every term it ends reads \`released\` by the holder);
after each fault a node holds within the bound, and every row outdated at the fault is
gone soon after. A takeover is timed from the fault to the first new epoch's bump, by the
database clock.

Timings of these trials (short, so that trials are quick): ${Object.entries(TIMING)
    .map(([k, v]) => `\`${k}\` ${v}`)
    .join(', ')}. The restart trials run on an embedded PostgreSQL 18 of their own.

`
  let existing = ''
  try {
    existing = await readFile(path, 'utf8')
  } catch {}
  const sections = existing
    .split(/^(?=## )/m)
    .filter((s) => s.startsWith('## ') && !s.startsWith(`## ${label}`))
  await writeFile(
    path,
    `${header}${[...sections.map((s) => s.trimEnd()), section.trimEnd()].join('\n\n')}\n`,
  )
}
