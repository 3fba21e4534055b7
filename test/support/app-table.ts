import type pg from 'pg'
import { readStatus, type SingletonStatus } from '../../src/status/read-status.js'
import { waitFor } from './database.js'

/** An app table like the ones users clean: rows with a timestamp, some outdated. */
export async function createEventsTable(pool: pg.Pool, table = 'app.events'): Promise<void> {
  await pool.query(`CREATE SCHEMA IF NOT EXISTS app;
    CREATE TABLE ${table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL, payload text);
    CREATE INDEX ON ${table} (created_at);`)
}

/** Inserts `count` rows aged `age` (a PostgreSQL interval) by the database clock. */
export async function insertRows(
  pool: pg.Pool,
  count: number,
  age: string,
  table = 'app.events',
): Promise<void> {
  await pool.query(
    `INSERT INTO ${table} (created_at, payload) SELECT now() - $1::interval, md5(i::text) FROM generate_series(1, $2) AS i`,
    [age, count],
  )
}

export async function countRows(
  pool: pg.Pool,
  where: string,
  table = 'app.events',
): Promise<number> {
  const { rows } = await pool.query<{ n: string }>(
    `SELECT count(*) AS n FROM ${table} WHERE ${where}`,
  )
  return Number(rows[0]?.n)
}

export async function statusOf(pool: pg.Pool, name: string): Promise<SingletonStatus | undefined> {
  return (await readStatus(pool, name))[0]
}

export async function dbNow(pool: pg.Pool): Promise<Date> {
  const { rows } = await pool.query<{ now: Date }>('SELECT clock_timestamp() AS now')
  return rows[0]?.now as Date
}

/**
 * The safety invariants, judged from what the database recorded; they hold at every
 * moment, whatever runs or stops:
 * - no two batches of different epochs overlap in time, and commits follow epoch order;
 * - no occurrence of a policy is completed twice.
 */
export async function safetyViolations(pool: pg.Pool, singleton: string): Promise<string[]> {
  const problems: string[] = []
  const overlaps = await pool.query(
    `SELECT a.run_id AS a_run, a.epoch AS a_epoch, b.run_id AS b_run, b.epoch AS b_epoch
       FROM pgsingleton.cleanup_batches a
       JOIN pgsingleton.cleanup_runs ra ON ra.id = a.run_id AND ra.singleton = $1
       JOIN pgsingleton.cleanup_batches b ON a.epoch < b.epoch AND a.ended_at > b.began_at
       JOIN pgsingleton.cleanup_runs rb ON rb.id = b.run_id AND rb.singleton = $1`,
    [singleton],
  )
  for (const row of overlaps.rows) {
    problems.push(
      `batch of epoch ${row.a_epoch} (run ${row.a_run}) ended after a batch of epoch ${row.b_epoch} (run ${row.b_run}) began`,
    )
  }
  const doubles = await pool.query(
    `SELECT policy, scheduled_for, count(*) AS n FROM pgsingleton.cleanup_runs
      WHERE singleton = $1 AND status = 'done' GROUP BY policy, scheduled_for HAVING count(*) > 1`,
    [singleton],
  )
  for (const row of doubles.rows)
    problems.push(
      `occurrence ${row.policy}@${row.scheduled_for.toISOString()} completed ${row.n} times`,
    )
  return problems
}

/**
 * The continuity invariant: every occurrence that a fenced run left unfinished is covered
 * by a later run (done, exhausted, or still open) of the same or a later occurrence. A
 * holder issues one run per policy for all of them (a cleanup deletes everything outdated
 * whenever it runs), so this is checked while a holder runs; a holder stopped before its
 * first tick leaves them for the next one.
 */
export async function unfinishedOccurrences(pool: pg.Pool, singleton: string): Promise<string[]> {
  const lost = await pool.query(
    `SELECT DISTINCT f.policy, f.scheduled_for FROM pgsingleton.cleanup_runs f
      WHERE f.singleton = $1 AND f.status = 'fenced'
        AND NOT EXISTS (SELECT 1 FROM pgsingleton.cleanup_runs d
                         WHERE d.singleton = f.singleton AND d.policy = f.policy
                           AND d.scheduled_for >= f.scheduled_for AND d.status <> 'fenced')`,
    [singleton],
  )
  return lost.rows.map(
    (row) =>
      `occurrence ${row.policy}@${row.scheduled_for.toISOString()} was fenced and no later run covers it`,
  )
}

/** Waits, while a holder runs, until no occurrence is left unfinished. */
export async function waitUntilSettled(pool: pg.Pool, singleton: string): Promise<void> {
  let last: string[] = []
  await waitFor(
    `every occurrence of ${singleton} to have a live or done run (${last.join('; ')})`,
    async () => {
      last = await unfinishedOccurrences(pool, singleton)
      return last.length === 0
    },
  )
}
