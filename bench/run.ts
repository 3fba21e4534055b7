/**
 * `npm run bench`: the numbers behind the README, measured on this machine with real
 * processes and a real PostgreSQL, each beside its reference in the same run. Writes
 * bench/results/<date>-postgresql-<major>.json and bench/REPORT-postgresql-<major>.md after
 * each section; a section not measured in this run (left out, or failed: the run goes on
 * and exits 1) keeps its figures from the latest results, with their commit and time.
 *
 *   DATABASE_URL=...   bench against that server (scratch databases are made on it);
 *                      without it, against the embedded PostgreSQL under ./.pg-singleton.
 *   BENCH_TRIALS=N     trials of each latency (default 30).
 *   BENCH_P99_TRIALS=N at least this many of the failover kinds with a p99 threshold, and of
 *                      the physical-limit reference beside them (default 100).
 *   BENCH_SECTIONS=a,b only some of: failover, cleanup, steady, partitions, cost, scale, growth.
 */
import { execFileSync } from 'node:child_process'
import { chmod, mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import pg from 'pg'
import { resolveConnection } from '../src/cli/connection.js'
import { ensureEmbedded, stopEmbedded } from '../src/cli/embedded.js'
import { migrateToLatest } from '../src/db/migrate.js'
import {
  type CleanupComparison,
  cleanupVersusBulk,
  type PartitionComparison,
  partitionDrop,
} from './cleanup.js'
import { type IdleCost, idleCost, type ScaleResult, scaleFailover } from './cost.js'
import { type FailoverResult, failover, P99_TRIALS, splitKind } from './failover.js'
import { type Distribution, distribution, machine, ms, scratchDatabase } from './support.js'

const TRIALS = Number(process.env.BENCH_TRIALS ?? 30)
const FAILOVER_P99_TRIALS = Number(process.env.BENCH_P99_TRIALS ?? P99_TRIALS)
/** The share of rows outdated in the steady-state section: under the 10 % at which a run walks pages. */
const STEADY_SHARE = 0.05
const ALL_SECTIONS = ['failover', 'cleanup', 'steady', 'partitions', 'cost', 'scale', 'growth']
const SECTIONS = new Set(process.env.BENCH_SECTIONS?.split(',') ?? ALL_SECTIONS)
/** How many of each round trip `roundTrips` times. */
const ROUND_TRIPS = 200

/** The commit being measured, with "+changes" when the working tree differs from it. */
function currentCommit(): string {
  try {
    const head = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim()
    const dirty = execFileSync(
      'git',
      // The reports and results a run writes are its output, not a change to what it measures.
      [
        'status',
        '--porcelain',
        '--',
        'src',
        'bench',
        'migrations',
        ':!bench/results',
        ':!bench/REPORT-*',
      ],
      {
        encoding: 'utf8',
      },
    ).trim()
    return dirty ? `${head}+changes` : head
  } catch {
    return 'unknown'
  }
}

interface RoundTrips {
  read: Distribution
  commit: Distribution
}

/**
 * The server's round trips, timed from this process over one connection: `SELECT 1`, and
 * a one-row INSERT in its own transaction (its commit waits for the WAL flush, with the
 * server's synchronous_commit). A property of the machine and server, read before each
 * section, so that reports from different machines can be set side by side.
 */
async function roundTrips(url: string): Promise<RoundTrips> {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  try {
    await client.query('CREATE TABLE public.bench_round_trips (at timestamptz)')
    const time = async (sql: string) => {
      const spent: number[] = []
      for (let i = 0; i < ROUND_TRIPS; i++) {
        const started = performance.now()
        await client.query(sql)
        spent.push(performance.now() - started)
      }
      return distribution(spent)
    }
    const read = await time('SELECT 1')
    const commit = await time('INSERT INTO public.bench_round_trips VALUES (now())')
    await client.query('DROP TABLE public.bench_round_trips')
    return { read, commit }
  } finally {
    await client.end()
  }
}

interface Section {
  measuredAt: string
  /** The commit the section was measured on (with "+changes" when the tree had changes). */
  commit: string
  /**
   * The server's round trips just before the section (absent in older results): a read, and
   * a one-row insert with its commit, which waits for the WAL flush. Our cleanup pays a
   * commit per batch and the bulk DELETE one, so machines whose commits differ differ there.
   */
  roundTrips?: RoundTrips
}

interface Results {
  machine: object
  /** When, and on which commit, each section present was measured. */
  sections?: Record<string, Section>
  failover?: FailoverResult
  cleanup?: CleanupComparison[]
  partitions?: PartitionComparison
  cost?: IdleCost
  scale?: (ScaleResult & { server: string })[]
  steady?: CleanupComparison[]
  growth?: CleanupComparison[]
}

async function main(): Promise<void> {
  const { url: serverUrl } = await resolveConnection((line) => process.stderr.write(`${line}\n`), {
    embedded: !process.env.DATABASE_URL,
  })
  const say = (line: string) => process.stderr.write(`bench: ${line}\n`)
  const admin = new pg.Client({ connectionString: serverUrl })
  await admin.connect()
  const version = (await admin.query(`SELECT current_setting('server_version') AS v`)).rows[0]
    .v as string
  const maxConnections = Number((await admin.query('SHOW max_connections')).rows[0].max_connections)
  await admin.end()
  const major = version.split('.')[0] ?? 'unknown'
  const results: Results = { machine: machine(version).json }
  const fresh = async () => {
    const db = await scratchDatabase(serverUrl)
    const pool = new pg.Pool({ connectionString: db.url, max: 1 })
    await migrateToLatest(pool)
    await pool.end()
    return db
  }
  const commit = currentCommit()
  results.sections = {}
  const date = new Date().toISOString().slice(0, 10)
  const dir = fileURLToPath(new URL('../../bench/results/', import.meta.url))
  await mkdir(dir, { recursive: true })
  // The latest results of this server, read once, before this run writes any: a section
  // this run does not measure (left out of BENCH_SECTIONS, not reached yet, or failed) keeps
  // its figures from there, with when and on which commit they were measured.
  const latest = (await readdir(dir))
    .filter((file) => file.endsWith(`-postgresql-${major}.json`))
    .sort()
    .at(-1)
  const base = latest
    ? (JSON.parse(await readFile(join(dir, latest), 'utf8')) as Results)
    : undefined
  const baseAt = base
    ? ((base.machine as { measuredAt?: string }).measuredAt ?? latest?.slice(0, 10) ?? '')
    : ''
  /** Writes the results so far (and the report): after each section, so a run that dies keeps what it measured. */
  const save = async (): Promise<string> => {
    const merged: Results = { ...results, sections: { ...results.sections } }
    for (const key of ALL_SECTIONS) {
      const k = key as keyof Results
      if (merged[k] !== undefined || base?.[k] === undefined) continue
      ;(merged as unknown as Record<string, unknown>)[k] = base[k]
      ;(merged.sections as Record<string, Section>)[key] = base.sections?.[key] ?? {
        measuredAt: baseAt,
        commit: 'not recorded',
      }
    }
    // Each written whole or not at all: a run killed mid-write leaves the earlier file.
    const put = async (file: string, text: string) => {
      await writeFile(`${file}.tmp`, text)
      await rename(`${file}.tmp`, file)
    }
    const report = render(version, merged)
    await put(join(dir, `${date}-postgresql-${major}.json`), `${JSON.stringify(merged, null, 2)}\n`)
    await put(
      fileURLToPath(new URL(`../../bench/REPORT-postgresql-${major}.md`, import.meta.url)),
      report,
    )
    return report
  }
  const section = async <T>(
    key: string,
    work: (url: string) => Promise<T>,
  ): Promise<T | undefined> => {
    if (!SECTIONS.has(key)) return undefined
    say(`${key}...`)
    let db: Awaited<ReturnType<typeof fresh>> | undefined
    let value: T
    try {
      db = await fresh()
      ;(results.sections as Record<string, Section>)[key] = {
        measuredAt: new Date().toISOString(),
        commit,
        roundTrips: await roundTrips(db.url),
      }
      value = await work(db.url)
    } catch (error) {
      // The other sections still run; this one keeps its earlier figures, if any.
      say(`${key} failed: ${error instanceof Error ? (error.stack ?? error.message) : error}`)
      delete (results.sections as Record<string, Section>)[key]
      process.exitCode = 1
      return undefined
    } finally {
      await db?.drop().catch((error) => say(`${key}: its scratch database stays: ${error}`))
    }
    ;(results as unknown as Record<string, unknown>)[key] = value
    // Not the section's failure: its figures stay in this run's results, for the next save.
    await save().catch((error) => {
      say(`could not write the results after ${key}: ${error}`)
      process.exitCode = 1
    })
    return value
  }

  results.failover = await section('failover', (url) => failover(url, TRIALS, FAILOVER_P99_TRIALS))
  results.cleanup = await section('cleanup', async (url) => {
    const out: CleanupComparison[] = []
    for (const shuffled of [false, true]) {
      for (const withLoad of [false, true])
        out.push(await cleanupVersusBulk(url, 1_000_000, shuffled, withLoad))
      // And as a deployed app's node does it: one node kept running, each run asked for.
      out.push(await cleanupVersusBulk(url, 1_000_000, shuffled, true, 0.7, 10, true))
    }
    return out
  })
  results.steady = await section('steady', async (url) => {
    const out: CleanupComparison[] = []
    for (const keptNode of [false, true])
      for (const shuffled of [false, true])
        out.push(
          await cleanupVersusBulk(url, 1_000_000, shuffled, false, STEADY_SHARE, 3, keptNode),
        )
    return out
  })
  results.partitions = await section('partitions', (url) => partitionDrop(url, 1_000_000))
  results.cost = await section('cost', (url) => idleCost(url))
  results.scale = await section('scale', async (url) => {
    const out: (ScaleResult & { server: string })[] = []
    // This server, as far as its max_connections allows.
    const room = Math.min(200, maxConnections - 20)
    for (const standbys of [10, room].filter((n, i, all) => all.indexOf(n) === i && n > 0))
      out.push({ ...(await scaleFailover(url, standbys, TRIALS)), server: `PostgreSQL ${version}` })
    if (room < 200) {
      // A server of its own with room for 200 standbys.
      const home = await mkdtemp(join(tmpdir(), 'pg-singleton-bench-scale-'))
      await chmod(home, 0o755)
      const server = await ensureEmbedded(
        join(home, 'pgdata'),
        // Below the kernel's ephemeral ports (32768 to 60999), which any outgoing connection may hold.
        16000 + Math.floor(Math.random() * 2000),
        {
          max_connections: '300',
        },
      )
      try {
        const db = await scratchDatabase(server.url)
        const pool = new pg.Pool({ connectionString: db.url, max: 1 })
        await migrateToLatest(pool)
        await pool.end()
        for (const standbys of [100, 200])
          out.push({
            ...(await scaleFailover(db.url, standbys, TRIALS)),
            server: 'embedded PostgreSQL 18 (max_connections 300)',
          })
        await db.drop()
      } finally {
        await stopEmbedded(join(home, 'pgdata'))
        await rm(home, { recursive: true, force: true })
      }
    }
    return out
  })
  results.growth = await section('growth', async (url) => {
    const out: CleanupComparison[] = []
    for (const rows of [100_000, 1_000_000, 5_000_000])
      out.push(await cleanupVersusBulk(url, rows, false, false, 0.7, 1))
    return out
  })

  const report = await save()
  process.stdout.write(report)
}

const size = (x?: { rssMiB: Distribution; threads: Distribution }) =>
  x
    ? ` (${x.rssMiB.p50.toFixed(0)} MiB resident, ${x.threads.p50} threads, medians read just before the kill)`
    : ''
const dist = (d: Distribution) => `${ms(d.p50)} | ${ms(d.p95)} | ${ms(d.p99)} | ${ms(d.max)}`
const s = (v: number) => `${v.toFixed(2)} s`
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(0)} MiB`
const yes = (ok: boolean) => (ok ? 'met' : '**not met**')

/** How many trials the failover section ran, and why some kinds ran more. */
function trialCounts(f: FailoverResult): string {
  const counts = [...Object.values(f.kinds), ...Object.values(f.references)].map((d) => d.n)
  const fewest = Math.min(...counts)
  const most = Math.max(...counts)
  if (fewest === most) return `${most} trials of each.`
  const rank = most - Math.ceil(0.99 * most) + 1
  const slowest =
    rank === 1
      ? 'the slowest too'
      : `the ${rank === 2 ? 'second' : rank === 3 ? 'third' : `${rank}th`} slowest`
  return `${fewest} trials of each kind, and ${most} of a settled holder's kill -9 and SIGTERM (the two with a p99 threshold) and of the bare waiter beside them: the p99 of ${fewest} trials is the slowest one, the p99 of ${most} ${slowest}.`
}

function render(version: string, r: Results): string {
  const lines = [
    '# pg-singleton benchmark report',
    '',
    (r.machine as { measuredAt: string }) && machineText(version, r),
    '',
  ]
  const thresholds: string[] = []
  if (r.failover) {
    lines.push(
      '## Failover',
      '',
      `${trialCounts(r.failover)} Three CLI nodes with the default timings. From the moment the event is sent to the moment another session sees the new holder's bumped epoch in \`pgsingleton.status\` (its commit included), polled from outside in a tight loop by a prepared statement (planning the view anew for each look takes about 2 ms here). Each event strikes a settled holder, one that has held for a random 0.5 to 5.5 s (a whole cycle of its scheduler's ticks, which are at most 5 s apart), and the first three events also strike a holder right after its takeover${r.failover.heldAtStrike ? ` (it had held ${ms(r.failover.heldAtStrike.p50, 0)} at the median)` : ''}, while it starts pg-boss and runs its first fenced tick: the next epoch bump waits for a fenced write in flight.`,
      '',
      `| event | trials | p50 | p95 | p99 | max | p50 / p99 heard by a LISTENing session |${r.failover.returned ? " p50 / p99 the new holder's wait statement returned |" : ''}`,
      `|---|---|---|---|---|---|---|${r.failover.returned ? '---|' : ''}`,
      ...Object.entries(r.failover.kinds).map(([k, d]) => {
        const h = r.failover?.heard[k]
        const back = r.failover?.returned?.[k]
        const { event, early } = splitKind(k)
        const label = `${event} of the holder${early ? ', right after its takeover' : ''}`
        return `| ${label} | ${d.n} | ${dist(d)} | ${h ? `${ms(h.p50)} / ${ms(h.p99)}` : '-'} |${r.failover?.returned ? ` ${back ? `${ms(back.p50)} / ${ms(back.p99)}` : '-'} |` : ''}`
      }),
      ...Object.entries(r.failover.references).map(
        ([k, d]) =>
          `| reference: ${k}, holder killed | ${d.n} | ${dist(d)} | - |${r.failover?.returned ? ' - |' : ''}`,
      ),
      '',
      'A paused holder keeps its lock until the server ends its silent session (`idleSessionTimeoutMs`, 3 s, counted from its last heartbeat).',
      ...(r.failover.returned
        ? [
            '',
            "After a SIGTERM the stopping holder bumps the next holder's epoch in its hand-over statement: from that commit the database names the next holder and fences the old epoch. The new holder's node learns it when its own wait statement, woken by the grant, has taken the epoch and returned (the last column, seen from outside in `pg_stat_activity`, polled with the status); after a crash the new holder bumps the epoch itself, in that statement.",
          ]
        : []),
      '',
      `Where a crash failover goes: the server frees the lock when the killed process's backend ends, which takes as long as the kernel needs to tear the process down (its memory is freed before its sockets are closed) and close its socket; a CLI node${size(r.failover.killedNode)} takes longer to tear down than the reference's minimal holder${size(r.failover.referenceHolder)}. The rest is pg-singleton's: the waiter is granted the lock, and the same statement commits the new epoch.`,
      '',
      '| kill -9, from the signal | p50 | p95 | p99 | max |',
      '|---|---|---|---|---|',
      `| the killed node's backend is gone | ${dist(r.failover.killBreakdown.backendGone)} |`,
      `| from then to the new epoch seen in pgsingleton.status | ${dist(r.failover.killBreakdown.goneToNewEpoch)} |`,
      `| reference: the killed minimal holder's backend is gone | ${dist(r.failover.referenceBackendGone)} |`,
      '',
      ...(r.failover.goneByMemory
        ? [
            "That first part grows with the killed process's memory, whatever holds the lock: a minimal holder carrying more (touched buffers), killed with -9, until the server shows its backend gone. A node embedded in a big app fails over after a crash that much later; a stop (SIGTERM) does not wait for it.",
            '',
            '| the killed process | p50 | p95 | p99 | max |',
            '|---|---|---|---|---|',
            ...r.failover.goneByMemory.map(
              (g) =>
                `| ${Math.round(g.rssMiB.p50)} MiB resident (${g.addedMiB} MiB added) | ${dist(g.gone)} |`,
            ),
            '',
          ]
        : []),
    )
    const crash = r.failover.kinds['kill -9']
    const graceful = r.failover.kinds.SIGTERM
    if (crash)
      thresholds.push(
        `| crash failover p99 ≤ 20 ms | ${ms(crash.p99)} (of ${crash.n}) | ${yes(crash.p99 <= 20)} |`,
      )
    if (graceful)
      thresholds.push(
        `| graceful failover p99 ≤ 10 ms | ${ms(graceful.p99)} (of ${graceful.n}) | ${yes(graceful.p99 <= 10)} |`,
      )
  }
  const cleanupTable = (rows: CleanupComparison[]) => [
    "| table | app load | rounds | bulk DELETE | pg-singleton (run) | × bulk | start to done | rows/s | batches | longest batch | WAL bulk / ours | app p50 / p99 idle | app p99 during bulk | app p99 during ours | app p99, our node's start to stop |",
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ...rows.map(
      (c) =>
        `| ${c.rows.toLocaleString('en')} rows, ${c.layout}${(c.outdatedShare ?? 0.7) === 0.7 ? '' : `, ${Math.round(c.outdatedShare * 100)} % outdated`}${c.keptNode ? ', one node kept running' : ''} | ${c.withLoad ? 'yes' : 'no'} | ${c.rounds ?? 1} | ${s(c.bulk.seconds)} | ${s(c.ours.seconds)} | ${(c.ours.seconds / c.bulk.seconds).toFixed(2)} | ${s(c.ours.startToDoneSeconds)} | ${Math.round(c.ours.rowsPerSecond).toLocaleString('en')} | ${c.ours.batches} | ${c.ours.longestBatchMs === null ? '-' : ms(c.ours.longestBatchMs)} | ${mib(c.bulk.walBytes)} / ${mib(c.ours.walBytes)} | ${c.appIdle ? `${ms(c.appIdle.p50)} / ${ms(c.appIdle.p99)}` : '-'} | ${c.bulk.app ? ms(c.bulk.app.p99) : '-'} | ${c.ours.app ? ms(c.ours.app.p99) : '-'} | ${c.ours.appStartToStop ? ms(c.ours.appStartToStop.p99) : '-'} |`,
    ),
  ]
  if (r.cleanup) {
    lines.push(
      '## Cleanup against one bulk DELETE',
      '',
      "700,000 of 1,000,000 rows outdated (80-byte payload, index on the timestamp), in time order or shuffled; the bulk DELETE runs on an identical copy (same rows, same physical order) in the same run. Neither table is vacuumed before (an app's table would not be). pg-singleton with its defaults: `batchSize` 100,000 as the ceiling, a 30 ms budget per batch; its time is the run's `started_at` to `finished_at`, and start to done adds a fresh node's start-up, validation, lock, first tick and job hand-off. The app load: 4 connections, each reading one young row and updating another 100 times a second, in a process of its own. The app's latencies \"during\" a cleanup are those of its operations that overlapped the cleanup's own window: the bulk DELETE's statement, our run's `started_at` to `finished_at`; the last column has all of them from our node's start to its stop, start-up included (which a node that keeps running pays once, not at every run). Each line is the median of its rounds, each on fresh tables (the bulk DELETE, then ours); the longest batch is the longest of all of them, and the app's latencies are pooled over them. The lines marked \"one node kept running\" clean as a deployed app's node does: one node runs through the rounds, and each run is asked for (`runNow`, as its schedule would start one) on the same tables refilled in place; its first run, a fresh node's, is left out, and its last column counts from each `runNow` to the run's end.",
      '',
      ...cleanupTable(r.cleanup),
      '',
    )
    for (const c of r.cleanup) {
      const label = `${c.layout}${c.keptNode ? ', one node kept running' : ''}`
      thresholds.push(
        `| ${label}${c.withLoad ? ', app load' : ''}: cleanup ≤ 1.5 × bulk DELETE | ${(c.ours.seconds / c.bulk.seconds).toFixed(2)} × | ${yes(c.ours.seconds <= 1.5 * c.bulk.seconds)} |`,
        `| ${label}${c.withLoad ? ', app load' : ''}: no batch over 100 ms | ${c.ours.longestBatchMs === null ? '-' : ms(c.ours.longestBatchMs)} | ${yes((c.ours.longestBatchMs ?? 0) <= 100)} |`,
      )
      if (c.withLoad && c.appIdle && c.ours.app && c.bulk.app)
        thresholds.push(
          `| ${label}: app p99 during ours ≤ 2 × idle p99 and below its p99 during the bulk DELETE | ${ms(c.ours.app.p99)} (idle ${ms(c.appIdle.p99)}, bulk ${ms(c.bulk.app.p99)}) | ${yes(c.ours.app.p99 <= 2 * c.appIdle.p99 && c.ours.app.p99 < c.bulk.app.p99)} |`,
        )
    }
  }
  if (r.steady) {
    lines.push(
      '## Steady state: a small share outdated',
      '',
      `A policy that runs often finds few rows outdated: ${Math.round(STEADY_SHARE * 100)} % of 1,000,000 rows here, otherwise as above, no app load. The planner's estimate of the share is under 10 %: in time order the run walks the index on the timestamp; shuffled, the outdated rows are expected on nearly every page, and it walks the pages. The first two lines start a fresh node for each run, as the section above does: its run shares the machine with the node's own start-up (about half a second before the run and during it), and starts from the first batch size. The last two keep one node running, as a deployed app does, and ask it for each run (\`runNow\`, as its schedule would start one) on the same tables refilled in place: it starts each run from the batch size its last run of the table grew to. Their first run (a fresh node's) is left out, and each of their lines is the median of the runs after it.`,
      '',
      ...cleanupTable(r.steady),
      '',
    )
    for (const c of r.steady)
      thresholds.push(
        `| steady state, ${c.layout}${c.keptNode ? ', a node kept running' : ''}: no batch over 100 ms | ${c.ours.longestBatchMs === null ? '-' : ms(c.ours.longestBatchMs)} | ${yes((c.ours.longestBatchMs ?? 0) <= 100)} |`,
      )
  }
  if (r.partitions) {
    const p = r.partitions
    lines.push(
      '## A partitioned table: partitions dropped, or rows deleted',
      '',
      `${p.rows.toLocaleString('en')} rows in ${p.partitions} range partitions of 100 days; six wholly outdated, one straddling the cut-off. The same table twice, cleaned with \`partitions: "drop"\` and with row deletes.`,
      '',
      '| way | rows removed | run time | WAL |',
      '|---|---|---|---|',
      `| partitions dropped (the straddling one row by row) | ${p.drop.rows.toLocaleString('en')} | ${s(p.drop.seconds)} | ${mib(p.drop.walBytes)} |`,
      `| rows deleted | ${p.rowDeletes.rows.toLocaleString('en')} | ${s(p.rowDeletes.seconds)} | ${mib(p.rowDeletes.walBytes)} |`,
      '',
    )
    thresholds.push(
      `| dropped-partition cleanup of ~600,000 rows well under a second | ${s(p.drop.seconds)} | ${yes(p.drop.seconds < 0.5)} |`,
    )
  }
  if (r.cost) {
    const c = r.cost
    lines.push(
      '## What an idle node costs',
      '',
      'A holder and three standbys as CLI processes with the default timings, measured after 15 s of settling, over 30 s. Statements per standby from the server’s transaction counters, less the holder alone.',
      '',
      '| | connections | statements/s | CPU | memory (RSS) |',
      '|---|---|---|---|---|',
      `| holder | ${c.connections.holder} | - | - | ${c.rssMiB.holder.toFixed(0)} MiB |`,
      `| standby | ${c.connections.standby} | ${c.standbyStatementsPerSecond.toFixed(2)} | ${(c.standbyCpuShare * 100).toFixed(2)} % of a core | ${c.rssMiB.standby.toFixed(0)} MiB |`,
      '',
    )
    thresholds.push(
      `| a standby costs one connection | ${c.connections.standby} | ${yes(c.connections.standby === 1)} |`,
    )
  }
  if (r.scale) {
    lines.push(
      '## Failover with many standbys',
      '',
      "Library instances, 50 to a process, all queued on one singleton; each trial ends the holder's session as a crash does, from the server (`pg_terminate_backend`), and times the takeover from outside, as the failover section does (a prepared poll of `pgsingleton.status`; a settled holder, one that has held for a random 0.5 to 5.5 s).",
      '',
      '| standbys | server | connections | p50 | p95 | p99 | max |',
      '|---|---|---|---|---|---|---|',
      ...r.scale.map(
        (x) => `| ${x.standbys} | ${x.server} | ${x.connections} | ${dist(x.failover)} |`,
      ),
      '',
    )
    for (const x of r.scale.filter((x) => x.standbys >= 100))
      thresholds.push(
        `| ${x.standbys} standbys: crash failover p99 < 50 ms | ${ms(x.failover.p99)} | ${yes(x.failover.p99 < 50)} |`,
      )
  }
  if (r.growth) {
    lines.push(
      '## Growth: cleanup time against table size',
      '',
      'Time-ordered, 70 % outdated, no app load.',
      '',
      ...cleanupTable(r.growth),
      '',
    )
  }
  lines.push('## Thresholds', '', '| target | measured | |', '|---|---|---|', ...thresholds, '')
  return `${lines.join('\n')}\n`
}

function machineText(version: string, r: Results): string {
  const m = r.machine as {
    measuredAt: string
    cpus: number
    cpu: string
    memoryGiB: number
    node: string
  }
  const sections = Object.entries(r.sections ?? {})
    .map(
      ([key, at]) =>
        `${key} ${at.measuredAt.slice(0, 16).replace('T', ' ')} UTC on ${at.commit}${
          at.roundTrips
            ? ` (a read ${ms(at.roundTrips.read.p50, 2)}, a commit ${ms(at.roundTrips.commit.p50, 2)} / ${ms(at.roundTrips.commit.p99, 2)})`
            : ''
        }`,
    )
    .join('; ')
  return `Measured ${m.measuredAt} on ${m.cpus} × ${m.cpu}, ${m.memoryGiB} GiB RAM, Node ${m.node}, PostgreSQL ${version} over loopback (127.0.0.1).${sections ? `\n\nSections (when, on which commit, and the server's round trips just before: a read's p50, a one-row insert's commit p50 / p99, ${ROUND_TRIPS} each): ${sections}.` : ''}`
}

main().then(
  () => {
    // After a failed section, what it left behind (a node, a connection) must not keep the
    // run from ending: out once the report has been written.
    if (process.exitCode) process.stdout.write('', () => process.exit())
  },
  (error) => {
    process.stderr.write(`${error instanceof Error ? error.stack : String(error)}\n`)
    process.exit(1)
  },
)
