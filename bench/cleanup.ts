import { fork } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import pg from 'pg'
import type { RetentionPolicy } from '../src/config/policy.js'
import { createSingleton } from '../src/index.js'
import { type Distribution, distribution } from './support.js'

/**
 * Rows are spread evenly over the last 10,000,000 seconds; a share of them older than the
 * cut-off. 0.7 is the backlog (700,000 of 1,000,000 rows); a small share is the
 * steady state of a policy that runs often, where the run walks the index.
 */
const SPAN_SECONDS = 10_000_000
const olderThan = (share: number) => `${Math.round(SPAN_SECONDS * (1 - share))} seconds`

export interface CleanupMeasure {
  seconds: number
  rows: number
  rowsPerSecond: number
  longestBatchMs: number | null
  walBytes: number
  /**
   * When the work itself ran (ms since the epoch): the bulk DELETE's statement; our run's
   * `started_at` to `finished_at`, by the server's clock on this same host.
   */
  window?: [number, number]
  /** The app's latencies of the operations that overlapped `window` (with the app load). */
  app?: Distribution
}

export interface CleanupComparison {
  layout: string
  rows: number
  /** The share of the rows that is outdated. */
  outdatedShare: number
  withLoad: boolean
  /** Rounds on fresh tables, the bulk DELETE and ours in turn (absent in older results: 1). */
  rounds?: number
  /**
   * One node kept running through the rounds, each of its runs asked for by `runNow` on
   * tables refilled in place (absent: a fresh node for each round). Its first run, with
   * nothing learned, is left out of the figures.
   */
  keptNode?: boolean
  bulk: CleanupMeasure
  ours: CleanupMeasure & {
    startToDoneSeconds: number
    batches: number
    /**
     * The app's latencies from our node's start to its stop: the run, and the node's
     * start-up (connect, validation, lock, pg-boss, first tick) and stop around it.
     */
    appStartToStop?: Distribution
  }
  appIdle?: Distribution
}

/**
 * A table like the issue's: `rows` rows with an 80-byte payload and an index on the
 * timestamp (some share of them outdated), laid out in time order or shuffled; a second table made
 * identical to it (same rows, same physical order), for one bulk DELETE. Neither is
 * vacuumed before it is cleaned, as an app's table would not be.
 */
async function makeTables(pool: pg.Pool, rows: number, shuffled: boolean): Promise<void> {
  await pool.query('DROP TABLE IF EXISTS public.bench_ours, public.bench_bulk')
  await pool.query(
    `CREATE TABLE public.bench_ours (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, payload text)`,
  )
  await pool.query(
    `INSERT INTO public.bench_ours
     SELECT i, now() - ($1::int - i) * interval '1 second' * (${SPAN_SECONDS}.0 / $1::int), repeat('x', 80)
       FROM generate_series(1, $1::int) AS i ${shuffled ? 'ORDER BY random()' : ''}`,
    [rows],
  )
  await pool.query('CREATE TABLE public.bench_bulk AS SELECT * FROM public.bench_ours')
  await pool.query('ALTER TABLE public.bench_bulk ADD PRIMARY KEY (id)')
  await pool.query('CREATE INDEX ON public.bench_ours (created_at)')
  await pool.query('CREATE INDEX ON public.bench_bulk (created_at)')
  await pool.query('ANALYZE public.bench_ours; ANALYZE public.bench_bulk')
  // One checkpoint, so that neither pays for the other's writes.
  await pool.query('CHECKPOINT')
}

/**
 * The same tables filled again in place (same oids, so a node that keeps running knows
 * them): emptied, then `rows` rows as `makeTables` writes them, the copy in the same
 * physical order.
 */
async function refillTables(pool: pg.Pool, rows: number, shuffled: boolean): Promise<void> {
  await pool.query('TRUNCATE public.bench_ours, public.bench_bulk')
  await pool.query(
    `INSERT INTO public.bench_ours
     SELECT i, now() - ($1::int - i) * interval '1 second' * (${SPAN_SECONDS}.0 / $1::int), repeat('x', 80)
       FROM generate_series(1, $1::int) AS i ${shuffled ? 'ORDER BY random()' : ''}`,
    [rows],
  )
  await pool.query('INSERT INTO public.bench_bulk SELECT * FROM public.bench_ours')
  await pool.query('ANALYZE public.bench_ours; ANALYZE public.bench_bulk')
  await pool.query('CHECKPOINT')
}

/** The paced app (bench/app-load.ts) in a child process, as a real app would be. */
async function appLoad(url: string, table: string, youngFrom: number, youngTo: number) {
  const child = fork(fileURLToPath(new URL('./app-load.js', import.meta.url)), [
    url,
    table,
    String(youngFrom),
    String(youngTo),
  ])
  await new Promise((resolve) => child.once('message', resolve))
  return {
    /** The operations since the last mark: [started (ms since the epoch), latency (ms)]. */
    mark: () =>
      new Promise<[number, number][]>((resolve) => {
        child.once('message', (operations) => resolve(operations as [number, number][]))
        child.send('mark')
      }),
    stop: async () => {
      const exited = new Promise((resolve) => child.once('exit', resolve))
      child.send('stop')
      await exited
    },
  }
}

async function wal(pool: pg.Pool): Promise<string> {
  return (
    (await pool.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')).rows[0]?.lsn ??
    '0/0'
  )
}

async function walSince(pool: pg.Pool, from: string): Promise<number> {
  const { rows } = await pool.query<{ bytes: string }>(
    'SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint AS bytes',
    [from],
  )
  return Number(rows[0]?.bytes)
}

/** Our cleanup of `table`, as a user runs it: a node started, its first run, its end. */
export async function ourCleanup(
  url: string,
  pool: pg.Pool,
  name: string,
  policy: RetentionPolicy,
): Promise<CleanupMeasure & { startToDoneSeconds: number; batches: number }> {
  const node = createSingleton({
    name,
    connectionString: url,
    policies: [policy],
    ...(process.env.BENCH_NODE_OPTIONS ? JSON.parse(process.env.BENCH_NODE_OPTIONS) : {}),
  })
  node.on('error', () => {})
  node.on('warning', () => {})
  const walFrom = await wal(pool)
  const started = performance.now()
  const done = new Promise<{ rowsDeleted: number; batches: number }>((resolve) =>
    node.once('cleanup:done', resolve),
  )
  await node.start()
  const report = await done
  const startToDone = (performance.now() - started) / 1000
  await node.stop()
  return measured(pool, 'singleton', name, report, await walSince(pool, walFrom), startToDone)
}

/**
 * What the runs that `column` = `key` picks out (one node's runs, or one run) took, by
 * their own records: from the first start to the last finish, and the longest batch.
 */
async function measured(
  pool: pg.Pool,
  column: 'singleton' | 'id',
  key: string,
  report: { rowsDeleted: number; batches: number },
  walBytes: number,
  startToDoneSeconds: number,
): Promise<CleanupMeasure & { startToDoneSeconds: number; batches: number }> {
  const { rows } = await pool.query<{
    run_s: number
    from_ms: number
    to_ms: number
    longest: number | null
  }>(
    `SELECT extract(epoch FROM max(r.finished_at) - min(r.started_at))::float8 AS run_s,
            (extract(epoch FROM min(r.started_at)) * 1000)::float8 AS from_ms,
            (extract(epoch FROM max(r.finished_at)) * 1000)::float8 AS to_ms,
            (SELECT max(extract(epoch FROM b.ended_at - b.began_at) * 1000) FROM pgsingleton.cleanup_batches b
               JOIN pgsingleton.cleanup_runs rr ON rr.id = b.run_id WHERE rr.${column} = $1)::float8 AS longest
       FROM pgsingleton.cleanup_runs r WHERE r.${column} = $1`,
    [key],
  )
  const seconds = Number(rows[0]?.run_s)
  return {
    seconds,
    rows: report.rowsDeleted,
    rowsPerSecond: report.rowsDeleted / seconds,
    longestBatchMs: rows[0]?.longest ?? null,
    walBytes,
    window: [Number(rows[0]?.from_ms), Number(rows[0]?.to_ms)],
    startToDoneSeconds,
    batches: report.batches,
  }
}

/**
 * A run of a node that keeps running: asked for now (as its schedule would start it),
 * timed by its own record.
 */
async function keptCleanup(
  node: ReturnType<typeof createSingleton>,
  pool: pg.Pool,
): Promise<CleanupMeasure & { startToDoneSeconds: number; batches: number }> {
  const walFrom = await wal(pool)
  const started = performance.now()
  const done = new Promise<{ runId: string; rowsDeleted: number; batches: number }>((resolve) =>
    node.once('cleanup:done', resolve),
  )
  await node.runNow('p')
  const report = await done
  const startToDone = (performance.now() - started) / 1000
  return measured(pool, 'id', report.runId, report, await walSince(pool, walFrom), startToDone)
}

/** The median of some numbers. */
function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2
    ? (sorted[mid] as number)
    : ((sorted[mid - 1] as number) + (sorted[mid] as number)) / 2
}

/**
 * Bulk DELETE and ours, on identical tables, with and without the app load, in several
 * rounds on fresh tables. A cleanup lasts well under a second: on this kind of machine one
 * round's bulk DELETE took from 0.28 to 0.45 s within a day, so a ratio of one round says
 * little; with the load, too few of the app's operations fall in one round for its p99 to
 * mean much (about 140 in a cleanup of 0.35 s), so the app's latencies are pooled over the
 * rounds: 10 of them give some 1,400 operations each for the bulk DELETE and for ours, so
 * that their p99s are the 14th slowest, not a single stall's. Times are the rounds'
 * medians, the longest batch the rounds' longest.
 */
export async function cleanupVersusBulk(
  url: string,
  rows: number,
  shuffled: boolean,
  withLoad: boolean,
  share = 0.7,
  rounds = withLoad ? 10 : 3,
  keptNode = false,
): Promise<CleanupComparison> {
  const pool = new pg.Pool({ connectionString: url, max: 3 })
  const policy: RetentionPolicy = {
    name: 'p',
    table: 'public.bench_ours',
    column: 'created_at',
    olderThan: olderThan(share),
    every: '1 hour',
  }
  // With a node kept running: one more round, its first run, which is left out.
  let kept: ReturnType<typeof createSingleton> | undefined
  const youngFrom = Math.ceil(rows * share) + 1
  const latencies = {
    idle: [] as number[],
    bulk: [] as number[],
    ours: [] as number[],
    oursStartToStop: [] as number[],
  }
  /**
   * Runs `work` under the app load: the app's latencies of the operations that overlapped
   * the work's own window go to `into`, and all since the work was called to `whole`.
   */
  const measure = async (
    table: string,
    into: number[],
    work: () => Promise<CleanupMeasure>,
    whole?: number[],
  ): Promise<CleanupMeasure> => {
    const load = withLoad ? await appLoad(url, table, youngFrom, rows) : undefined
    try {
      if (load) {
        await new Promise((resolve) => setTimeout(resolve, 2000))
        latencies.idle.push(...(await load.mark()).map(([, spent]) => spent))
      }
      const result = await work()
      if (load) {
        const operations = await load.mark()
        const [from, to] = result.window ?? [Number.NEGATIVE_INFINITY, Number.POSITIVE_INFINITY]
        into.push(
          ...operations.filter(([at, spent]) => at < to && at + spent > from).map(([, l]) => l),
        )
        whole?.push(...operations.map(([, spent]) => spent))
      }
      return result
    } finally {
      await load?.stop()
    }
  }
  const bulks: CleanupMeasure[] = []
  const ourRuns: CleanupComparison['ours'][] = []
  try {
    for (let round = keptNode ? 0 : 1; round <= rounds; round++) {
      if (kept) await refillTables(pool, rows, shuffled)
      else await makeTables(pool, rows, shuffled)
      // Round 0 of a kept node is its first run only: no bulk DELETE to set beside it.
      const warmUp = keptNode && !kept
      const bulkRound = warmUp
        ? undefined
        : await measure('public.bench_bulk', latencies.bulk, async () => {
            const walFrom = await wal(pool)
            const from = Date.now()
            const started = performance.now()
            const { rowCount } = await pool.query(
              `DELETE FROM public.bench_bulk WHERE created_at < now() - interval '${olderThan(share)}'`,
            )
            const seconds = (performance.now() - started) / 1000
            const window: [number, number] = [from, Date.now()]
            return {
              window,
              seconds,
              rows: rowCount ?? 0,
              rowsPerSecond: (rowCount ?? 0) / seconds,
              longestBatchMs: seconds * 1000,
              walBytes: await walSince(pool, walFrom),
            }
          })
      await pool.query('CHECKPOINT')
      const name = `bench-cleanup-${shuffled ? 'shuffled' : 'ordered'}-${rows}-${Math.round(share * 100)}-${withLoad ? 'load' : 'quiet'}-${keptNode ? 'kept' : round}`
      if (warmUp) {
        // Round 0: the node starts, and its first run cleans this round's tables.
        kept = createSingleton({
          name,
          connectionString: url,
          policies: [policy],
          ...(process.env.BENCH_NODE_OPTIONS ? JSON.parse(process.env.BENCH_NODE_OPTIONS) : {}),
        })
        kept.on('error', () => {})
        kept.on('warning', () => {})
        const first = new Promise((resolve) => kept?.once('cleanup:done', resolve))
        await kept.start()
        await first
        continue
      }
      bulks.push(bulkRound as CleanupMeasure)
      ourRuns.push(
        (await measure(
          'public.bench_ours',
          latencies.ours,
          () => (kept ? keptCleanup(kept, pool) : ourCleanup(url, pool, name, policy)),
          latencies.oursStartToStop,
        )) as CleanupComparison['ours'],
      )
    }
    const summary = <T extends CleanupMeasure>(all: T[]): T => {
      const seconds = median(all.map((m) => m.seconds))
      const last = all.at(-1) as T
      return {
        ...last,
        seconds,
        rowsPerSecond: last.rows / seconds,
        longestBatchMs: Math.max(...all.map((m) => m.longestBatchMs ?? 0)),
        walBytes: median(all.map((m) => m.walBytes)),
      }
    }
    const bulk = summary(bulks)
    const ours = summary(ourRuns)
    ours.startToDoneSeconds = median(ourRuns.map((m) => m.startToDoneSeconds))
    ours.batches = Math.round(median(ourRuns.map((m) => m.batches)))
    if (withLoad) {
      bulk.app = distribution(latencies.bulk)
      ours.app = distribution(latencies.ours)
      ours.appStartToStop = distribution(latencies.oursStartToStop)
    }
    return {
      layout: shuffled ? 'shuffled' : 'time-ordered',
      rows,
      outdatedShare: share,
      withLoad,
      rounds,
      keptNode: keptNode || undefined,
      bulk,
      ours,
      appIdle: withLoad ? distribution(latencies.idle) : undefined,
    }
  } finally {
    await kept?.stop().catch(() => {})
    await pool.query('DROP TABLE IF EXISTS public.bench_ours, public.bench_bulk').catch(() => {})
    await pool.end()
  }
}

export interface PartitionComparison {
  rows: number
  partitions: number
  drop: CleanupMeasure
  rowDeletes: CleanupMeasure
}

/**
 * A range-partitioned table of `rows` rows in ten partitions of 100 days, six of them
 * wholly outdated and one straddling the cut-off: `partitions: "drop"` against row
 * deletes, on identical copies.
 */
export async function partitionDrop(url: string, rows: number): Promise<PartitionComparison> {
  const pool = new pg.Pool({ connectionString: url, max: 2 })
  const make = async (table: string) => {
    await pool.query(`DROP TABLE IF EXISTS public.${table}`)
    await pool.query(
      `CREATE TABLE public.${table} (id bigint, created_at timestamptz NOT NULL, payload text) PARTITION BY RANGE (created_at)`,
    )
    // Ten partitions of 100 days each, ending 100 days from now: the oldest six end at or
    // before the cut-off (300 days ago), the seventh straddles it.
    for (let p = 0; p < 10; p++) {
      // DDL takes no parameters; p is a loop counter.
      await pool.query(
        `CREATE TABLE public.${table}_${p} PARTITION OF public.${table}
           FOR VALUES FROM (date_trunc('day', now()) - interval '${900 - 100 * p} days')
                        TO (date_trunc('day', now()) - interval '${800 - 100 * p} days')`,
      )
    }
    await pool.query(
      `INSERT INTO public.${table} SELECT i, date_trunc('day', now()) - interval '900 days' + (i - 0.5) * interval '1 second' * (86400.0 * 1000 / $1::int), repeat('x', 80)
         FROM generate_series(1, $1::int) AS i`,
      [rows],
    )
    await pool.query(`CREATE INDEX ON public.${table} (created_at)`)
    await pool.query(`ANALYZE public.${table}`)
  }
  try {
    const run = async (table: string, partitions: 'drop' | 'delete') => {
      await make(table)
      await pool.query('CHECKPOINT')
      return ourCleanup(url, pool, `bench-partitions-${partitions}`, {
        name: 'p',
        table: `public.${table}`,
        column: 'created_at',
        olderThan: '300 days',
        every: '1 hour',
        partitions,
      })
    }
    const drop = await run('bench_part_drop', 'drop')
    const rowDeletes = await run('bench_part_rows', 'delete')
    return { rows, partitions: 10, drop, rowDeletes }
  } finally {
    await pool
      .query('DROP TABLE IF EXISTS public.bench_part_drop, public.bench_part_rows')
      .catch(() => {})
    await pool.end()
  }
}
