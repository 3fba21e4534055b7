import type pg from 'pg'
import { withClient } from '../db/transaction.js'

export interface TransactionLimits {
  readonly lockTimeoutMs: number
  readonly statementTimeoutMs: number
  /** Bounds a transaction whose node froze between two statements (SIGSTOP, GC). */
  readonly idleInTransactionTimeoutMs: number
}

/** Who may write: the singleton and the epoch the work was issued under. */
export interface FenceToken {
  readonly singleton: string
  readonly epoch: number
}

/**
 * The session settings of every statement the runs module sends, SET LOCAL so that they
 * end with the transaction and never leak into the app's pool (and work through a
 * transaction pooler). The limits are validated numbers, which is why they can be
 * written into the statement. With `utc`, times are read in UTC whatever the role's
 * TimeZone, so schedule arithmetic is the same on every node. Batches leave it to
 * pgsingleton.cleanup_batch, which sets the policy's zone for its own transaction (the
 * tests run it in databases set east and west of UTC, so a predicate that leaned on the
 * session's zone would fail them).
 */
export function localSettings(limits: TransactionLimits, { utc }: { utc: boolean }): string {
  return (
    `SET LOCAL lock_timeout = ${Math.round(limits.lockTimeoutMs)}; ` +
    `SET LOCAL statement_timeout = ${Math.round(limits.statementTimeoutMs)}; ` +
    `SET LOCAL idle_in_transaction_session_timeout = ${Math.round(limits.idleInTransactionTimeoutMs)}` +
    (utc ? `; SET LOCAL TimeZone = 'UTC'` : '')
  )
}

/**
 * Runs `work` in one transaction that first passes the fence: the lease row is taken FOR
 * KEY SHARE at `token.epoch` (pgsingleton.fence, the one definition of the check, which
 * the batch function calls too). The next holder's epoch bump waits for this transaction;
 * once the bump has committed, no transaction of an older epoch passes. Resolves to
 * `{ fenced: true }` without calling `work` when the epoch is no longer current.
 */
export function withFence<T>(
  pool: pg.Pool,
  limits: TransactionLimits,
  token: FenceToken,
  work: (client: pg.PoolClient) => Promise<T>,
): Promise<{ fenced: true } | { fenced: false; result: T }> {
  return withClient(pool, async (client, drop) => {
    await client.query(`BEGIN; ${localSettings(limits, { utc: true })}`)
    try {
      const { rows } = await client.query<{ current: boolean }>(
        'SELECT pgsingleton.fence($1, $2) AS current',
        [token.singleton, token.epoch],
      )
      if (rows[0]?.current !== true) {
        await client.query('ROLLBACK')
        return { fenced: true as const }
      }
      const result = await work(client)
      await client.query('COMMIT')
      return { fenced: false as const, result }
    } catch (error) {
      await client.query('ROLLBACK').catch(drop)
      throw error
    }
  })
}
