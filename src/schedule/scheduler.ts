import type pg from 'pg'
import type { PgBoss } from 'pg-boss'
import type { ResolvedPolicy } from '../config/policy.js'
import { inTransaction, type TransactionLimits } from '../db/transaction.js'
import { errorMessage } from '../errors.js'
import type { Lease } from '../lock/lock-session.js'
import { sleep } from '../lock/starter.js'
import { type CleanupJob, queueName } from './queue.js'

export interface ScheduledRun {
  runId: string
  policy: string
  scheduledFor: Date
  epoch: number
  /** Occurrences passed over because the singleton was not held when they came due. */
  missed: number
  /** True when this re-issues an occurrence a previous holder scheduled but did not finish. */
  reissued: boolean
}

export interface SchedulerDeps {
  readonly pool: pg.Pool
  readonly boss: PgBoss
  readonly policies: readonly ResolvedPolicy[]
  readonly limits: TransactionLimits
  onScheduled(run: ScheduledRun): void
  onError(error: unknown): void
}

/** The longest the holder sleeps between two looks at the schedule. */
const MAX_TICK_MS = 5000
const MIN_TICK_MS = 20

/**
 * The holder's clock. Due times live in `pgsingleton.schedules` and are judged by the
 * database's `now()`, so a new holder continues exactly where the last one stopped.
 * Each tick runs in one fenced transaction that advances the schedule, records the run
 * and inserts the pg-boss job together: either all of it commits or none does, so a
 * failover can neither double nor drop an occurrence.
 *
 * Misfires coalesce: when occurrences came due while nobody held the singleton (or the
 * holder was behind), the earliest missed one runs once and the schedule resumes at the
 * next slot of its grid after now(). A cleanup deletes everything outdated whenever it
 * runs, so running once is the same work as running each missed slot.
 */
export async function runScheduler(deps: SchedulerDeps, lease: Lease, fence: AbortSignal): Promise<void> {
  let prepared = false
  while (!fence.aborted) {
    let waitMs = MAX_TICK_MS
    try {
      if (!prepared) {
        await upsertSchedules(deps, lease)
        prepared = true
      }
      waitMs = await tick(deps, lease, fence)
    } catch (error) {
      if (fence.aborted) return
      deps.onError(new Error(`schedule tick failed (epoch ${lease.epoch}): ${errorMessage(error)}`, { cause: error }))
      waitMs = 1000
    }
    await sleep(waitMs, fence)
  }
}

async function upsertSchedules(deps: SchedulerDeps, lease: Lease): Promise<void> {
  // A new policy is due at once; a changed `every` takes effect from now without
  // pushing an occurrence that is already due further out.
  await deps.pool.query(
    `INSERT INTO pgsingleton.schedules AS s (singleton, policy, every, next_run_at, updated_epoch)
     SELECT $1, p.policy, p.every::interval, now(), $2
       FROM unnest($3::text[], $4::text[]) AS p(policy, every)
     ON CONFLICT (singleton, policy) DO UPDATE
       SET every = excluded.every,
           next_run_at = least(s.next_run_at, now() + excluded.every),
           updated_epoch = excluded.updated_epoch
       WHERE s.every IS DISTINCT FROM excluded.every`,
    [lease.name, lease.epoch, deps.policies.map((p) => p.name), deps.policies.map((p) => p.every)],
  )
}

async function tick(deps: SchedulerDeps, lease: Lease, fence: AbortSignal): Promise<number> {
  const names = deps.policies.map((p) => p.name)
  const { scheduled, waitMs } = await inTransaction(deps.pool, deps.limits, async (client) => {
    const held = await client.query(
      'SELECT 1 FROM pgsingleton.leases WHERE name = $1 AND epoch = $2 FOR KEY SHARE',
      [lease.name, lease.epoch],
    )
    if (held.rowCount !== 1 || fence.aborted) return { scheduled: [] as ScheduledRun[], waitMs: MAX_TICK_MS }

    const work: { policy: string; scheduledFor: Date; missed: number; reissued: boolean }[] = []
    // Runs that an older epoch scheduled and that are still open can never finish: their
    // fence has moved. This holder closes them and takes each occurrence over.
    const orphans = await client.query<{ policy: string; scheduled_for: Date; job_id: string | null }>(
      `UPDATE pgsingleton.cleanup_runs
          SET status = 'fenced', finished_at = now(),
              error = format('superseded: epoch %s took over before the run finished', $2::bigint)
        WHERE singleton = $1 AND epoch < $2 AND status IN ('scheduled', 'running', 'failed')
        RETURNING policy, scheduled_for, job_id`,
      [lease.name, lease.epoch],
    )
    const db = { executeSql: (text: string, values?: unknown[]) => client.query(text, values) }
    // Their pg-boss jobs are cancelled too: a job left `active` by a killed worker would
    // otherwise hold the policy's singleton slot until it expires, and the re-issued
    // occurrence would queue behind it. A worker still running one is fenced anyway.
    const staleJobs = orphans.rows.flatMap((row) => (row.job_id ? [row.job_id] : []))
    if (staleJobs.length > 0) await deps.boss.cancel(queueName(lease.name), staleJobs, { db })
    // Every occurrence whose runs all ended fenced under an older epoch is unfinished:
    // the ones just superseded above, and the ones whose worker found its fence moved
    // and recorded `fenced` itself before this tick could.
    const unfinished = await client.query<{ policy: string; scheduled_for: Date }>(
      `SELECT DISTINCT f.policy, f.scheduled_for FROM pgsingleton.cleanup_runs f
        WHERE f.singleton = $1 AND f.status = 'fenced' AND f.epoch < $2 AND f.policy = ANY($3::text[])
          AND NOT EXISTS (SELECT 1 FROM pgsingleton.cleanup_runs d
                           WHERE d.singleton = f.singleton AND d.policy = f.policy
                             AND d.scheduled_for = f.scheduled_for AND d.status <> 'fenced')
        ORDER BY f.scheduled_for`,
      [lease.name, lease.epoch, names],
    )
    for (const row of unfinished.rows) {
      work.push({ policy: row.policy, scheduledFor: row.scheduled_for, missed: 0, reissued: true })
    }

    const due = await client.query<{ policy: string; scheduled_for: Date; missed: string }>(
      `WITH due AS (
         SELECT singleton, policy, next_run_at,
                floor(extract(epoch FROM now() - next_run_at) / extract(epoch FROM every))::bigint AS missed
           FROM pgsingleton.schedules
          WHERE singleton = $1 AND policy = ANY($3::text[]) AND next_run_at <= now()
          FOR UPDATE
       )
       UPDATE pgsingleton.schedules s
          SET last_scheduled_for = due.next_run_at,
              next_run_at = due.next_run_at + s.every * (due.missed + 1)::double precision,
              updated_epoch = $2
         FROM due
        WHERE s.singleton = due.singleton AND s.policy = due.policy
        RETURNING s.policy, due.next_run_at AS scheduled_for, due.missed`,
      [lease.name, lease.epoch, names],
    )
    for (const row of due.rows) {
      work.push({ policy: row.policy, scheduledFor: row.scheduled_for, missed: Number(row.missed), reissued: false })
    }

    const runs: ScheduledRun[] = []
    for (const item of work) {
      const inserted = await client.query<{ id: string }>(
        `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by)
         VALUES ($1, $2, $3, $4, $5) RETURNING id`,
        [lease.name, item.policy, lease.epoch, item.scheduledFor, lease.nodeId],
      )
      const runId = String(inserted.rows[0]?.id)
      const job: CleanupJob = { runId, singleton: lease.name, policy: item.policy, epoch: lease.epoch }
      // Inserted through this transaction: the job exists if and only if the schedule moved on.
      const jobId = await deps.boss.send(queueName(lease.name), job, { singletonKey: item.policy, db })
      if (!jobId) throw new Error(`pg-boss refused the job for policy "${item.policy}"`)
      await client.query('UPDATE pgsingleton.cleanup_runs SET job_id = $2 WHERE id = $1', [runId, jobId])
      runs.push({ runId, policy: item.policy, scheduledFor: item.scheduledFor, epoch: lease.epoch, missed: item.missed, reissued: item.reissued })
    }

    const next = await client.query<{ wait_ms: number | null }>(
      `SELECT (extract(epoch FROM min(next_run_at) - now()) * 1000)::float8 AS wait_ms
         FROM pgsingleton.schedules WHERE singleton = $1 AND policy = ANY($2::text[])`,
      [lease.name, names],
    )
    const wait = next.rows[0]?.wait_ms ?? MAX_TICK_MS
    return { scheduled: runs, waitMs: Math.min(MAX_TICK_MS, Math.max(MIN_TICK_MS, wait)) }
  })
  for (const run of scheduled) deps.onScheduled(run)
  return waitMs
}
