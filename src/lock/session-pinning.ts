import pg from 'pg'
import { SingletonError } from '../errors.js'

/**
 * Does a connection keep one server session? Through a transaction pooler (PgBouncer in
 * `pool_mode = transaction`, and the like) each statement runs on whichever server
 * connection is free, and a session advisory lock stays on that server connection after
 * the client is gone. Two things give a pooler away, and together cover it idle and busy:
 *
 * - Another client on the same URL is handed our server session. An idle PgBouncer reuses
 *   the most recently used server connection (LIFO, its default), which is ours; with a
 *   direct connection or a session pooler, another client always has a session of its own.
 * - Our own next statement runs in another server session: a busy pooler, or one that
 *   rotates its server connections, hands it to whichever is free.
 *
 * `client` is the connection under test; `config` opens the second client.
 */
export async function keepsSession(
  client: pg.Client,
  config: pg.ClientConfig,
): Promise<{ kept: true } | { kept: false; reason: string }> {
  const pidOf = async (c: pg.Client) =>
    (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]?.pid ?? -1
  const ours = await pidOf(client)
  for (let round = 0; round < 3; round++) {
    const other = new pg.Client({ connectionTimeoutMillis: 10_000, ...config })
    other.on('error', () => {})
    await other.connect()
    try {
      const theirs = await pidOf(other)
      if (theirs === ours) return { kept: false, reason: sharedSession(ours) }
      const again = await pidOf(client)
      if (again !== ours)
        return {
          kept: false,
          reason: `two statements of one client ran in two server sessions (backends ${ours} and ${again})`,
        }
    } finally {
      await other.end().catch(() => {})
    }
  }
  return { kept: true }
}

/** What a second client handed the session's backend `pid` gives away: a transaction pooler. */
export function sharedSession(pid: number): string {
  return `another client on the same URL was handed this connection's server session (backend ${pid})`
}

/** Whether connections on `config` keep their server sessions (false behind a transaction pooler). */
export async function connectionKeepsSession(config: pg.ClientConfig): Promise<boolean> {
  const client = new pg.Client({ connectionTimeoutMillis: 10_000, ...config })
  client.on('error', () => {})
  await client.connect()
  try {
    return (await keepsSession(client, config)).kept
  } finally {
    await client.end().catch(() => {})
  }
}

/** The error for a lock connection that does not keep its session. */
export function sessionNotKept(reason: string): SingletonError {
  return new SingletonError(
    'SESSION_NOT_KEPT',
    `The lock connection does not keep one server session: ${reason}. It goes through a transaction-pooling proxy ` +
      '(PgBouncer with pool_mode = transaction, or similar), where a session advisory lock would stay on a pooled server ' +
      'connection after this node is gone, and guard nothing. Point the lock session at PostgreSQL itself or a session-mode ' +
      'pool: PG_SINGLETON_LOCK_URL (CLI) or lockConnectionString (library); the rest may stay on the pooler.',
  )
}
