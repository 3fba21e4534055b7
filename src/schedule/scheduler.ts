import type pg from 'pg'
import type { PgBoss } from 'pg-boss'
import type { ResolvedPolicy } from '../config/policy.js'
import { inTransaction, type TransactionLimits } from '../db/transaction.js'
import { errorMessage } from '../errors.js'
import type { Lease } from '../lock/lock-session.js'
import { sleep } from '../wait.js'
import { type CleanupJob, queueName } from './queue.js'

export interface ScheduledRun {
  runId: string
  policy: string
  scheduledFor: Date
  epoch: number
  /** Later slots that came due while nobody held the singleton, coalesced into this run. */
  coalesced: number
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

interface RunRow {
  id: string
  policy: string
  scheduled_for: Date
  coalesced: number
  reissued: boolean
}

/** SQL: the schedule row `alias` has a run still waiting or working, which holds its next one back. */
function hasOpenRun(alias: string): string {
  return `EXISTS (SELECT 1 FROM pgsingleton.cleanup_runs r
                   WHERE r.singleton = ${alias}.singleton AND r.policy = ${alias}.policy
                     AND r.status IN ('scheduled', 'running'))`
}

/** The longest the holder sleeps between two looks at the schedule. */
const MAX_TICK_MS = 5000
const MIN_TICK_MS = 20
/** How often the holder looks again at a due policy whose previous run is still open. */
const HELD_BACK_RECHECK_MS = 500

/**
 * The holder's clock. Due times live in `pgsingleton.schedules` and are judged by the
 * database's `now()`, so a new holder continues exactly where the last one stopped.
 * Each tick runs in one fenced transaction that advances the schedule, records the run
 * and inserts the pg-boss job together: either all of it commits or none does, so a
 * failover can neither double nor drop an occurrence.
 *
 * Misfires coalesce: when occurrences came due while nobody held the singleton, or while
 * the policy's previous run was still going, the earliest missed one runs once and the
 * schedule resumes at the next slot of its grid after now(). A cleanup deletes everything
 * outdated whenever it runs, so running once is the same work as running each missed slot.
 */
export async function runScheduler(
  deps: SchedulerDeps,
  lease: Lease,
  fence: AbortSignal,
): Promise<void> {
  let prepared = false
  while (!fence.aborted) {
    let waitMs = MAX_TICK_MS
    try {
      waitMs = await tick(deps, lease, fence, !prepared)
      prepared = true
    } catch (error) {
      if (fence.aborted) return
      deps.onError(
        new Error(`schedule tick failed (epoch ${lease.epoch}): ${errorMessage(error)}`, {
          cause: error,
        }),
      )
      waitMs = 1000
    }
    await sleep(waitMs, fence)
  }
}

async function upsertSchedules(
  client: pg.PoolClient,
  deps: SchedulerDeps,
  lease: Lease,
): Promise<void> {
  // A new policy is due at once; a changed `every` takes effect from now without
  // pushing an occurrence that is already due further out.
  await client.query(
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

async function tick(
  deps: SchedulerDeps,
  lease: Lease,
  fence: AbortSignal,
  prepare: boolean,
): Promise<number> {
  const names = deps.policies.map((p) => p.name)
  const { scheduled, waitMs } = await inTransaction(deps.pool, deps.limits, async (client) => {
    const held = await client.query(
      'SELECT 1 FROM pgsingleton.leases WHERE name = $1 AND epoch = $2 FOR KEY SHARE',
      [lease.name, lease.epoch],
    )
    if (held.rowCount !== 1 || fence.aborted)
      return { scheduled: [] as ScheduledRun[], waitMs: MAX_TICK_MS }
    // The holder's policies become the schedule, once per holdership, under the fence.
    if (prepare) await upsertSchedules(client, deps, lease)

    // Runs that an older epoch scheduled and that are still open can never finish: their
    // fence has moved. This holder closes them and takes each occurrence over.
    const superseded = await client.query<{ job_id: string | null }>(
      `UPDATE pgsingleton.cleanup_runs
          SET status = 'fenced', finished_at = now(),
              error = format('superseded: epoch %s took over before the run finished', $2::bigint)
        WHERE singleton = $1 AND epoch < $2 AND status IN ('scheduled', 'running', 'failed')
        RETURNING job_id`,
      [lease.name, lease.epoch],
    )
    // Runs whose worker's node is gone: every live node keeps a lock session named after
    // it (holding or queued), so a run whose node has no session at all lost its worker
    // to a crash. Closing the run makes a still-living worker stop at its next batch (the
    // batch locks the run row and needs it `running`), and waits for a batch in flight.
    const orphaned = await client.query<{ job_id: string | null }>(
      `UPDATE pgsingleton.cleanup_runs r
          SET status = 'fenced', finished_at = now(),
              error = format('the worker on node %s is gone: it has no session in pg_stat_activity', r.node_id)
        WHERE r.singleton = $1 AND r.status = 'running' AND r.node_id IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                           WHERE a.application_name = r.node_id AND a.datname = current_database())
        RETURNING job_id`,
      [lease.name],
    )
    // The pg-boss jobs of both are cancelled: a job left `active` by a killed worker would
    // otherwise hold the policy's singleton slot until it expires, and the re-issued
    // occurrence would queue behind it. A worker still running one is fenced anyway.
    const db = { executeSql: (text: string, values?: unknown[]) => client.query(text, values) }
    const staleJobs = [...superseded.rows, ...orphaned.rows].flatMap((row) =>
      row.job_id ? [row.job_id] : [],
    )
    if (staleJobs.length > 0) await deps.boss.cancel(queueName(lease.name), staleJobs, { db })

    // Every occurrence whose runs all ended fenced is unfinished: the ones just closed
    // above, and the ones whose worker found its fence moved and recorded `fenced` itself
    // before this tick could. Timestamps stay in SQL: a round trip through a JS Date would
    // cut microseconds and make a different occurrence.
    const reissued = await client.query<RunRow>(
      `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, reissued)
       SELECT DISTINCT f.singleton, f.policy, $2::bigint, f.scheduled_for, $4, true
         FROM pgsingleton.cleanup_runs f
        WHERE f.singleton = $1 AND f.status = 'fenced' AND f.epoch <= $2 AND f.policy = ANY($3::text[])
          AND NOT EXISTS (SELECT 1 FROM pgsingleton.cleanup_runs d
                           WHERE d.singleton = f.singleton AND d.policy = f.policy
                             AND d.scheduled_for = f.scheduled_for AND d.status <> 'fenced')
       RETURNING id, policy, scheduled_for, coalesced, reissued`,
      [lease.name, lease.epoch, names, lease.nodeId],
    )

    // Due occurrences: advance each schedule past now() on its grid and record the run,
    // in one statement.
    const due = await client.query<RunRow>(
      `WITH due AS (
         SELECT singleton, policy, next_run_at,
                floor(extract(epoch FROM now() - next_run_at) / extract(epoch FROM every))::bigint AS missed
           FROM pgsingleton.schedules
          WHERE singleton = $1 AND policy = ANY($3::text[]) AND next_run_at <= now()
            -- A run still waiting or working holds the next one back: slow runs never pile
            -- up in the queue; the held-back slots coalesce into the run after it.
            AND NOT ${hasOpenRun('schedules')}
          FOR UPDATE OF schedules
       ), advanced AS (
         UPDATE pgsingleton.schedules s
            SET last_scheduled_for = due.next_run_at,
                next_run_at = due.next_run_at + s.every * (due.missed + 1)::double precision,
                updated_epoch = $2
           FROM due
          WHERE s.singleton = due.singleton AND s.policy = due.policy
          RETURNING s.policy, due.next_run_at, due.missed
       )
       INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, coalesced)
       SELECT $1, policy, $2, next_run_at, $4, missed FROM advanced
       RETURNING id, policy, scheduled_for, coalesced, reissued`,
      [lease.name, lease.epoch, names, lease.nodeId],
    )

    const runs: ScheduledRun[] = []
    for (const row of [...reissued.rows, ...due.rows]) {
      const runId = String(row.id)
      const job: CleanupJob = {
        runId,
        singleton: lease.name,
        policy: row.policy,
        epoch: lease.epoch,
      }
      // Inserted through this transaction: the job exists if and only if the run does.
      const jobId = await deps.boss.send(queueName(lease.name), job, {
        singletonKey: row.policy,
        db,
      })
      if (!jobId) throw new Error(`pg-boss refused the job for policy "${row.policy}"`)
      await client.query('UPDATE pgsingleton.cleanup_runs SET job_id = $2 WHERE id = $1', [
        runId,
        jobId,
      ])
      runs.push({
        runId,
        policy: row.policy,
        scheduledFor: row.scheduled_for,
        epoch: lease.epoch,
        coalesced: row.coalesced,
        reissued: row.reissued,
      })
    }

    // Sleep until the next due slot; a policy held back by its open run is looked at
    // again every HELD_BACK_RECHECK_MS instead of at once.
    const next = await client.query<{ wait_ms: number | null }>(
      `SELECT min(CASE WHEN ${hasOpenRun('s')}
                       THEN greatest(extract(epoch FROM s.next_run_at - now()) * 1000, $3)
                       ELSE extract(epoch FROM s.next_run_at - now()) * 1000 END)::float8 AS wait_ms
         FROM pgsingleton.schedules s WHERE s.singleton = $1 AND s.policy = ANY($2::text[])`,
      [lease.name, names, HELD_BACK_RECHECK_MS],
    )
    const wait = next.rows[0]?.wait_ms ?? MAX_TICK_MS
    return { scheduled: runs, waitMs: Math.min(MAX_TICK_MS, Math.max(MIN_TICK_MS, wait)) }
  })
  for (const run of scheduled) deps.onScheduled(run)
  return waitMs
}
