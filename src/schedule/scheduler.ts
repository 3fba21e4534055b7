import type pg from 'pg'
import type { PgBoss } from 'pg-boss'
import { fingerprint, isTask, type RunDefinition } from '../config/definition.js'
import { cronNext, cronPeriodSeconds, cronSlots } from '../config/schedule.js'
import { errorMessage } from '../errors.js'
import type { Lease } from '../lock/lock-session.js'
import { cancelJobs, jobExpirySeconds, jobState, sendJob } from '../queue/cleanup-queue.js'
import { type TransactionLimits, withFence } from '../runs/fence.js'
import * as runs from '../runs/runs.js'
import { OPEN_SQL, pausedSql } from '../runs/statuses.js'
import { type Alarm, sleep } from '../wait.js'

export type ScheduledRun = runs.IssuedRun

export interface SchedulerDeps {
  readonly pool: pg.Pool
  readonly boss: PgBoss
  /** This node's definitions; a policy is scheduled only while every live node holds the same. */
  readonly definitions: readonly RunDefinition[]
  readonly limits: TransactionLimits
  onScheduled(run: ScheduledRun): void
  /** The policies held back because the live nodes disagree on them, each time that set changes. */
  onDisagreement(policies: readonly string[]): void
  onError(error: unknown): void
  /** What the holder sleeps on between ticks; rung by a request (any node, any client), it looks at once. */
  readonly alarm: Alarm
}

/** The longest the holder sleeps between two looks at the schedule. */
const MAX_TICK_MS = 5000
const MIN_TICK_MS = 20
/** The shortest time from one tick's start to the next when a ring (a request) ends the sleep. */
const MIN_RUNG_TICK_MS = 100
/** How often the holder looks again at a due policy whose previous run is still open. */
const HELD_BACK_RECHECK_MS = 500

/**
 * The holder's clock. Due times live in `pgsingleton.schedules` and are judged by the
 * database's `now()`, so a new holder continues exactly where the last one stopped.
 * Each tick is one fenced transaction that closes runs that can no longer finish,
 * retries failed runs whose backoff is over, issues due runs with their pg-boss jobs, and
 * advances the schedule: all of it commits or none does, so a failover can neither double
 * nor drop an occurrence.
 *
 * A policy is issued only while every live node holds the same definition of it, and
 * only when it has no open run: slow or failing runs hold the next one back, and the
 * slots they cover coalesce into one run after them.
 */
export async function runScheduler(
  deps: SchedulerDeps,
  lease: Lease,
  fence: AbortSignal,
  stepDownAfterMs: number,
): Promise<string | undefined> {
  const own = deps.definitions.map((definition) => ({
    definition,
    fingerprint: fingerprint(definition),
  }))
  // Each cron schedule's period (a scan of up to a year of its slots), worked out once
  // here rather than inside the first tick's fenced transaction.
  for (const { definition } of own)
    if (definition.cron !== null && definition.cronTimeZone !== null)
      cronPeriodSeconds(definition.cron, definition.cronTimeZone)
  let disagreeing = ''
  let lastOk = performance.now()
  while (!fence.aborted) {
    const began = performance.now()
    let waitMs = MAX_TICK_MS
    try {
      const result = await tick(deps, lease, own)
      lastOk = performance.now()
      waitMs = result.waitMs
      const held = result.disagreeing.join(',')
      if (held !== disagreeing) {
        disagreeing = held
        deps.onDisagreement(result.disagreeing)
      }
    } catch (error) {
      if (fence.aborted) return undefined
      deps.onError(
        new Error(`schedule tick failed (epoch ${lease.epoch}): ${errorMessage(error)}`, {
          cause: error,
        }),
      )
      const failingFor = performance.now() - lastOk
      if (failingFor > stepDownAfterMs) {
        return `its schedule ticks have failed for ${Math.round(failingFor / 1000)} s (stepDownAfterMs ${stepDownAfterMs}); last: ${errorMessage(error)}`
      }
      waitMs = 1000
    }
    if (await deps.alarm.sleep(waitMs, fence)) {
      // Rung by a request: a tick now, but not more often than this. Anyone who can connect
      // may announce on the channel, and each tick is a fenced transaction.
      const gapMs = began + MIN_RUNG_TICK_MS - performance.now()
      if (gapMs > 0) await sleep(gapMs, fence)
    }
  }
  return undefined
}

async function tick(
  deps: SchedulerDeps,
  lease: Lease,
  own: readonly runs.AgreedPolicy[],
): Promise<{ waitMs: number; disagreeing: string[] }> {
  const token = { singleton: lease.name, epoch: lease.epoch, nodeId: lease.nodeId }
  const outcome = await withFence(deps.pool, deps.limits, token, async (tx) => {
    await cancelJobs(deps.boss, tx, lease.name, await runs.takeOver(tx, token))
    await cancelJobs(deps.boss, tx, lease.name, await runs.blockingJobs(tx, lease.name))
    const resent = await resendLostJobs(deps.boss, tx, token)

    const { rows: views } = await tx.query<{ policy: string; agreed: string | null }>(
      `SELECT p.policy, pgsingleton.agreed_fingerprint($1, p.policy) AS agreed
         FROM unnest($2::text[]) AS p(policy)`,
      [lease.name, own.map((p) => p.definition.name)],
    )
    const agreedNow = new Map(views.map((v) => [v.policy, v.agreed]))
    const agreed = own.filter((p) => agreedNow.get(p.definition.name) === p.fingerprint)
    const disagreeing = own
      .filter((p) => agreedNow.get(p.definition.name) !== p.fingerprint)
      .map((p) => p.definition.name)

    const { rows: clock } = await tx.query<{ now: Date }>('SELECT now()')
    const now = clock[0]?.now ?? new Date()
    await upsertSchedules(tx, token, agreed, now)
    const issued = [
      ...(await runs.retryDue(tx, token)),
      ...(await runs.issue(tx, token, agreed, await dueCronSlots(tx, token, agreed, now))),
    ]
    for (const run of issued) {
      const policy = own.find((p) => p.definition.name === run.policy)
      const jobId = await sendJob(
        deps.boss,
        tx,
        {
          runId: run.runId,
          singleton: lease.name,
          policy: run.policy,
          epoch: lease.epoch,
          fingerprint: policy?.fingerprint ?? '',
        },
        jobExpirySeconds(policy?.definition),
      )
      await runs.attachJob(tx, run.runId, jobId)
    }
    return {
      issued: [...issued, ...resent],
      waitMs: await nextWake(tx, token, agreed),
      disagreeing,
    }
  })
  if (outcome.fenced) return { waitMs: MAX_TICK_MS, disagreeing: [] }
  for (const run of outcome.result.issued) deps.onScheduled(run)
  return { waitMs: outcome.result.waitMs, disagreeing: outcome.result.disagreeing }
}

/**
 * A job can end in pg-boss without its run ending: its worker's node was not live (it may
 * not claim), its worker could not reach the database to record the outcome, or pg-boss
 * failed it. A scheduled run whose job ended gets a new job; a running one is closed, and
 * the next tick issues its occurrence again.
 */
async function resendLostJobs(
  boss: PgBoss,
  tx: pg.PoolClient,
  lease: runs.FenceTokenWithNode,
): Promise<runs.IssuedRun[]> {
  const candidates = await runs.openWithJobs(tx, lease)
  const resent: runs.IssuedRun[] = []
  for (const run of candidates) {
    const state = await jobState(boss, tx, lease.singleton, run.jobId)
    if (state === 'created' || state === 'retry' || state === 'active') continue
    const reason = `its pg-boss job ${run.jobId} ended (${state ?? 'gone'}) without the run ending`
    if (run.status === 'running') {
      await runs.closeLost(tx, run, reason)
      continue
    }
    const jobId = await sendJob(
      boss,
      tx,
      {
        runId: run.runId,
        singleton: lease.singleton,
        policy: run.policy,
        epoch: lease.epoch,
        fingerprint: run.fingerprint,
      },
      jobExpirySeconds(run.definition),
    )
    // The run moved on since it was read: undo the whole tick rather than keep a stray job.
    if (!(await runs.replaceJob(tx, run, jobId)))
      throw new Error(`run ${run.runId} changed while its job was replaced`)
    resent.push(run.issued)
  }
  return resent
}

/**
 * Writes each agreed schedule, as it changes. A new `every` schedule is due at once; a
 * changed `every` takes effect from now without pushing an occurrence that is already due
 * further out. A cron schedule (new, or with a new pattern or zone) is next due at its
 * first slot after now, by the database's clock. A changed schedule keeps a slot that is
 * due and not yet issued (nobody held, or the policy was held back by its open run, a
 * pause or a disagreement while the deploy went round): that occurrence runs once, and
 * the slots after it follow the new schedule (the issue counts those missed since).
 */
async function upsertSchedules(
  tx: pg.PoolClient,
  lease: runs.FenceTokenWithNode,
  agreed: readonly runs.AgreedPolicy[],
  now: Date,
): Promise<void> {
  if (agreed.length === 0) return
  const rows = agreed.map(({ definition }) => {
    const kind = isTask(definition) ? 'task' : 'cleanup'
    if (definition.cron === null || definition.cronTimeZone === null) {
      return { policy: definition.name, kind, every: definition.every, cron: null, time_zone: null }
    }
    const { next, periodSeconds } = cronNext(definition.cron, definition.cronTimeZone, now)
    return {
      policy: definition.name,
      kind,
      every: null,
      cron: definition.cron,
      time_zone: definition.cronTimeZone,
      next_cron: next.toISOString(),
      period_s: periodSeconds,
    }
  })
  await tx.query(
    `INSERT INTO pgsingleton.schedules AS s
       (singleton, policy, kind, every, cron, time_zone, period, next_run_at, anchor, updated_epoch)
     SELECT $1, p.policy, p.kind, p.every::interval, p.cron, p.time_zone,
            coalesce(p.every::interval, make_interval(secs => p.period_s)),
            -- Whole milliseconds, as a JavaScript Date holds them: the slot a handler is
            -- told (ctx.scheduledFor) is the one its run row records.
            coalesce(p.next_cron, date_trunc('milliseconds', now())),
            -- An every grid's first slot, which a calendar interval counts its slots from.
            CASE WHEN p.cron IS NULL THEN date_trunc('milliseconds', now()) END, $2
       FROM jsonb_to_recordset($3::jsonb)
         AS p(policy text, kind text, every text, cron text, time_zone text, next_cron timestamptz, period_s float8)
     ON CONFLICT (singleton, policy) DO UPDATE
       SET kind = excluded.kind, every = excluded.every, cron = excluded.cron,
           time_zone = excluded.time_zone, period = excluded.period,
           next_run_at = CASE WHEN s.next_run_at <= now() THEN s.next_run_at
                              WHEN excluded.cron IS NOT NULL THEN excluded.next_run_at
                              ELSE least(s.next_run_at, date_trunc('milliseconds', now()) + excluded.every) END,
           -- The changed grid starts at its next slot.
           anchor = CASE WHEN excluded.cron IS NOT NULL THEN NULL
                         WHEN s.next_run_at <= now() THEN s.next_run_at
                         ELSE least(s.next_run_at, date_trunc('milliseconds', now()) + excluded.every) END,
           updated_epoch = excluded.updated_epoch
       -- As text: intervals compare a month as 30 days, so '1 month' and '30 days' are equal.
       WHERE s.every::text IS DISTINCT FROM excluded.every::text OR s.cron IS DISTINCT FROM excluded.cron
          OR s.time_zone IS DISTINCT FROM excluded.time_zone OR s.kind IS DISTINCT FROM excluded.kind`,
    [lease.singleton, lease.epoch, JSON.stringify(rows)],
  )
  // A cron schedule's period (for overdue) as this version works it out: the longest gap
  // between slots, where earlier versions wrote the gap after the next slot.
  if (!rows.some((row) => row.cron !== null)) return
  await tx.query(
    `UPDATE pgsingleton.schedules s SET period = make_interval(secs => p.period_s)
       FROM jsonb_to_recordset($2::jsonb) AS p(policy text, cron text, time_zone text, period_s float8)
      WHERE s.singleton = $1 AND s.policy = p.policy AND p.cron IS NOT NULL
        AND s.cron = p.cron AND s.time_zone = p.time_zone
        AND s.period IS DISTINCT FROM make_interval(secs => p.period_s)`,
    [lease.singleton, JSON.stringify(rows)],
  )
}

/**
 * For each cron schedule that is due: how many of its later slots have passed too (the
 * run stands for them) and its first slot after now, computed from the database's clock
 * with the cron library. The issue statement moves the schedule there.
 */
async function dueCronSlots(
  tx: pg.PoolClient,
  lease: runs.FenceTokenWithNode,
  agreed: readonly runs.AgreedPolicy[],
  now: Date,
): Promise<{ policy: string; missed: number; next: Date }[]> {
  const { rows } = await tx.query<{
    policy: string
    next_run_at: Date
    cron: string
    time_zone: string
  }>(
    // Only what this tick may issue: a schedule left by a policy no node holds any more, or
    // one paused or held back by its open run, would otherwise be counted at every tick (up to
    // MAX_COUNTED_SLOTS slots each), and a pattern this version cannot read would fail
    // every tick, and every policy with it.
    `SELECT s.policy, s.next_run_at, s.cron, s.time_zone FROM pgsingleton.schedules s
      WHERE s.singleton = $1 AND s.cron IS NOT NULL AND s.next_run_at <= now()
        AND s.policy = ANY($2::text[])
        AND NOT ${pausedSql('s.singleton', 's.policy')}
        AND NOT EXISTS (SELECT 1 FROM pgsingleton.cleanup_runs r
                         WHERE r.singleton = s.singleton AND r.policy = s.policy
                           AND r.status IN (${OPEN_SQL}))`,
    [lease.singleton, agreed.map((p) => p.definition.name)],
  )
  return rows.map((row) => ({
    policy: row.policy,
    ...cronSlots(row.cron, row.time_zone, row.next_run_at, now),
  }))
}

/**
 * Until the next due slot or retry; a policy held back by its open run is looked at again
 * every HELD_BACK_RECHECK_MS instead of at once. A paused policy is not waited for: its due
 * slot and its retry stay due while it is paused, and counting them made the holder tick
 * every MIN_TICK_MS for as long as the pause lasted. Its resume rings the holder (step 8's
 * trigger), and the next tick, at most MAX_TICK_MS away, would see it anyway.
 */
async function nextWake(
  tx: pg.PoolClient,
  lease: runs.FenceTokenWithNode,
  agreed: readonly runs.AgreedPolicy[],
): Promise<number> {
  const { rows } = await tx.query<{ wait_ms: number | null }>(
    `SELECT least(
       (SELECT min(CASE WHEN EXISTS (SELECT 1 FROM pgsingleton.cleanup_runs r
                                      WHERE r.singleton = s.singleton AND r.policy = s.policy
                                        AND r.status IN (${OPEN_SQL}))
                        THEN greatest(extract(epoch FROM s.next_run_at - now()) * 1000, $4)
                        ELSE extract(epoch FROM s.next_run_at - now()) * 1000 END)
          FROM pgsingleton.schedules s
         WHERE s.singleton = $1 AND s.policy = ANY($2::text[])
           AND NOT ${pausedSql('s.singleton', 's.policy')}),
       (SELECT min(extract(epoch FROM r.retry_at - now()) * 1000)
          FROM pgsingleton.cleanup_runs r
         WHERE r.singleton = $1 AND r.epoch = $3 AND r.status = 'failed'
           AND NOT ${pausedSql('r.singleton', 'r.policy')}))::float8 AS wait_ms`,
    [lease.singleton, agreed.map((p) => p.definition.name), lease.epoch, HELD_BACK_RECHECK_MS],
  )
  const wait = rows[0]?.wait_ms ?? MAX_TICK_MS
  return Math.min(MAX_TICK_MS, Math.max(MIN_TICK_MS, wait))
}
