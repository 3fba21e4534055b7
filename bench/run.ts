/**
 * `npm run bench`: the numbers behind the README, measured on this machine with real
 * processes and a real PostgreSQL. Writes bench/REPORT-postgresql-<major>.md and prints it.
 *
 *   DATABASE_URL=...  bench against that server (a scratch database is created on it);
 *                     without it, against the embedded PostgreSQL under ./.pg-singleton.
 *   BENCH_ROUNDS=N    failovers per kind (default 10).
 */
import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import pg from 'pg'
import { resolveConnection } from '../src/cli/connection.js'
import { migrateToLatest } from '../src/db/migrate.js'
import { readStatus } from '../src/status/read-status.js'
import { waitFor } from '../src/wait.js'

const BIN = fileURLToPath(new URL('../../bin/pg-singleton.js', import.meta.url))
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 10)
/** A takeover takes milliseconds, or about 3 s for a paused holder; 30 s means something broke. */
const TIMEOUT_MS = 30_000

async function main(): Promise<void> {
  const { url: serverUrl } = await resolveConnection((line) => process.stderr.write(`${line}\n`), {
    embedded: !process.env.DATABASE_URL,
  })
  const dbName = `pgs_bench_${randomBytes(4).toString('hex')}`
  const admin = new pg.Client({ connectionString: serverUrl })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${dbName}`)
  const url = new URL(serverUrl)
  url.pathname = `/${dbName}`
  const pool = new pg.Pool({ connectionString: url.toString(), max: 4 })
  const lines: string[] = []
  let major = 'unknown'
  try {
    await migrateToLatest(pool)
    const version = (await pool.query(`SELECT current_setting('server_version') AS v`)).rows[0].v
    major = String(version).split('.')[0] ?? major
    lines.push('# pg-singleton benchmark report', '', machine(version), '')
    lines.push(...(await failoverBench(pool, url.toString())))
    lines.push(...(await cleanupBench(pool, url.toString())))
    lines.push(...(await cannotGoBench(pool, url.toString())))
  } finally {
    await pool.end()
    await admin.query(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`)
    await admin.end()
  }
  const report = `${lines.join('\n')}\n`
  await writeFile(
    fileURLToPath(new URL(`../../bench/REPORT-postgresql-${major}.md`, import.meta.url)),
    report,
  )
  process.stdout.write(report)
}

function machine(pgVersion: string): string {
  const cpu = cpus()[0]?.model ?? 'unknown CPU'
  return [
    `Measured ${new Date().toISOString()} on ${cpus().length} × ${cpu}, ${Math.round(totalmem() / 2 ** 30)} GiB RAM,`,
    `Node ${process.version}, PostgreSQL ${pgVersion} over loopback (127.0.0.1).`,
  ].join('\n')
}

interface Node {
  id: string
  child: ChildProcess
  exited: Promise<void>
}

function startNode(url: string, config: string, id: string): Node {
  const child = spawn(process.execPath, [BIN, 'run', '--config', config, '--node-id', id], {
    env: { ...process.env, DATABASE_URL: url },
    stdio: 'ignore',
  })
  return { id, child, exited: new Promise((resolve) => child.once('exit', () => resolve())) }
}

function rssMiB(pid: number | undefined): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const kb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0)
  return kb / 1024
}

function summary(values: number[], unit: string, digits = 0): string {
  const sorted = [...values].sort((a, b) => a - b)
  const at = (q: number) =>
    sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? Number.NaN
  const f = (v: number) => `${v.toFixed(digits)} ${unit}`
  return `${f(sorted[0] ?? Number.NaN)} | ${f(at(0.5))} | ${f(at(0.9))} | ${f(sorted.at(-1) ?? Number.NaN)}`
}

/**
 * Takeover time as the database saw it: from the server's clock just before the
 * holder is killed (or its backend terminated) to the new holder's `acquired_at`.
 */
async function failoverBench(pool: pg.Pool, url: string): Promise<string[]> {
  const config = join(tmpdir(), `pg-singleton-bench-${randomBytes(4).toString('hex')}.json`)
  await writeFile(
    config,
    JSON.stringify({
      name: 'bench',
      policies: [
        {
          name: 'noop',
          table: 'pgsingleton.cleanup_batches',
          column: 'began_at',
          olderThan: '100 years',
          every: '1 hour',
        },
      ],
    }),
  )
  const nodes: Node[] = []
  let next = 0
  const spawnNode = () => {
    const node = startNode(url, config, `bench-${++next}`)
    nodes.push(node)
    return node
  }
  const live = () => nodes.filter((n) => n.child.exitCode === null && n.child.signalCode === null)
  const results: Record<string, number[]> = {
    'kill -9': [],
    SIGTERM: [],
    pg_terminate_backend: [],
    // With the default timings: the server's idle_session_timeout (3 s) frees a paused holder's lock.
    'SIGSTOP (paused)': [],
  }
  const memory: { holder: number[]; standby: number[] } = { holder: [], standby: [] }
  try {
    for (let i = 0; i < 3; i++) spawnNode()
    for (let round = 0; round < ROUNDS; round++) {
      for (const kind of Object.keys(results)) {
        const before = await waitFor(
          'a holder and two waiters',
          async () => {
            const row = (await readStatus(pool, 'bench'))[0]
            return row?.nodeId && row.epoch !== null && row.waitingNodes === live().length - 1
              ? row
              : undefined
          },
          TIMEOUT_MS,
          5,
        )
        const holder = nodes.find((n) => n.id === before.nodeId) as Node
        if (round === 0 && kind === 'kill -9') {
          memory.holder.push(rssMiB(holder.child.pid))
          for (const n of live()) if (n !== holder) memory.standby.push(rssMiB(n.child.pid))
        }
        const t0: Date = (await pool.query('SELECT clock_timestamp() AS t')).rows[0].t
        if (kind === 'kill -9') holder.child.kill('SIGKILL')
        else if (kind === 'SIGTERM') holder.child.kill('SIGTERM')
        else if (kind === 'SIGSTOP (paused)') holder.child.kill('SIGSTOP')
        else await pool.query('SELECT pg_terminate_backend($1)', [before.backendPid])
        const after = await waitFor(
          'a takeover',
          async () => {
            const row = (await readStatus(pool, 'bench'))[0]
            return row?.nodeId && (row.epoch ?? 0) > (before.epoch ?? 0) ? row : undefined
          },
          TIMEOUT_MS,
          5,
        )
        results[kind]?.push((after.acquiredAt as Date).getTime() - t0.getTime())
        if (kind === 'SIGSTOP (paused)') holder.child.kill('SIGCONT') // it fences itself and queues again
        if (kind === 'kill -9' || kind === 'SIGTERM') {
          await holder.exited
          spawnNode()
        }
      }
    }
  } finally {
    for (const node of live()) node.child.kill('SIGTERM')
    await Promise.all(nodes.map((n) => n.exited))
  }
  return [
    `## Failover (3 nodes, ${ROUNDS} rounds each)`,
    '',
    "From the server clock just before the event to the new holder's `acquired_at` (epoch bumped, ready to schedule).",
    '',
    '| event | min | median | p90 | max |',
    '|---|---|---|---|---|',
    ...Object.entries(results).map(
      ([kind, values]) => `| ${kind} of the holder | ${summary(values, 'ms')} |`,
    ),
    '',
    'The paused holder is SIGSTOPped with the default timings; the server ends its session after `idleSessionTimeoutMs` (3 s) of silence, counted from its last statement.',
    '',
    `Resident memory of a node process (RSS): holder ${memory.holder.map((v) => v.toFixed(0)).join(', ')} MiB; standbys ${memory.standby.map((v) => v.toFixed(0)).join(', ')} MiB.`,
    '',
  ]
}

/** 700,000 outdated rows of 1,000,000, 80-byte payload, index on the timestamp. */
async function cleanupBench(pool: pg.Pool, url: string): Promise<string[]> {
  const rows: string[] = [
    '## Cleanup',
    '',
    '| workload | batch size | rows deleted | run time | start to done | rows/s (run) | longest batch transaction |',
    '|---|---|---|---|---|---|---|',
  ]
  const { createSingleton } = await import('../src/index.js')
  for (const [label, order] of [
    ['time-ordered', 'i'],
    ['shuffled', 'random()'],
  ] as const) {
    for (const batchSize of [1000, 5000]) {
      const name = `bench-cleanup-${label}-${batchSize}`
      await pool.query('DROP TABLE IF EXISTS public.bench_events')
      await pool.query(
        'CREATE TABLE public.bench_events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL, payload text)',
      )
      await pool.query(
        `INSERT INTO public.bench_events (created_at, payload)
         SELECT now() - (1000000 - i) * interval '10 seconds', repeat('x', 80)
           FROM generate_series(1, 1000000) AS i ORDER BY ${order}`,
      )
      await pool.query('CREATE INDEX ON public.bench_events (created_at)')
      await pool.query('VACUUM ANALYZE public.bench_events')
      // Rows 10 s apart ending now: the newest 300,000 span 3,000,000 s, and the rest are outdated.
      const olderThan = '3000000 seconds'
      const node = createSingleton({
        name,
        connectionString: url,
        policies: [
          {
            name: 'p',
            table: 'public.bench_events',
            column: 'created_at',
            olderThan,
            every: '1 hour',
            batchSize,
          },
        ],
      })
      const started = performance.now()
      const done = new Promise<{ rowsDeleted: number }>((resolve) =>
        node.once('cleanup:done', resolve),
      )
      await node.start()
      const report = await done
      const wall = (performance.now() - started) / 1000
      await node.stop()
      const measured = await pool.query(
        `SELECT max(extract(epoch FROM b.ended_at - b.began_at) * 1000) AS longest_ms,
                extract(epoch FROM max(r.finished_at) - min(r.started_at)) AS run_s
           FROM pgsingleton.cleanup_batches b JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id WHERE r.singleton = $1`,
        [name],
      )
      const { longest_ms: longest, run_s: run } = measured.rows[0]
      rows.push(
        `| 1,000,000 rows, ${label} | ${batchSize} | ${report.rowsDeleted.toLocaleString('en')} | ${Number(run).toFixed(2)} s | ${wall.toFixed(2)} s | ${Math.round(report.rowsDeleted / Number(run)).toLocaleString('en')} | ${Number(longest).toFixed(0)} ms |`,
      )
    }
  }
  await pool.query('DROP TABLE IF EXISTS public.bench_events')
  rows.push(
    '',
    "700,000 of 1,000,000 rows outdated (80-byte payload, index on the timestamp). Run time: the run's `started_at` to",
    '`finished_at` in `pgsingleton.cleanup_runs`. Start to done: from `start()` of a fresh node to its `cleanup:done` event,',
    'adding validation, pg-boss start-up, the lock, the first tick and the job hand-off. Longest batch transaction: from',
    '`pgsingleton.cleanup_batches` (`ended_at - began_at`).',
    '',
  )
  return rows
}

/**
 * What rows that cannot go cost: the same table cleaned with nothing in the way, with 1%
 * of its outdated rows held locked by an app transaction, and with 1% held by a foreign
 * key, against one bulk DELETE and against batches that always lock with SKIP LOCKED, each
 * on an identical copy in the same run.
 */
async function cannotGoBench(pool: pg.Pool, url: string): Promise<string[]> {
  const rows: string[] = [
    '## Rows that cannot go',
    '',
    '| way | rows deleted | rows skipped | time | × bulk DELETE |',
    '|---|---|---|---|---|',
  ]
  const { createSingleton } = await import('../src/index.js')
  const total = 200_000
  const outdated = 140_000
  const fresh = async () => {
    await pool.query('DROP TABLE IF EXISTS public.bench_refs, public.bench_accounts')
    await pool.query(
      'CREATE TABLE public.bench_accounts (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, payload text)',
    )
    await pool.query(
      `INSERT INTO public.bench_accounts SELECT i, now() - ($1 - i) * interval '10 seconds', repeat('x', 80)
         FROM generate_series(1, $1) AS i`,
      [total],
    )
    await pool.query('CREATE INDEX ON public.bench_accounts (created_at)')
    await pool.query(
      'CREATE TABLE public.bench_refs (account_id bigint REFERENCES public.bench_accounts)',
    )
    await pool.query('VACUUM ANALYZE public.bench_accounts')
  }
  // The newest 60,000 rows span 600,000 s: the rest are outdated.
  const olderThan = '600000 seconds'
  const timed = async (work: () => Promise<void>) => {
    const started = performance.now()
    await work()
    return (performance.now() - started) / 1000
  }
  let bulk = 0
  const row = (way: string, deleted: number, skipped: number, seconds: number) =>
    rows.push(
      `| ${way} | ${deleted.toLocaleString('en')} | ${skipped.toLocaleString('en')} | ${seconds.toFixed(2)} s | ${(seconds / bulk).toFixed(2)} |`,
    )

  await fresh()
  let deleted = 0
  bulk = await timed(async () => {
    const result = await pool.query(
      `DELETE FROM public.bench_accounts WHERE created_at < now() - $1::interval`,
      [olderThan],
    )
    deleted = result.rowCount ?? 0
  })
  row('one bulk `DELETE` (reference)', deleted, 0, bulk)

  await fresh()
  let skipLocked = 0
  const always = await timed(async () => {
    for (;;) {
      const result = await pool.query(
        `DELETE FROM public.bench_accounts WHERE id IN (
           SELECT id FROM public.bench_accounts WHERE created_at < now() - $1::interval
            ORDER BY created_at LIMIT 5000 FOR UPDATE SKIP LOCKED)`,
        [olderThan],
      )
      skipLocked += result.rowCount ?? 0
      if ((result.rowCount ?? 0) < 5000) break
    }
  })
  row(
    'batches of 5000 that always lock `FOR UPDATE SKIP LOCKED` (reference)',
    skipLocked,
    0,
    always,
  )

  const clean = async (
    label: string,
    prepare: () => Promise<void>,
    release?: () => Promise<void>,
  ) => {
    await fresh()
    await prepare()
    const node = createSingleton({
      name: `bench-cannot-go-${label.length}`,
      connectionString: url,
      batchLockTimeoutMs: 200,
      policies: [
        {
          name: 'p',
          table: 'public.bench_accounts',
          column: 'created_at',
          olderThan,
          every: '1 hour',
          batchSize: 5000,
        },
      ],
    })
    node.on('error', () => {})
    let report = { rowsDeleted: 0, rowsSkipped: 0 }
    const done = new Promise<typeof report>((resolve) => node.once('cleanup:done', resolve))
    await node.start()
    report = await done
    await node.stop()
    await release?.()
    const { rows: measured } = await pool.query(
      `SELECT extract(epoch FROM max(finished_at) - min(started_at)) AS run_s FROM pgsingleton.cleanup_runs WHERE singleton = $1`,
      [`bench-cannot-go-${label.length}`],
    )
    row(label, report.rowsDeleted, report.rowsSkipped, Number(measured[0].run_s))
  }
  await clean('pg-singleton, batches of 5000, nothing in the way', async () => {})
  const app = new pg.Client({ connectionString: url })
  await app.connect()
  await clean(
    'pg-singleton, 1% of the outdated rows locked by an app transaction',
    async () => {
      await app.query('BEGIN')
      await app.query(
        `SELECT 1 FROM public.bench_accounts WHERE id <= $1 AND id % 100 = 0 FOR UPDATE`,
        [outdated],
      )
    },
    async () => {
      await app.query('ROLLBACK')
    },
  )
  await app.end()
  await clean('pg-singleton, 1% of the outdated rows held by a foreign key', async () => {
    await pool.query(
      `INSERT INTO public.bench_refs SELECT id FROM public.bench_accounts WHERE id <= $1 AND id % 100 = 0`,
      [outdated],
    )
  })
  await pool.query('DROP TABLE IF EXISTS public.bench_refs, public.bench_accounts')
  rows.push(
    '',
    `${outdated.toLocaleString('en')} of ${total.toLocaleString('en')} rows outdated, time-ordered, index on the timestamp, each way on a fresh identical table.`,
    "pg-singleton's time is its run's `started_at` to `finished_at`; a batch that meets a locked row waits `batchLockTimeoutMs`",
    '(200 ms here) before it is redone carefully. The references are plain SQL from this process.',
    '',
  )
  return rows
}

main().catch((error) => {
  process.stderr.write(`${error instanceof Error ? error.stack : String(error)}\n`)
  process.exit(1)
})
