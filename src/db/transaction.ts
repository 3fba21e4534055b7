import type pg from 'pg'

export interface TransactionLimits {
  readonly lockTimeoutMs: number
  readonly statementTimeoutMs: number
  /** Bounds a transaction whose node froze between two statements (SIGSTOP, GC). */
  readonly idleInTransactionTimeoutMs: number
}

/**
 * Runs `work` in one transaction on one pooled connection, with the limits set LOCAL so
 * they end with the transaction and never leak into the app's pool. The limits are
 * validated numbers, which is why they can be written into the statement.
 */
export async function inTransaction<T>(
  pool: pg.Pool,
  limits: TransactionLimits,
  work: (client: pg.PoolClient) => Promise<T>,
): Promise<T> {
  const client = await pool.connect()
  let broken: Error | undefined
  // pg-pool listens for errors only on idle clients. A checked-out client whose session
  // ends between two statements (terminated backend, database restart) emits 'error';
  // unheard, that would end the process. The failed statement reports it anyway.
  const onError = (error: Error) => {
    broken = error
  }
  client.on('error', onError)
  try {
    await client.query(
      `BEGIN; SET LOCAL lock_timeout = ${Math.round(limits.lockTimeoutMs)}; ` +
        `SET LOCAL statement_timeout = ${Math.round(limits.statementTimeoutMs)}; ` +
        `SET LOCAL idle_in_transaction_session_timeout = ${Math.round(limits.idleInTransactionTimeoutMs)}`,
    )
    const result = await work(client)
    await client.query('COMMIT')
    return result
  } catch (error) {
    await client.query('ROLLBACK').catch((rollbackError: Error) => {
      broken = rollbackError
    })
    throw error
  } finally {
    client.removeListener('error', onError)
    // A connection that failed is in an unknown state: drop it from the pool.
    client.release(broken)
  }
}
