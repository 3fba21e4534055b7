import type pg from 'pg'

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
