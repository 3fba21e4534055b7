import pg from 'pg'
import type { Layout } from '../cleanup/pacing.js'
import type { PolicyDefinition, RunDefinition } from '../config/definition.js'
import { SQLSTATE, sqlState } from '../db/sqlstate.js'
import { type FenceToken, localSettings, type TransactionLimits, withFence } from './fence.js'
import { OPEN_SQL, pausedSql, type RunStatus } from './statuses.js'

/**
 * The run state machine of `pgsingleton.cleanup_runs`, and its only writer. Each export is
 * one named transition:
 *
 *   issue          (holder)  → scheduled       a due occurrence, or one taken over
 *   retryDue       (holder)  failed → scheduled    after its backoff
 *   takeOver       (holder)  open → fenced     runs of older epochs, runs whose worker is gone
 *   claim          (worker)  scheduled → running    attempt n owns the run from here on
 *   recordBatch    (worker)  running → running  one fenced batch, progress and audit row
 *   complete       (worker)  running → done     under the fence
 *   fence          (worker)  running → fenced   its epoch moved, or the nodes disagree
 *   fail           (worker)  running → failed | exhausted
 *
 * Every worker transition names the attempt it belongs to, so an abandoned attempt of the
 * same job can never overwrite what a later one wrote.
 */

type Queryable = Pick<pg.PoolClient, 'query'>

/** The holder's token: who issues, under which epoch. */
export type FenceTokenWithNode = FenceToken & { readonly nodeId: string }

/** How a failing run backs off: 1 s, 2 s, 4 s, ... at most a minute, five failures in all. */
export const RETRY = { limit: 5, firstDelaySeconds: 1, maxDelaySeconds: 60 } as const

export interface IssuedRun {
  runId: string
  policy: string
  scheduledFor: Date
  epoch: number
  /** Other occurrences this run stands for: slots missed while nobody held, runs fenced before they finished. */
  coalesced: number
  /** True when this takes over an occurrence an earlier run left unfinished. */
  reissued: boolean
}

export interface Claim<D extends RunDefinition = RunDefinition> extends FenceToken {
  readonly runId: string
  readonly policy: string
  readonly attempt: number
  /** When the run's slot was (the earliest, when it stands for missed slots too). */
  readonly scheduledFor: Date
  readonly definition: D
  readonly rowsDeleted: number
  readonly rowsSkipped: number
  readonly batches: number
  /** Other occurrences this run stands for (as IssuedRun.coalesced). */
  readonly coalesced: number
  /** True when it takes over an occurrence an earlier run left unfinished. */
  readonly reissued: boolean
}

/** What the holder issues a policy with: the definition every live node agreed on. */
export interface AgreedPolicy {
  readonly definition: RunDefinition
  readonly fingerprint: string
}

interface IssuedRow {
  id: string
  policy: string
  scheduled_for: Date
  coalesced: number
  reissued: boolean
}

const toIssued =
  (epoch: number) =>
  (row: IssuedRow): IssuedRun => ({
    runId: String(row.id),
    policy: row.policy,
    scheduledFor: row.scheduled_for,
    epoch,
    coalesced: Number(row.coalesced),
    reissued: row.reissued,
  })

/**
 * Holder, in a fenced tick: the jobs that may hold a waiting run back. The queue lets one
 * job per policy be active; a worker killed after its run was recorded finished but before
 * pg-boss heard that its job completed leaves that job active until pg-boss expires it,
 * and the policy's next run waits behind it. When a run has waited two seconds, the jobs
 * of finished runs of its policy whose node is no longer live are returned, to cancel (a
 * job that did complete is left as it is by the cancel).
 */
export async function blockingJobs(tx: Queryable, singleton: string): Promise<string[]> {
  const { rows } = await tx.query<{ job_id: string }>(
    `SELECT DISTINCT f.job_id FROM pgsingleton.cleanup_runs w
       JOIN pgsingleton.cleanup_runs f
         ON f.singleton = w.singleton AND f.policy = w.policy AND f.id < w.id
        AND f.status NOT IN (${OPEN_SQL}) AND f.job_id IS NOT NULL
        AND f.finished_at > now() - interval '1 hour'
        AND f.node_id IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM pgsingleton.live_nodes l
                         WHERE l.singleton = f.singleton AND l.node_id = f.node_id)
      WHERE w.singleton = $1 AND w.status = 'scheduled' AND w.created_at < now() - interval '2 seconds'
      LIMIT 20`,
    [singleton],
  )
  return rows.map((row) => row.job_id)
}

/**
 * Holder, in a fenced tick: closes the open runs that can no longer finish. Failed runs of
 * an older epoch, which wait for their retry with no worker and no job, move to this epoch
 * as they are (their failures, their retry_at): a takeover neither resets a failing run's
 * count nor skips its backoff. Other runs of an older epoch are superseded (their fence
 * has moved). A running run whose node is no
 * longer live (it holds no membership lock) lost its worker; closing it needs its row
 * lock, which a batch in flight holds, and a batch needs the run `running`, so a worker
 * that was only slow stops at its next batch. Returns the pg-boss jobs to cancel.
 */
export async function takeOver(tx: Queryable, lease: FenceToken): Promise<string[]> {
  await tx.query(
    `UPDATE pgsingleton.cleanup_runs SET epoch = $2
      WHERE singleton = $1 AND epoch < $2 AND status = 'failed'`,
    [lease.singleton, lease.epoch],
  )
  const superseded = await tx.query<{ job_id: string | null }>(
    `UPDATE pgsingleton.cleanup_runs
        SET status = 'fenced', finished_at = now(),
            error = format('superseded: epoch %s took over before the run finished', $2::bigint)
      WHERE singleton = $1 AND epoch < $2 AND status IN (${OPEN_SQL})
      RETURNING job_id`,
    [lease.singleton, lease.epoch],
  )
  const orphaned = await tx.query<{ job_id: string | null }>(
    `UPDATE pgsingleton.cleanup_runs r
        SET status = 'fenced', finished_at = now(),
            error = format('the worker on node %s is gone: it no longer holds its membership lock', r.node_id)
      WHERE r.singleton = $1 AND r.status = 'running'
        AND NOT EXISTS (SELECT 1 FROM pgsingleton.live_nodes l
                         WHERE l.singleton = r.singleton AND l.node_id = r.node_id)
      RETURNING job_id`,
    [lease.singleton],
  )
  return [...superseded.rows, ...orphaned.rows].flatMap((row) => (row.job_id ? [row.job_id] : []))
}

/**
 * Holder, in a fenced tick: failed runs whose backoff is over are scheduled again, unless
 * their policy is paused (then they wait for its resume, as a due slot does).
 */
export async function retryDue(tx: Queryable, lease: FenceToken): Promise<IssuedRun[]> {
  const { rows } = await tx.query<IssuedRow>(
    `UPDATE pgsingleton.cleanup_runs r SET status = 'scheduled', retry_at = NULL
      WHERE r.singleton = $1 AND r.epoch = $2 AND r.status = 'failed' AND r.retry_at <= now()
        AND NOT ${pausedSql('r.singleton', 'r.policy')}
      RETURNING r.id, r.policy, r.scheduled_for, r.coalesced, r.reissued`,
    [lease.singleton, lease.epoch],
  )
  return rows.map(toIssued(lease.epoch))
}

/**
 * The steps k of a calendar schedule's grid (`anchor + k * every`) from around `from` to
 * around now, as SQL over the schedules row `s`: a month counts as 30 days in an
 * interval's epoch, so the estimates are widened by a tenth and two steps.
 */
function anchoredSteps(s: string, from: string): string {
  return `generate_series(
    greatest(floor(extract(epoch FROM ${from} - ${s}.anchor) / extract(epoch FROM ${s}.every) * 0.9)::bigint - 2, 0),
    ceil(extract(epoch FROM now() - ${s}.anchor) / extract(epoch FROM ${s}.every) * 1.1)::bigint + 2)`
}

/**
 * Holder, in a fenced tick: issues at most one run per agreed policy that has no open
 * run and is not paused. The run is the policy's due slot (advancing its schedule past
 * now() on its grid), or, when none is due, the latest occurrence that earlier runs left
 * unfinished (fenced with no later run), or else a run an operator asked for
 * (`run-now`, which leaves the schedule's grid as it is). Either way it stands for every
 * missed slot and every unfinished occurrence before it: a cleanup deletes everything
 * outdated whenever it runs, so running once does the work of all of them.
 */
export async function issue(
  tx: Queryable,
  lease: FenceTokenWithNode,
  agreed: readonly AgreedPolicy[],
  /** For due cron schedules: the further slots that passed, and the first slot after now. */
  cronAdvance: readonly { policy: string; missed: number; next: Date }[] = [],
): Promise<IssuedRun[]> {
  if (agreed.length === 0) return []
  const { rows } = await tx.query<IssuedRow>(
    `WITH agreed AS (
       SELECT * FROM jsonb_to_recordset($3::jsonb) AS a(policy text, fingerprint text, definition jsonb)
     ), free AS (
       SELECT a.* FROM agreed a
        WHERE NOT EXISTS (SELECT 1 FROM pgsingleton.cleanup_runs r
                           WHERE r.singleton = $1 AND r.policy = a.policy AND r.status IN (${OPEN_SQL}))
          AND NOT ${pausedSql('$1', 'a.policy')}
     ), requested AS (
       -- RETURNING of an UPDATE gives the new values: the request is read here, and cleared below.
       SELECT c.policy, c.run_now_at AS asked FROM pgsingleton.policy_controls c JOIN free f ON f.policy = c.policy
        WHERE c.singleton = $1 AND c.run_now_at IS NOT NULL
          FOR UPDATE OF c
     ), cleared AS (
       UPDATE pgsingleton.policy_controls c SET run_now_at = NULL
         FROM requested q WHERE c.singleton = $1 AND c.policy = q.policy
     ), cron AS (
       SELECT * FROM jsonb_to_recordset($5::jsonb) AS c(policy text, missed bigint, next timestamptz)
     ), due AS (
       -- every: the slots that passed follow from the interval; cron: the holder counted them
       -- (a schedule with no count yet waits for the next tick).
       -- An interval with months or years has no fixed length (its epoch counts a month as
       -- 30 days): its missed slots are counted on the calendar, as the advance below adds
       -- them, around that estimate.
       -- A calendar interval with an anchor (the grid's first slot) counts its slots from the
       -- anchor, anchor + k * every, so a grid started on the 31st comes back to the 31st
       -- (slot after slot, it stuck at the 28th after February).
       SELECT s.singleton, s.policy, s.next_run_at,
              CASE WHEN s.cron IS NOT NULL THEN c.missed
                   WHEN extract(year FROM s.every) = 0 AND extract(month FROM s.every) = 0
                   THEN floor(extract(epoch FROM now() - s.next_run_at) / extract(epoch FROM s.every))::bigint
                   WHEN s.anchor IS NOT NULL
                   THEN (SELECT count(*) FROM ${anchoredSteps('s', 's.next_run_at')} k
                          WHERE s.anchor + s.every * k > s.next_run_at AND s.anchor + s.every * k <= now())
                   ELSE (SELECT count(*) FROM generate_series(1,
                           ceil(extract(epoch FROM now() - s.next_run_at) / extract(epoch FROM s.every) * 1.1)::bigint + 2) k
                          WHERE s.next_run_at + s.every * k <= now()) END AS missed,
              CASE WHEN s.cron IS NULL AND s.anchor IS NOT NULL
                        AND (extract(year FROM s.every) <> 0 OR extract(month FROM s.every) <> 0)
                   THEN (SELECT min(s.anchor + s.every * k) FROM ${anchoredSteps('s', 'now()')} k
                          WHERE s.anchor + s.every * k > now()) END AS anchored_next,
              c.next AS cron_next
         FROM pgsingleton.schedules s JOIN free f ON f.policy = s.policy
         LEFT JOIN cron c ON c.policy = s.policy
        WHERE s.singleton = $1 AND s.next_run_at <= now() AND (s.cron IS NULL OR c.policy IS NOT NULL)
          FOR UPDATE OF s
     ), advanced AS (
       UPDATE pgsingleton.schedules s
          SET last_scheduled_for = due.next_run_at,
              next_run_at = CASE WHEN s.cron IS NOT NULL THEN due.cron_next
                                 WHEN due.anchored_next IS NOT NULL THEN due.anchored_next
                                 ELSE due.next_run_at + s.every * (due.missed + 1)::double precision END,
              updated_epoch = $2
         FROM due
        WHERE s.singleton = due.singleton AND s.policy = due.policy
        RETURNING s.policy, due.next_run_at AS slot, due.missed
     ), unfinished AS (
       -- How many occurrences the unfinished runs stand for: each is one, and the latest
       -- also stands for what its own coalesced counted (the unfinished ones it took over,
       -- and slots it missed), so at least the larger of the two.
       SELECT f.policy, max(r.scheduled_for) AS latest,
              greatest(count(DISTINCT r.scheduled_for),
                       1 + (array_agg(r.coalesced ORDER BY r.scheduled_for DESC, r.id DESC))[1]) AS n
         FROM free f
         JOIN pgsingleton.cleanup_runs r
           ON r.singleton = $1 AND r.policy = f.policy AND r.status = 'fenced'
        WHERE r.scheduled_for > coalesce(
                (SELECT max(c.scheduled_for) FROM pgsingleton.cleanup_runs c
                  WHERE c.singleton = $1 AND c.policy = f.policy AND c.status <> 'fenced'),
                '-infinity')
        GROUP BY f.policy
     )
     INSERT INTO pgsingleton.cleanup_runs
       (singleton, policy, epoch, scheduled_for, scheduled_by, coalesced, reissued, definition, fingerprint, kind)
     SELECT $1, f.policy, $2, coalesce(a.slot, u.latest, q.asked), $4,
            coalesce(a.missed, 0) + coalesce(u.n, 0)
              - CASE WHEN a.slot IS NULL AND u.latest IS NOT NULL THEN 1 ELSE 0 END,
            -- It takes over an unfinished occurrence, whether or not a slot is due too.
            u.latest IS NOT NULL, f.definition, f.fingerprint,
            coalesce(f.definition->>'kind', 'cleanup')
       FROM free f
       LEFT JOIN advanced a ON a.policy = f.policy
       LEFT JOIN unfinished u ON u.policy = f.policy
       LEFT JOIN requested q ON q.policy = f.policy
      WHERE a.slot IS NOT NULL OR u.latest IS NOT NULL OR q.asked IS NOT NULL
     RETURNING id, policy, scheduled_for, coalesced, reissued`,
    [
      lease.singleton,
      lease.epoch,
      JSON.stringify(
        agreed.map((a) => ({
          policy: a.definition.name,
          fingerprint: a.fingerprint,
          definition: a.definition,
        })),
      ),
      lease.nodeId,
      JSON.stringify(cronAdvance.map((c) => ({ ...c, next: c.next.toISOString() }))),
    ],
  )
  return rows.map(toIssued(lease.epoch))
}

/** An open run of this epoch whose job may have ended without it. */
export interface RunWithJob {
  runId: string
  policy: string
  status: 'scheduled' | 'running'
  jobId: string
  fingerprint: string
  /** What the run was issued with (a task's time limit is in it). */
  definition: RunDefinition
  issued: IssuedRun
}

/**
 * Holder: open runs of this epoch with a job, to check against pg-boss: a scheduled or
 * running run outlives its job only when the job was lost (its worker could not claim or
 * could not record), since a worker records the run's end before its job completes.
 */
export async function openWithJobs(tx: Queryable, lease: FenceToken): Promise<RunWithJob[]> {
  const { rows } = await tx.query<
    IssuedRow & {
      status: 'scheduled' | 'running'
      job_id: string
      fingerprint: string
      definition: RunDefinition
    }
  >(
    `SELECT id, policy, status, job_id, fingerprint, definition, scheduled_for, coalesced, reissued
       FROM pgsingleton.cleanup_runs
      WHERE singleton = $1 AND epoch = $2 AND status IN ('scheduled', 'running') AND job_id IS NOT NULL`,
    [lease.singleton, lease.epoch],
  )
  return rows.map((row) => ({
    runId: String(row.id),
    policy: row.policy,
    status: row.status,
    jobId: row.job_id,
    fingerprint: row.fingerprint,
    definition: row.definition,
    issued: toIssued(lease.epoch)(row),
  }))
}

/** Holder: a running run whose job ended without it is closed; its occurrence is issued again. */
export async function closeLost(tx: Queryable, run: RunWithJob, reason: string): Promise<void> {
  await tx.query(
    `UPDATE pgsingleton.cleanup_runs SET status = 'fenced', finished_at = now(), error = $3
      WHERE id = $1 AND job_id = $2 AND status = 'running'`,
    [run.runId, run.jobId, reason],
  )
}

/**
 * Holder: a scheduled run whose job ended unclaimed gets `jobId` instead. False when the
 * run moved on meanwhile (then the caller's transaction must not keep the new job).
 */
export async function replaceJob(tx: Queryable, run: RunWithJob, jobId: string): Promise<boolean> {
  const result = await tx.query(
    `UPDATE pgsingleton.cleanup_runs SET job_id = $3
      WHERE id = $1 AND job_id = $2 AND status = 'scheduled'`,
    [run.runId, run.jobId, jobId],
  )
  return result.rowCount === 1
}

/** Holder: records the pg-boss job that carries a run (sent in the same transaction). */
export async function attachJob(tx: Queryable, runId: string, jobId: string): Promise<void> {
  await tx.query('UPDATE pgsingleton.cleanup_runs SET job_id = $2 WHERE id = $1', [runId, jobId])
}

/**
 * Worker: takes a scheduled run; from here on attempt n owns it. Undefined when the run
 * is not waiting for a worker (already taken, finished, closed by a holder, or issued
 * under an epoch that is no longer the current one), or when
 * this node is not live: a node whose definitions do not count towards the agreement
 * (it has not registered, or its lock session is gone) may not delete.
 */
export async function claim(
  pool: pg.Pool,
  runId: string,
  nodeId: string,
): Promise<Claim | 'not waiting' | 'not live'> {
  const { rows } = await pool.query<{
    singleton: string
    policy: string
    epoch: string
    attempt: number
    scheduled_for: Date
    definition: RunDefinition
    rows_deleted: string
    rows_skipped: string
    batches: number
    coalesced: number
    reissued: boolean
  }>(
    `UPDATE pgsingleton.cleanup_runs
        SET status = 'running', attempt = attempt + 1, node_id = $2,
            started_at = coalesce(started_at, now()), finished_at = NULL, error = NULL, retry_at = NULL
      WHERE id = $1 AND status = 'scheduled'
        AND EXISTS (SELECT 1 FROM pgsingleton.live_nodes l
                     WHERE l.singleton = cleanup_runs.singleton AND l.node_id = $2)
        -- Issued under the current epoch: a run an earlier holder issued waits for the new
        -- holder's tick, which closes it and issues its occurrence again (a worker that
        -- took it first would call a task's handler for a run about to be superseded).
        AND epoch = (SELECT le.epoch FROM pgsingleton.leases le WHERE le.name = cleanup_runs.singleton)
      RETURNING singleton, policy, epoch, attempt, scheduled_for, definition, rows_deleted, rows_skipped, batches,
                coalesced, reissued`,
    [runId, nodeId],
  )
  const row = rows[0]
  if (!row) {
    const { rows: live } = await pool.query(
      `SELECT 1 FROM pgsingleton.live_nodes l JOIN pgsingleton.cleanup_runs r
          ON r.id = $1 AND l.singleton = r.singleton WHERE l.node_id = $2`,
      [runId, nodeId],
    )
    return live.length > 0 ? 'not waiting' : 'not live'
  }
  return {
    runId,
    singleton: row.singleton,
    policy: row.policy,
    epoch: Number(row.epoch),
    attempt: row.attempt,
    scheduledFor: row.scheduled_for,
    definition: row.definition,
    rowsDeleted: Number(row.rows_deleted),
    rowsSkipped: Number(row.rows_skipped),
    batches: row.batches,
    coalesced: Number(row.coalesced),
    reissued: row.reissued,
  }
}

export interface BatchRequest {
  /** The oid of the table the batch deletes from (the policy's table, a partition or a child). */
  readonly leaf: number
  readonly strategy: 'index' | 'tidrange'
  /** Where the previous batch of this leaf stopped (opaque; null to start). */
  readonly cursor: unknown
  readonly limit: number
  /** Pages per batch of the tidrange strategy. */
  readonly span: number
  /** Step around rows that cannot go, at some cost; used after a batch failed. */
  readonly careful: boolean
}

export interface BatchResult {
  outcome: 'deleted' | 'fenced' | 'superseded' | 'disagree' | 'not live' | 'paused'
  selected: number
  deleted: number
  skipped: number
  cursor: unknown
  leafDone: boolean
  firstError: string | null
  cutoff: Date | null
  /** How long the batch's transaction took, by the server's clock. */
  elapsedMs: number
  /** Pages a page-order batch covered (it may shrink the span it was given); null along the index. */
  pages: number | null
}

/**
 * Worker: one batch, in one round trip. The limits and the batch go in one message, so
 * they run as one implicit transaction that commits when the batch returns: a worker
 * frozen after sending it holds no lock, and a transaction pooler keeps the message on
 * one server connection. Everything in the message is a validated number or an escaped
 * literal. The fence, the owner check, the agreement check, the delete, the progress and
 * the audit row are all in `pgsingleton.cleanup_batch`.
 *
 * Where no synchronous standby is configured, the batch commits without waiting for its
 * WAL flush: what a server crash can take back is the last batches whole, their deletes
 * with their progress and audit rows, never a part of one, and what comes back is rows
 * that are still outdated. The run's completion (`complete`) finds its record short of
 * what its batches returned and the run is tried again from the start. Commit order is
 * unchanged, so the fence holds as before: the next holder's epoch bump waits for the
 * batch and flushes it with its own commit, and so does the completion. Waiting for each
 * batch's flush cost about 3 ms between two batches on a local disk (bench). With
 * synchronous standbys each batch still waits for them, as the app's commits do: the
 * standby's pace is then the cleanup's, and a cleanup never runs ahead of it into the
 * app's commits. (A partition removed whole is not a batch: its own transaction commits
 * with the session's setting.)
 */
export async function recordBatch(
  pool: pg.Pool,
  limits: TransactionLimits,
  run: Claim,
  request: BatchRequest,
): Promise<BatchResult> {
  const int = (value: number) => {
    if (!Number.isSafeInteger(value)) throw new Error(`not an integer: ${value}`)
    return String(value)
  }
  const literal = (value: string) => pg.escapeLiteral(value)
  const text =
    `${localSettings(limits, { utc: false })}; ` +
    `SELECT set_config('synchronous_commit', 'off', true) WHERE current_setting('synchronous_standby_names') = ''; ` +
    'SELECT * FROM pgsingleton.cleanup_batch(' +
    [
      int(Number(run.runId)),
      int(run.attempt),
      int(request.leaf),
      literal(request.strategy),
      request.cursor === null ? 'NULL' : `${literal(JSON.stringify(request.cursor))}::jsonb`,
      int(request.limit),
      int(request.span),
      request.careful ? 'true' : 'false',
    ].join(', ') +
    ')'
  const results = (await pool.query(text)) as unknown as pg.QueryResult[]
  const row = results[results.length - 1]?.rows[0] as
    | {
        outcome: BatchResult['outcome']
        selected: number
        deleted: number
        skipped: number
        next_cursor: unknown
        leaf_done: boolean
        first_error: string | null
        cutoff: Date | null
        elapsed_ms: number | null
        pages: number | null
      }
    | undefined
  if (!row) throw new Error('pgsingleton.cleanup_batch returned no row')
  return {
    outcome: row.outcome,
    selected: row.selected,
    deleted: row.deleted,
    skipped: row.skipped,
    cursor: row.next_cursor,
    leafDone: row.leaf_done,
    firstError: row.first_error,
    cutoff: row.cutoff,
    elapsedMs: row.elapsed_ms ?? 0,
    pages: row.pages,
  }
}

export interface PartitionResult {
  outcome: BatchResult['outcome'] | 'dropped' | 'detached' | 'kept'
  removed: number
  reason: string | null
  cutoff: Date | null
}

/**
 * Worker: removes a partition whole (drop or detach, as the run's definition says) when
 * its upper bound is at or below the cut-off and every row in it is outdated, checked
 * under the lock the removal takes, in one fenced statement like a batch
 * (`pgsingleton.remove_partition`). `kept` (with the reason) leaves it to row deletes.
 */
export async function removePartition(
  pool: pg.Pool,
  limits: TransactionLimits,
  run: Claim,
  leaf: number,
): Promise<PartitionResult> {
  if (![Number(run.runId), run.attempt, leaf].every(Number.isSafeInteger))
    throw new Error('not an integer')
  const results = (await pool.query(
    `${localSettings(limits, { utc: false })}; SELECT * FROM pgsingleton.remove_partition(${Number(run.runId)}, ${run.attempt}, ${leaf})`,
  )) as unknown as pg.QueryResult[]
  const row = results[results.length - 1]?.rows[0] as
    | {
        outcome: PartitionResult['outcome']
        removed: string
        reason: string | null
        cutoff: Date | null
      }
    | undefined
  if (!row) throw new Error('pgsingleton.remove_partition returned no row')
  return {
    outcome: row.outcome,
    removed: Number(row.removed),
    reason: row.reason,
    cutoff: row.cutoff,
  }
}

/**
 * What a leaf's statistics say, in one round trip: the planner's share of its rows that are
 * outdated now (null without statistics), its heap pages and its column's physical order
 * (how scattered the rows of an index walk are expected to be; unknown values come back as
 * 0 pages and a null correlation). Only a choice of path and of a first size.
 */
export async function leafStatistics(
  pool: pg.Pool | pg.PoolClient,
  leaf: number,
  definition: PolicyDefinition,
): Promise<{ share: number | null; layout: Layout }> {
  const { rows } = await pool.query<{
    share: number | null
    pages: number | null
    correlation: number | null
  }>(
    `SELECT pgsingleton.outdated_share(c.oid, $3::jsonb) AS share,
            c.relpages::float8 AS pages,
            (SELECT s.correlation::float8 FROM pg_stats s
              WHERE s.schemaname = n.nspname AND s.tablename = c.relname
                AND s.attname = $2 AND NOT s.inherited) AS correlation
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1`,
    [leaf, definition.column, JSON.stringify(definition)],
  )
  return {
    share: rows[0]?.share ?? null,
    layout: { pages: Math.max(0, rows[0]?.pages ?? 0), correlation: rows[0]?.correlation ?? null },
  }
}

/**
 * Worker: marks the run done under the same fence as its batches, so a stale holder's
 * worker cannot complete it. An occurrence is completed at most once (a unique index);
 * a run that would be a second completion is fenced instead.
 *
 * A cleanup passes the counts its batches returned (`progress`: rows deleted and skipped,
 * and batches, partitions removed among them): the run is done only if the run's row
 * still holds them. Batches commit without waiting for their flush
 * (recordBatch), so a server crash can take back the last of them while the worker,
 * reconnected, walks on from where its own memory says; the rows those batches had
 * deleted are back, behind its cursor. Then the counts are short, and the run is not
 * done but `retaken`: the caller fails it (a failure that counts, so that counts that
 * differed for any other reason could not keep it running for ever), and it is tried
 * again from the start. A batch taken back that had deleted and skipped nothing left
 * nothing behind.
 */
export async function complete(
  pool: pg.Pool,
  limits: TransactionLimits,
  run: Claim,
  progress?: { rowsDeleted: number; rowsSkipped: number; batches: number },
): Promise<
  | { status: 'done' }
  | { status: 'fenced'; reason: string }
  | {
      status: 'retaken'
      reason: string
      /** What the run's record holds: what the batches that stayed deleted. */
      record: { rowsDeleted: number; rowsSkipped: number; batches: number }
    }
> {
  try {
    const fenced = await withFence(pool, limits, run, async (tx) => {
      // The run's row locked first: a holder closing it meanwhile is waited for, and seen.
      // The completion commits with its flush, flushing every batch before it, even where
      // the role or database has synchronous_commit off (any other value is left alone).
      const { rows } = await tx.query<{
        rows_deleted: string
        rows_skipped: string
        batches: number
      }>(
        `SELECT rows_deleted, rows_skipped, batches,
                CASE WHEN current_setting('synchronous_commit') = 'off'
                     THEN set_config('synchronous_commit', 'on', true) END
           FROM pgsingleton.cleanup_runs
          WHERE id = $1 AND attempt = $2 AND status = 'running'
          FOR UPDATE`,
        [run.runId, run.attempt],
      )
      const record = rows[0]
      if (!record) return 'closed' as const
      if (
        progress &&
        (Number(record.rows_deleted) !== progress.rowsDeleted ||
          Number(record.rows_skipped) !== progress.rowsSkipped ||
          record.batches !== progress.batches)
      )
        return record
      await tx.query(
        `UPDATE pgsingleton.cleanup_runs SET status = 'done', finished_at = now() WHERE id = $1`,
        [run.runId],
      )
      return 'done' as const
    })
    if (!fenced.fenced && fenced.result === 'done') return { status: 'done' }
    if (!fenced.fenced && typeof fenced.result === 'object' && progress) {
      const record = fenced.result
      return {
        status: 'retaken',
        record: {
          rowsDeleted: Number(record.rows_deleted),
          rowsSkipped: Number(record.rows_skipped),
          batches: record.batches,
        },
        reason: `the run's record holds ${record.rows_deleted} rows deleted, ${record.rows_skipped} skipped and ${record.batches} batches where its batches returned ${progress.rowsDeleted}, ${progress.rowsSkipped} and ${progress.batches}: a server crash or failover took back its last batches, whose rows are back; it runs again from the start`,
      }
    }
    const reason = fenced.fenced
      ? `epoch ${run.epoch} is no longer current: the run could not be completed`
      : 'the run was closed by a holder before it could be completed'
    await fence(pool, run, reason)
    return { status: 'fenced', reason }
  } catch (error) {
    if (sqlState(error) !== SQLSTATE.UNIQUE_VIOLATION) throw error
    const reason = 'this occurrence was already completed by another run'
    await fence(pool, run, reason)
    return { status: 'fenced', reason }
  }
}

/** Worker: closes its own run without finishing it; a holder issues the occurrence again. */
export async function fence(pool: pg.Pool, run: Claim, reason: string): Promise<void> {
  await pool.query(
    `UPDATE pgsingleton.cleanup_runs SET status = 'fenced', finished_at = now(), error = $3
      WHERE id = $1 AND attempt = $2 AND status = 'running'`,
    [run.runId, run.attempt, reason],
  )
}

/**
 * Worker: the run failed. It waits to be retried with backoff, or, after its last
 * allowed failure, is `exhausted`. An interruption (the node is stopping) does not count
 * as a failure and is retried at once.
 */
export async function fail(
  pool: pg.Pool,
  run: Claim,
  error: string,
  counts: boolean,
): Promise<{ status: RunStatus; retryAt: Date | null } | undefined> {
  const { rows } = await pool.query<{ status: RunStatus; retry_at: Date | null }>(
    `UPDATE pgsingleton.cleanup_runs
        SET failures = failures + $4,
            status = CASE WHEN failures + $4 >= $5 THEN 'exhausted' ELSE 'failed' END,
            retry_at = CASE WHEN failures + $4 >= $5 THEN NULL
                            ELSE now() + least($7::float8, $6::float8 * 2 ^ greatest(failures + $4 - 1, 0))
                                         * interval '1 second' END,
            finished_at = now(), error = $3
      WHERE id = $1 AND attempt = $2 AND status = 'running'
      RETURNING status, retry_at`,
    [
      run.runId,
      run.attempt,
      error,
      counts ? 1 : 0,
      RETRY.limit,
      RETRY.firstDelaySeconds,
      RETRY.maxDelaySeconds,
    ],
  )
  const row = rows[0]
  return row ? { status: row.status, retryAt: row.retry_at } : undefined
}
