import pg from 'pg'
import {
  cpuSeconds,
  type Distribution,
  distribution,
  type NodeProcess,
  rssMiB,
  script,
  settlePhaseMs,
  startNode,
  waitUntil,
  writeConfig,
} from './support.js'

export interface IdleCost {
  /** Server connections a node holds, by role. */
  connections: { holder: number; standby: number }
  /** Statements per second a standby sends (its wait slices), from the server's counters. */
  standbyStatementsPerSecond: number
  /** CPU a standby process uses, as a share of one core. */
  standbyCpuShare: number
  rssMiB: { holder: number; standby: number }
}

const policy = (table: string) => ({
  name: 'noop',
  table,
  column: 'at',
  olderThan: '1 day',
  every: '1 minute',
})

/**
 * What an idle node costs: a holder and three standbys as CLI processes with the default
 * timings, measured after they settle (pools close after 10 s idle).
 */
export async function idleCost(url: string): Promise<IdleCost> {
  const pool = new pg.Pool({ connectionString: url, max: 1 })
  await pool.query('CREATE TABLE IF NOT EXISTS public.bench_idle (at timestamptz NOT NULL)')
  await pool.query('CREATE INDEX IF NOT EXISTS bench_idle_at ON public.bench_idle (at)')
  const config = await writeConfig({ name: 'bench-idle', policies: [policy('public.bench_idle')] })
  const nodes: NodeProcess[] = []
  const db = new URL(url).pathname.slice(1)
  const statements = async () =>
    Number(
      (
        await pool.query(
          'SELECT xact_commit + xact_rollback AS n FROM pg_stat_database WHERE datname = $1',
          [db],
        )
      ).rows[0].n,
    )
  const connections = async (node: string) =>
    Number(
      (
        await pool.query(
          `SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1 OR application_name LIKE $1 || ' %'`,
          [node],
        )
      ).rows[0].n,
    )
  try {
    nodes.push(startNode(url, config, 'idle-holder'))
    await waitUntil(
      async () => ((await connections('idle-holder')) > 0 ? true : undefined),
      30_000,
      100,
    )
    await new Promise((resolve) => setTimeout(resolve, 2000))
    for (let n = 1; n <= 3; n++) nodes.push(startNode(url, config, `idle-standby-${n}`))
    // Settled: start-up checks done, idle pool connections closed.
    await new Promise((resolve) => setTimeout(resolve, 15_000))
    const window = 30_000
    const standby = nodes[1] as NodeProcess
    const cpuFrom = cpuSeconds(standby.child.pid)
    await pool.query('SELECT pg_stat_force_next_flush()').catch(() => {})
    const from = await statements()
    const withStandbys = await new Promise<number>((resolve) =>
      setTimeout(async () => {
        await pool.query('SELECT pg_stat_force_next_flush()').catch(() => {})
        resolve(await statements())
      }, window),
    )
    const cpu = cpuSeconds(standby.child.pid) - cpuFrom
    const standbyConnections = await connections('idle-standby-1')
    const standbyRss = rssMiB(standby.child.pid)
    const holderConnections = await connections('idle-holder')
    const holderRss = rssMiB(nodes[0]?.child.pid)
    // The holder alone, for the difference.
    for (const node of nodes.slice(1)) node.child.kill('SIGTERM')
    await Promise.all(nodes.slice(1).map((n) => n.exited))
    await new Promise((resolve) => setTimeout(resolve, 3000))
    const alone = await statements()
    const aloneAfter = await new Promise<number>((resolve) =>
      setTimeout(async () => {
        await pool.query('SELECT pg_stat_force_next_flush()').catch(() => {})
        resolve(await statements())
      }, window),
    )
    const perStandby = (withStandbys - from - (aloneAfter - alone)) / 3 / (window / 1000)
    return {
      connections: { holder: holderConnections, standby: standbyConnections },
      standbyStatementsPerSecond: Math.max(0, perStandby),
      standbyCpuShare: cpu / (window / 1000),
      rssMiB: { holder: holderRss, standby: standbyRss },
    }
  } finally {
    for (const node of nodes) if (node.child.exitCode === null) node.child.kill('SIGTERM')
    await Promise.all(nodes.map((n) => n.exited))
    await pool.end()
  }
}

export interface ScaleResult {
  standbys: number
  connections: number
  failover: Distribution
}

/**
 * Failover with many standbys queued on one singleton: library instances, `perProcess`
 * to a process, and a holder of their kind. Each trial ends the holder's session the way
 * a crash does, from the server's side (`pg_terminate_backend`; a kill -9 of a process
 * would take its other instances too), and times the takeover from outside as the
 * failover benchmark does.
 */
export async function scaleFailover(
  url: string,
  standbys: number,
  trials: number,
  perProcess = 50,
): Promise<ScaleResult> {
  const pool = new pg.Pool({ connectionString: url, max: 2 })
  // An idle client's session ended by the server (seen once in a full run on PostgreSQL 15:
  // 57P01 on the poll's idle client) would otherwise end the whole benchmark; the next
  // query opens another, and fails plainly if the server is gone.
  pool.on('error', () => {})
  await pool.query('CREATE TABLE IF NOT EXISTS public.bench_scale (at timestamptz NOT NULL)')
  await pool.query('CREATE INDEX IF NOT EXISTS bench_scale_at ON public.bench_scale (at)')
  const name = `bench-scale-${standbys}`
  const source = `import { createSingleton } from 'pg-singleton'
    const nodes = []
    for (let i = 0; i < Number(process.env.COUNT); i++) {
      const node = createSingleton({ name: process.env.NAME, nodeId: process.env.PREFIX + '-' + i,
        connectionString: process.env.URL, logger: { debug() {}, info() {}, warn() {}, error() {} },
        policies: [{ name: 'noop', table: 'public.bench_scale', column: 'at', olderThan: '1 day', every: '1 hour' }] })
      node.on('error', () => {}); node.on('warning', () => {})
      await node.start(); nodes.push(node)
    }
    console.log('ready')
    process.on('SIGTERM', async () => { await Promise.all(nodes.map((n) => n.stop())); process.exit(0) })`
  const processes: ReturnType<typeof script>[] = []
  const total = standbys + 1
  try {
    for (let started = 0, p = 0; started < total; p++) {
      const count = Math.min(perProcess, total - started)
      const child = script(source, { URL: url, NAME: name, COUNT: String(count), PREFIX: `p${p}` })
      processes.push(child)
      await new Promise((resolve) => child.stdout?.once('data', resolve))
      started += count
    }
    const read = async () =>
      (
        await pool.query<{
          epoch: string | null
          waiting: number
          pid: number | null
          held_ms: number | null
        }>({
          // Prepared once, as in the failover section: the view's planning is not the takeover's.
          name: 'bench-scale-read',
          text: `SELECT epoch, waiting_nodes AS waiting, backend_pid AS pid,
                  (extract(epoch FROM now() - acquired_at) * 1000)::float8 AS held_ms
             FROM pgsingleton.status WHERE name = $1`,
          values: [name],
        })
      ).rows[0]
    const { rows: counted } = await pool.query(
      `SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name LIKE 'p%-%'`,
    )
    const times: number[] = []
    for (let trial = 0; trial < trials; trial++) {
      const phase = settlePhaseMs()
      const before = await waitUntil(
        async () => {
          const row = await read()
          return row?.epoch && row.pid && row.waiting >= standbys - 1 && (row.held_ms ?? 0) >= phase
            ? row
            : undefined
        },
        60_000,
        20,
      )
      const sent = performance.now()
      await pool.query('SELECT pg_terminate_backend($1)', [before.pid])
      await waitUntil(
        async () => {
          const row = await read()
          return row?.pid && Number(row.epoch) > Number(before.epoch) ? row : undefined
        },
        60_000,
        0,
      )
      times.push(performance.now() - sent)
    }
    return { standbys, connections: counted[0].n, failover: distribution(times) }
  } finally {
    for (const child of processes) child.kill('SIGTERM')
    await Promise.all(processes.map((c) => new Promise((resolve) => c.once('exit', resolve))))
    await pool.end()
  }
}
