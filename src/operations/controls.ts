import type pg from 'pg'
import { NAME_PATTERN } from '../config/policy.js'
import { SingletonError } from '../errors.js'

type Db = pg.Pool | pg.Client

/**
 * What an operator decides about a policy, stored in `pgsingleton.policy_controls` and
 * honoured by whichever node holds the singleton, whether or not any node has run the
 * policy yet. A paused policy gets no new run, and a run in flight stops at its next batch
 * (its occurrence runs again after `resume`).
 */
export async function pausePolicy(
  db: Db,
  singleton: string,
  policy: string,
  by: string,
): Promise<void> {
  checkNames(singleton, policy)
  await db.query(
    `INSERT INTO pgsingleton.policy_controls (singleton, policy, paused, changed_at, changed_by)
     VALUES ($1, $2, true, now(), $3)
     ON CONFLICT (singleton, policy) DO UPDATE
       SET paused = true, changed_at = now(), changed_by = excluded.changed_by`,
    [singleton, policy, by],
  )
}

export async function resumePolicy(
  db: Db,
  singleton: string,
  policy: string,
  by: string,
): Promise<void> {
  checkNames(singleton, policy)
  await db.query(
    `INSERT INTO pgsingleton.policy_controls (singleton, policy, paused, changed_at, changed_by)
     VALUES ($1, $2, false, now(), $3)
     ON CONFLICT (singleton, policy) DO UPDATE
       SET paused = false, changed_at = now(), changed_by = excluded.changed_by`,
    [singleton, policy, by],
  )
}

/**
 * Asks the holder for a run of the policy now, outside its schedule (whose grid stays as
 * it is). The commit announces it (migrations/0008), and the holder issues it at once, or
 * when the policy's open run ends. Refused while the policy is paused.
 */
export async function requestRun(
  db: Db,
  singleton: string,
  policy: string,
  by: string,
): Promise<void> {
  checkNames(singleton, policy)
  const { rows } = await db.query<{ paused: boolean }>(
    `INSERT INTO pgsingleton.policy_controls (singleton, policy, run_now_at, changed_at, changed_by)
     VALUES ($1, $2, date_trunc('milliseconds', now()), now(), $3)
     ON CONFLICT (singleton, policy) DO UPDATE
       SET run_now_at = CASE WHEN policy_controls.paused THEN NULL ELSE date_trunc('milliseconds', now()) END,
           changed_at = now(), changed_by = excluded.changed_by
     RETURNING paused`,
    [singleton, policy, by],
  )
  if (rows[0]?.paused) {
    throw new SingletonError(
      'INVALID_OPTION',
      `policy "${policy}" of singleton "${singleton}" is paused; resume it first (pg-singleton resume ${policy}).`,
    )
  }
}

/**
 * Removes every trace of a singleton that no longer exists: its lease, schedules, runs,
 * batches, node registrations and controls. Refused while any node of it is live.
 */
export async function forgetSingleton(db: Db, singleton: string): Promise<{ runs: number }> {
  checkNames(singleton)
  const { rows: live } = await db.query<{ node_id: string }>(
    `SELECT node_id FROM pgsingleton.live_nodes WHERE singleton = $1
     UNION SELECT node_id FROM pgsingleton.status WHERE name = $1 AND node_id IS NOT NULL`,
    [singleton],
  )
  if (live.length > 0) {
    throw new SingletonError(
      'INVALID_OPTION',
      `singleton "${singleton}" still has live nodes (${live.map((r) => r.node_id).join(', ')}); stop them before forgetting it.`,
    )
  }
  const { rows } = await db.query<{ runs: number }>(
    `WITH runs AS (DELETE FROM pgsingleton.cleanup_runs WHERE singleton = $1 RETURNING 1),
          s AS (DELETE FROM pgsingleton.schedules WHERE singleton = $1),
          c AS (DELETE FROM pgsingleton.policy_controls WHERE singleton = $1),
          n AS (DELETE FROM pgsingleton.nodes WHERE singleton = $1),
          l AS (DELETE FROM pgsingleton.leases WHERE name = $1),
          -- the epochs start again at 1: the old terms would collide with the new ones
          t AS (DELETE FROM pgsingleton.terms WHERE name = $1)
     SELECT count(*)::int AS runs FROM runs`,
    [singleton],
  )
  return { runs: rows[0]?.runs ?? 0 }
}

function checkNames(singleton: string, policy?: string): void {
  for (const [what, value] of [
    ['singleton', singleton],
    ['policy', policy],
  ] as const) {
    if (value !== undefined && !NAME_PATTERN.test(value)) {
      throw new SingletonError(
        'INVALID_OPTION',
        `${what} name ${JSON.stringify(value)} must be 1-100 letters, digits, "_", "-" or ".".`,
      )
    }
  }
}
