import type pg from 'pg'

/**
 * Runs `work` on one pooled connection and gives it back. pg-pool listens for errors only
 * on idle clients: a checked-out client whose session ends between two statements
 * (terminated backend, database restart) emits 'error', which unheard would end the
 * process. Here it is heard from the moment the pool hands the client over: the listener
 * goes on in pg-pool's callback, not after an awaited promise, because the message that
 * ends the session can be parsed from the same chunk as the one that made the client
 * ready (a new connection's ReadyForQuery, or the last query's), before any promise
 * continuation runs (seen: a holder's backends terminated right after its takeover).
 * Such a connection, or one `work` marks with `drop`, is in an unknown state and leaves
 * the pool instead of going back to it.
 */
export async function withClient<T>(
  pool: pg.Pool,
  work: (client: pg.PoolClient, drop: (error: Error) => void) => Promise<T>,
): Promise<T> {
  let broken: Error | undefined
  const drop = (error: Error) => {
    broken = error
  }
  const client = await new Promise<pg.PoolClient>((resolve, reject) => {
    pool.connect((error, connected) => {
      if (error || !connected) return reject(error ?? new Error('the pool gave no connection'))
      connected.on('error', drop)
      resolve(connected)
    })
  })
  try {
    return await work(client, drop)
  } finally {
    client.removeListener('error', drop)
    client.release(broken)
  }
}
