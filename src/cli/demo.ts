import { type ChildProcess, spawn } from 'node:child_process'
import { openSync } from 'node:fs'
import { mkdir, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import type pg from 'pg'
import { readStatus } from '../status/read-status.js'
import { waitFor } from '../wait.js'
import { commandPool, resolveConnection } from './connection.js'
import { EMBEDDED_HOME } from './embedded.js'

const say = (line: string) => process.stdout.write(`${line}\n`)
const BIN = fileURLToPath(new URL('../../../bin/pg-singleton.js', import.meta.url))
const SINGLETON = 'demo-cleaner'
/** The demo's table: rows far older than the policy's olderThan, and young ones. */
const OLDER_THAN = '5 minutes'
const OUTDATED = 10_000
const YOUNG = 10_000
/** Written after the kill, for the new holder to delete. */
const LATER = 5000
/** Generous: the demo's steps take milliseconds to seconds. */
const TIMEOUT_MS = 30_000

/** Waits for one step of the demo; a step that hangs ends with where to look. */
function step<T>(what: string, probe: () => Promise<T | undefined>, everyMs?: number): Promise<T> {
  return waitFor(`${what} (see the node logs in ${EMBEDDED_HOME})`, probe, TIMEOUT_MS, everyMs)
}

/**
 * A failover you can watch: a table with outdated rows, three real node processes, the
 * holder killed with SIGKILL, the next node taking over, and the rows still cleaned.
 */
export async function demoCommand(): Promise<void> {
  // Always the embedded PostgreSQL: the demo creates and drops a schema of its own, which
  // has no business in the database a DATABASE_URL (or a .env file) points at.
  const { url } = await resolveConnection((line) => say(line), { embedded: true })
  const pool = commandPool(url, 2)
  const nodes: ChildProcess[] = []
  try {
    await pool.query(`CREATE SCHEMA IF NOT EXISTS demo;
      DROP TABLE IF EXISTS demo.events;
      CREATE TABLE demo.events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
      CREATE INDEX ON demo.events (created_at);
      INSERT INTO demo.events (created_at, payload)
        SELECT now() - interval '6 minutes' - (i % 600) * interval '1 second', 'outdated' FROM generate_series(1, ${OUTDATED}) AS i
        UNION ALL
        SELECT now() - (i % 20) * interval '1 second', 'young' FROM generate_series(1, ${YOUNG}) AS i;`)
    const outdated = async () =>
      Number(
        (
          await pool.query(
            `SELECT count(*) AS n FROM demo.events WHERE created_at < now() - interval '${OLDER_THAN}'`,
          )
        ).rows[0].n,
      )
    // No row is near the cut-off: the outdated ones are 6 to 16 minutes old, the young ones
    // under 20 seconds, so the counts below stay exact while the demo runs (for minutes).
    say(
      `demo.events: ${OUTDATED + YOUNG} rows, ${await outdated()} of them older than ${OLDER_THAN} (the policy's olderThan), ${YOUNG} written in the last 20 seconds.`,
    )

    await mkdir(EMBEDDED_HOME, { recursive: true })
    const configPath = resolve(EMBEDDED_HOME, 'demo.config.json')
    await writeFile(
      configPath,
      JSON.stringify(
        {
          name: SINGLETON,
          policies: [
            {
              name: 'old-events',
              table: 'demo.events',
              column: 'created_at',
              olderThan: OLDER_THAN,
              every: '2 seconds',
              batchSize: 2000,
            },
          ],
        },
        null,
        2,
      ),
    )
    say(`Config: ${configPath}\nStarting three nodes (logs in ${EMBEDDED_HOME}/demo-node-*.log)...`)
    for (const n of [1, 2, 3]) {
      const log = openSync(join(EMBEDDED_HOME, `demo-node-${n}.log`), 'w')
      nodes.push(
        spawn(
          process.execPath,
          [BIN, 'run', '--config', configPath, '--node-id', `demo-node-${n}`],
          {
            env: { ...process.env, DATABASE_URL: url },
            stdio: ['ignore', log, log],
          },
        ),
      )
    }

    const holder = await step('a holder and two nodes queued', async () => {
      const row = (await readStatus(pool, SINGLETON))[0]
      return row?.nodeId && row.waitingNodes === 2 ? row.nodeId : undefined
    })
    say(`Holder: ${holder}. The other two wait inside pg_advisory_lock.`)
    await step('the outdated rows to be deleted', async () =>
      (await outdated()) === 0 ? true : undefined,
    )
    say('All outdated rows are deleted.')
    await printStatus(pool)

    const victim = nodes[Number(holder.split('-').pop()) - 1]
    say(`\nkill -9 ${holder} (pid ${victim?.pid})...`)
    const before = (await readStatus(pool, SINGLETON))[0]?.epoch ?? 0
    const killedAt = performance.now()
    victim?.kill('SIGKILL')
    const next = await step(
      'a new holder',
      async () => {
        const row = (await readStatus(pool, SINGLETON))[0]
        return row?.nodeId && (row.epoch ?? 0) > before ? row : undefined
      },
      5,
    )
    say(
      `${next.nodeId} took over with epoch ${next.epoch} after ${Math.round(performance.now() - killedAt)} ms (as seen by polling pgsingleton.status).`,
    )

    await pool.query(
      `INSERT INTO demo.events (created_at, payload) SELECT now() - interval '10 minutes', 'outdated' FROM generate_series(1, ${LATER})`,
    )
    say(`Inserted ${LATER} more outdated rows...`)
    await step('the new rows to be deleted', async () =>
      (await outdated()) === 0 ? true : undefined,
    )
    say('...and the new holder deleted them.')
    await printStatus(pool)

    const runs = await pool.query(
      `SELECT epoch, status, count(*)::int AS runs, sum(rows_deleted)::int AS rows FROM pgsingleton.cleanup_runs
        WHERE singleton = $1 GROUP BY epoch, status ORDER BY epoch, status`,
      [SINGLETON],
    )
    say('\nWhat pgsingleton.cleanup_runs recorded:')
    for (const row of runs.rows)
      say(`  epoch ${row.epoch}: ${row.runs} ${row.status} run(s), ${row.rows} rows deleted`)
    const left = await pool.query<{ young: number; aged: number; outdated: number }>(
      `SELECT count(*) FILTER (WHERE payload = 'young')::int AS young,
              count(*) FILTER (WHERE payload = 'young' AND created_at < now() - interval '${OLDER_THAN}')::int AS aged,
              count(*) FILTER (WHERE payload = 'outdated')::int AS outdated
         FROM demo.events`,
    )
    const {
      young,
      aged,
      outdated: outdatedLeft,
    } = left.rows[0] ?? { young: 0, aged: 0, outdated: 0 }
    say(
      `Left in demo.events: ${young} of the ${YOUNG} young rows${aged > 0 ? ` (${aged} of them have aged past ${OLDER_THAN} meanwhile)` : ''}, ${outdatedLeft} of the ${OUTDATED + LATER} outdated ones.`,
    )
  } finally {
    for (const node of nodes)
      if (node.exitCode === null && node.signalCode === null) node.kill('SIGTERM')
    await Promise.all(
      nodes.map((node) =>
        node.exitCode === null && node.signalCode === null
          ? new Promise((r) => node.once('exit', r))
          : undefined,
      ),
    )
    await pool.end()
  }
  say('\nStopped the nodes (SIGTERM). Try `pg-singleton status` and the SQL in the README.')
}

async function printStatus(pool: pg.Pool): Promise<void> {
  const { formatStatus } = await import('./commands.js')
  say(formatStatus(await readStatus(pool, SINGLETON)).trimEnd())
}
