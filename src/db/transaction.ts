import type pg from 'pg'

export interface TransactionLimits {
  readonly lockTimeoutMs: number
  readonly statementTimeoutMs: number
  /** Bounds a transaction whose node froze between two statements (SIGSTOP, GC). */
  readonly idleInTransactionTimeoutMs: number
}

/**
 * Runs `work` on one pooled connection and gives it back. pg-pool listens for errors only
 * on idle clients: a checked-out client whose session ends between two statements
 * (terminated backend, database restart) emits 'error', which unheard would end the
 * process. Here it is heard, and such a connection, or one `work` marks with `drop`, is
 * in an unknown state and leaves the pool instead of going back to it.
 */
export async function withClient<T>(
  pool: pg.Pool,
  work: (client: pg.PoolClient, drop: (error: Error) => void) => Promise<T>,
): Promise<T> {
  const client = await pool.connect()
  let broken: Error | undefined
  const drop = (error: Error) => {
    broken = error
  }
  client.on('error', drop)
  try {
    return await work(client, drop)
  } finally {
    client.removeListener('error', drop)
    client.release(broken)
  }
}

/**
 * Runs `work` in one transaction on one pooled connection, with the limits set LOCAL so
 * they end with the transaction and never leak into the app's pool. The limits are
 * validated numbers, which is why they can be written into the statement.
 */
export function inTransaction<T>(
  pool: pg.Pool,
  limits: TransactionLimits,
  work: (client: pg.PoolClient) => Promise<T>,
): Promise<T> {
  return withClient(pool, async (client, drop) => {
    await client.query(
      `BEGIN; SET LOCAL lock_timeout = ${Math.round(limits.lockTimeoutMs)}; ` +
        `SET LOCAL statement_timeout = ${Math.round(limits.statementTimeoutMs)}; ` +
        `SET LOCAL idle_in_transaction_session_timeout = ${Math.round(limits.idleInTransactionTimeoutMs)}`,
    )
    try {
      const result = await work(client)
      await client.query('COMMIT')
      return result
    } catch (error) {
      await client.query('ROLLBACK').catch(drop)
      throw error
    }
  })
}
