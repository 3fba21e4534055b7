/**
 * The statuses of a run, defined once; the CHECK constraint on
 * `pgsingleton.cleanup_runs.status` lists the same (a test holds them equal).
 *
 * - `scheduled`: issued with a job; no worker has claimed it yet.
 * - `running`: claimed by a worker (attempt n); only that attempt may write it.
 * - `failed`: failed, and waiting to be retried at `retry_at`.
 * - `done`: finished; rows it could not delete, if any, are in `rows_skipped`, the first
 *   reason in `error`.
 * - `fenced`: closed without finishing (its epoch moved on, its worker is gone, or the
 *   nodes stopped agreeing on its definition); a holder issues the occurrence again.
 * - `exhausted`: failed on every retry; final. The policy's next occurrence runs as usual.
 */
export const RUN_STATUSES = [
  'scheduled',
  'running',
  'failed',
  'done',
  'fenced',
  'exhausted',
] as const
export type RunStatus = (typeof RUN_STATUSES)[number]

/** A policy has at most one run in these (a unique index holds it). */
export const OPEN_STATUSES = ['scheduled', 'running', 'failed'] as const satisfies RunStatus[]

/** SQL list of the open statuses, for statements of the runs module. */
export const OPEN_SQL = OPEN_STATUSES.map((status) => `'${status}'`).join(', ')

/**
 * SQL test that a policy is paused by an operator (`pgsingleton.policy_controls`), for the
 * statements that leave paused policies out (the holder's tick, a task's look before its
 * handler): `singleton` and `policy` are SQL expressions of the statement it goes into (a
 * column or a parameter), never user input.
 */
export function pausedSql(singleton: string, policy: string): string {
  return `EXISTS (SELECT 1 FROM pgsingleton.policy_controls paused_control
                   WHERE paused_control.singleton = ${singleton} AND paused_control.policy = ${policy}
                     AND paused_control.paused)`
}
