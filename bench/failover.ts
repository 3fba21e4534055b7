import { readFile } from 'node:fs/promises'
import pg from 'pg'
import { lockKey } from '../src/lock/lock-key.js'
import {
  type Distribution,
  distribution,
  type NodeProcess,
  script,
  settlePhaseMs,
  startNode,
  waitUntil,
  writeConfig,
} from './support.js'

const EVENTS = ['kill -9', 'SIGTERM', 'pg_terminate_backend', 'SIGSTOP (paused)'] as const
/** Marks an event that struck the holder right after its takeover, while it started up. */
const EARLY = ', right after its takeover'

/** A kind of trial: its event, and whether it struck the holder right after its takeover. */
export function splitKind(kind: string): { event: string; early: boolean } {
  const early = kind.endsWith(EARLY)
  return { event: early ? kind.slice(0, -EARLY.length) : kind, early }
}

export interface FailoverResult {
  kinds: Record<string, Distribution>
  references: Record<string, Distribution>
  /**
   * For kill -9: when the killed process's server backend was gone (the kernel tearing the
   * process down, then the server seeing the socket closed), and from then to the new
   * epoch: the part that is pg-singleton's.
   */
  killBreakdown: { backendGone: Distribution; goneToNewEpoch: Distribution }
  /** How long the holders struck right after a takeover had held. */
  heldAtStrike?: Distribution
  /** The same events, seen by a session that LISTENs on channel pgsingleton instead of polling. */
  heard: Record<string, Distribution>
  /**
   * The same events, until the new holder's wait statement has returned (its node then
   * knows it holds), seen from outside in pg_stat_activity. Later than the epoch seen after
   * a hand-over, where the stopping holder bumped it.
   */
  returned?: Record<string, Distribution>
  /** The same first part for the reference's holder, a minimal process. */
  referenceBackendGone: Distribution
  /**
   * How long after a kill -9 the killed process's backend is gone, for a minimal holder
   * carrying more memory (MiB of touched buffers added): the kernel frees a process's memory
   * before it closes its sockets, so this part of a crash failover grows with the size of
   * the process the lock session lives in (an app that embeds the library, say).
   */
  goneByMemory?: { addedMiB: number; rssMiB: Distribution; gone: Distribution }[]
  /** Resident memory (MiB) and threads of each CLI node killed with -9, read just before. */
  killedNode?: { rssMiB: Distribution; threads: Distribution }
  /** The same for the reference's minimal holder. */
  referenceHolder?: { rssMiB: Distribution; threads: Distribution }
}

/** A process's resident memory (MiB) and thread count, from /proc. */
async function processSize(pid: number | undefined): Promise<{ rss: number; threads: number }> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '')
  return {
    rss: Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? Number.NaN) / 1024,
    threads: Number(/Threads:\s+(\d+)/.exec(status)?.[1] ?? Number.NaN),
  }
}

const sizes = (all: { rss: number; threads: number }[]) => ({
  rssMiB: distribution(all.map((x) => x.rss)),
  threads: distribution(all.map((x) => x.threads)),
})

/**
 * The kinds with a p99 threshold (a settled holder's kill -9 and SIGTERM) get at least this
 * many trials: of 30 the p99 is the slowest trial, and the p99 should not be the max.
 */
export const P99_TRIALS = 100

/**
 * Failover from outside: from the moment the event is sent to the moment another session
 * sees the new holder's bumped epoch in `pgsingleton.status` (so its commit is included),
 * polled in a tight loop. Three CLI nodes with the default timings. Each kind gets
 * `trials`, and the kinds with a p99 threshold (and the physical-limit reference beside
 * kill -9) at least `p99Trials`, all interleaved.
 */
export async function failover(
  url: string,
  trials: number,
  p99Trials = P99_TRIALS,
): Promise<FailoverResult> {
  const pool = new pg.Pool({ connectionString: url, max: 2 })
  await pool.query('CREATE TABLE IF NOT EXISTS public.bench_noop (at timestamptz NOT NULL)')
  const name = 'bench-failover'
  const config = await writeConfig({
    name,
    policies: [
      {
        name: 'noop',
        table: 'public.bench_noop',
        column: 'at',
        olderThan: '1 day',
        every: '1 hour',
      },
    ],
  })
  const watcher = new pg.Client({ connectionString: url })
  await watcher.connect()
  // A second observer: told of each epoch bump at its commit (NOTIFY in bump_epoch).
  const listener = new pg.Client({ connectionString: url })
  await listener.connect()
  const heardAt = new Map<number, number>()
  listener.on('notification', (message) => {
    const at = performance.now()
    const event = JSON.parse(message.payload ?? '{}') as { singleton?: string; epoch?: number }
    if (event.singleton === name && event.epoch !== undefined) heardAt.set(event.epoch, at)
  })
  await listener.query('LISTEN pgsingleton')
  const read = async (oldPid = 0) =>
    (
      await watcher.query<{
        node_id: string | null
        epoch: string | null
        waiting: number
        pid: number | null
        old_alive: boolean
        held_ms: number | null
        returned: boolean | null
      }>({
        // Prepared once: planning the view anew each time (about 2 ms here) would make every
        // look from outside that much later than the commit it is looking for.
        name: 'bench-failover-read',
        text: `SELECT node_id, epoch, waiting_nodes AS waiting, backend_pid AS pid,
                (extract(epoch FROM now() - acquired_at) * 1000)::float8 AS held_ms,
                EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $2) AS old_alive,
                (SELECT NOT (a.state = 'active' AND a.query LIKE '%wait_for_lock%')
                   FROM pg_stat_activity a WHERE a.pid = backend_pid) AS returned
           FROM pgsingleton.status WHERE name = $1`,
        values: [name, oldPid],
      })
    ).rows[0]
  const nodes: NodeProcess[] = []
  let next = 0
  const spawnNode = () => {
    const node = startNode(url, config, `bench-node-${++next}`)
    nodes.push(node)
  }
  const live = () => nodes.filter((n) => n.child.exitCode === null && n.child.signalCode === null)
  const gone: number[] = []
  const goneToEpoch: number[] = []
  const heard: Record<string, number[]> = {}
  const returned: Record<string, number[]> = {}
  const killedSizes: { rss: number; threads: number }[] = []
  // Each event strikes a settled holder, and the first three also one right after its
  // takeover (the previous trial's), while it starts up.
  const kinds: Record<string, number[]> = Object.fromEntries(
    [...EVENTS, ...EVENTS.filter((e) => e !== 'SIGSTOP (paused)').map((e) => `${e}${EARLY}`)].map(
      (kind) => [kind, []],
    ),
  )
  const wanted = (kind: string) =>
    kind === 'kill -9' || kind === 'SIGTERM' ? Math.max(trials, p99Trials) : trials
  const rounds = Math.max(...Object.keys(kinds).map(wanted))
  const heldAtStrike: number[] = []
  try {
    for (let i = 0; i < 3; i++) spawnNode()
    for (let trial = 0; trial < rounds; trial++) {
      for (const kind of Object.keys(kinds)) {
        if (trial >= wanted(kind)) continue
        const { event, early } = splitKind(kind)
        const phase = early ? 0 : settlePhaseMs()
        const before = await waitUntil(
          async () => {
            const row = await read()
            return row?.node_id &&
              row.epoch &&
              row.waiting === live().length - 1 &&
              (row.held_ms ?? 0) >= phase
              ? row
              : undefined
          },
          60_000,
          early ? 0 : 5,
        )
        if (early) heldAtStrike.push(before.held_ms ?? Number.NaN)
        const holder = nodes.find((n) => n.id === before.node_id) as NodeProcess
        if (kind === 'kill -9') killedSizes.push(await processSize(holder.child.pid))
        const sent = performance.now()
        if (event === 'kill -9') holder.child.kill('SIGKILL')
        else if (event === 'SIGTERM') holder.child.kill('SIGTERM')
        else if (event === 'SIGSTOP (paused)') holder.child.kill('SIGSTOP')
        else await pool.query('SELECT pg_terminate_backend($1)', [before.pid])
        let goneAt: number | undefined
        let seenAt: number | undefined
        await waitUntil(
          async () => {
            const row = await read(before.pid ?? 0)
            const now = performance.now()
            if (goneAt === undefined && row && !row.old_alive) goneAt = now
            if (!row?.node_id || Number(row.epoch) <= Number(before.epoch)) return undefined
            seenAt ??= now
            return row.returned ? row : undefined
          },
          60_000,
          0,
        )
        const returnedAt = performance.now()
        if (seenAt === undefined) throw new Error('the new epoch was never seen')
        kinds[kind]?.push(seenAt - sent)
        returned[kind] ??= []
        returned[kind].push(returnedAt - sent)
        const heardNew = [...heardAt].find(([epoch]) => epoch > Number(before.epoch))
        if (heardNew) {
          heard[kind] ??= []
          heard[kind].push(heardNew[1] - sent)
        }
        heardAt.clear()
        if (kind === 'kill -9' && goneAt !== undefined) {
          gone.push(goneAt - sent)
          goneToEpoch.push(seenAt - goneAt)
        }
        if (event === 'SIGSTOP (paused)') holder.child.kill('SIGCONT')
        if (event === 'kill -9' || event === 'SIGTERM') {
          await holder.exited
          spawnNode()
        }
      }
    }
  } finally {
    for (const node of live()) node.child.kill('SIGTERM')
    await Promise.all(nodes.map((n) => n.exited))
    await watcher.end()
    await listener.end()
    await pool.end()
  }
  const reference = await references(url, Math.max(trials, p99Trials), trials)
  const goneByMemory = []
  for (const addedMiB of [0, 100, 300]) goneByMemory.push(await teardown(url, trials, addedMiB))
  return {
    goneByMemory,
    kinds: Object.fromEntries(Object.entries(kinds).map(([k, v]) => [k, distribution(v)])),
    references: reference.latencies,
    killBreakdown: { backendGone: distribution(gone), goneToNewEpoch: distribution(goneToEpoch) },
    heldAtStrike: distribution(heldAtStrike),
    heard: Object.fromEntries(Object.entries(heard).map(([k, v]) => [k, distribution(v)])),
    returned: Object.fromEntries(Object.entries(returned).map(([k, v]) => [k, distribution(v)])),
    referenceBackendGone: reference.backendGone,
    killedNode: sizes(killedSizes),
    referenceHolder: reference.holderSizes,
  }
}

/** The first line a script prints. */
const firstLine = (child: ReturnType<typeof script>) =>
  new Promise<string>((resolve) =>
    child.stdout?.once('data', (chunk) => resolve(String(chunk).trim())),
  )

/**
 * The two references, in the same run: a bare `pg_advisory_lock` waiter woken by the
 * holder's kill -9 (the physical limit), and a waiter that polls `pg_try_advisory_lock`
 * every second (what most advisory-lock packages do). Each is seen from outside the same
 * way: the waiter's lock granted in pg_locks.
 */
async function references(
  url: string,
  bareTrials: number,
  pollingTrials: number,
): Promise<{
  latencies: Record<string, Distribution>
  backendGone: Distribution
  holderSizes: { rssMiB: Distribution; threads: Distribution }
}> {
  const watcher = new pg.Client({ connectionString: url })
  await watcher.connect()
  const key = lockKey('bench-reference').toString()
  const holderSource = `import pg from 'pg'
    const c = new pg.Client({ connectionString: process.env.URL }); await c.connect()
    const { rows } = await c.query('SELECT pg_backend_pid() AS pid, pg_advisory_lock($1)', [process.env.KEY]); console.log(rows[0].pid); setInterval(() => {}, 1e9)`
  const blockingSource = `import pg from 'pg'
    const c = new pg.Client({ connectionString: process.env.URL }); await c.connect()
    const { rows } = await c.query('SELECT pg_backend_pid() AS pid'); console.log(rows[0].pid)
    await c.query('SELECT pg_advisory_lock($1)', [process.env.KEY]); setInterval(() => {}, 1e9)`
  const pollingSource = `import pg from 'pg'
    const c = new pg.Client({ connectionString: process.env.URL }); await c.connect()
    const { rows } = await c.query('SELECT pg_backend_pid() AS pid'); console.log(rows[0].pid)
    for (;;) { const r = await c.query('SELECT pg_try_advisory_lock($1) AS got', [process.env.KEY]); if (r.rows[0].got) break; await new Promise((s) => setTimeout(s, 1000)) }
    setInterval(() => {}, 1e9)`
  const gone: number[] = []
  const holderSizes: { rss: number; threads: number }[] = []
  const out: Record<string, number[]> = {
    'a bare pg_advisory_lock waiter (the physical limit)': [],
    'a waiter polling pg_try_advisory_lock every second': [],
  }
  try {
    for (const [label, source, trials] of [
      ['a bare pg_advisory_lock waiter (the physical limit)', blockingSource, bareTrials],
      ['a waiter polling pg_try_advisory_lock every second', pollingSource, pollingTrials],
    ] as const) {
      for (let trial = 0; trial < trials; trial++) {
        const env = { URL: url, KEY: key }
        const holder = script(holderSource, env)
        const holderPid = await firstLine(holder)
        const waiter = script(source, env)
        const pid = await firstLine(waiter)
        // The waiter is queued (or polling) before the holder dies, at a random phase of its polling.
        await new Promise((resolve) => setTimeout(resolve, 200 + Math.random() * 1000))
        if (label.startsWith('a bare')) holderSizes.push(await processSize(holder.pid))
        const sent = performance.now()
        holder.kill('SIGKILL')
        let goneAt: number | undefined
        await waitUntil(
          async () => {
            const { rows } = await watcher.query({
              name: 'bench-reference-read',
              text: `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1) AS granted,
                      EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $2) AS old_alive`,
              values: [Number(pid), Number(holderPid)],
            })
            if (goneAt === undefined && !rows[0].old_alive) goneAt = performance.now()
            return rows[0].granted ? true : undefined
          },
          10_000,
          0,
        )
        out[label]?.push(performance.now() - sent)
        if (label.startsWith('a bare') && goneAt !== undefined) gone.push(goneAt - sent)
        waiter.kill('SIGKILL')
        await new Promise((resolve) => waiter.once('exit', resolve))
      }
    }
  } finally {
    await watcher.end()
  }
  return {
    latencies: Object.fromEntries(Object.entries(out).map(([k, v]) => [k, distribution(v)])),
    backendGone: distribution(gone),
    holderSizes: sizes(holderSizes),
  }
}

/**
 * A minimal holder with `addedMiB` of touched memory, killed with -9, `trials` times: how
 * long until the server shows its backend gone (the moment its lock is free to grant).
 */
async function teardown(
  url: string,
  trials: number,
  addedMiB: number,
): Promise<{ addedMiB: number; rssMiB: Distribution; gone: Distribution }> {
  const watcher = new pg.Client({ connectionString: url })
  await watcher.connect()
  const source = `import pg from 'pg'
    const ballast = []; for (let i = 0; i < Number(process.env.MIB); i++) ballast.push(Buffer.alloc(1 << 20, 1))
    const c = new pg.Client({ connectionString: process.env.URL }); await c.connect()
    const { rows } = await c.query('SELECT pg_backend_pid() AS pid'); console.log(rows[0].pid); setInterval(() => ballast.length, 1e9)`
  const gone: number[] = []
  const rss: number[] = []
  try {
    for (let trial = 0; trial < trials; trial++) {
      const holder = script(source, { URL: url, MIB: String(addedMiB) })
      const exited = new Promise((resolve) => holder.once('exit', resolve))
      const pid = Number(await firstLine(holder))
      // Settled, as a holder that has held a while is.
      await new Promise((resolve) => setTimeout(resolve, 200))
      rss.push((await processSize(holder.pid)).rss)
      const sent = performance.now()
      holder.kill('SIGKILL')
      await waitUntil(
        async () => {
          const { rows } = await watcher.query({
            name: 'bench-teardown-read',
            text: 'SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1) AS alive',
            values: [pid],
          })
          return rows[0].alive ? undefined : true
        },
        10_000,
        0,
      )
      gone.push(performance.now() - sent)
      await exited
    }
  } finally {
    await watcher.end()
  }
  return { addedMiB, rssMiB: distribution(rss), gone: distribution(gone) }
}
