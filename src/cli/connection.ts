import { join } from 'node:path'
import pg from 'pg'
import { migrateToLatest } from '../db/migrate.js'
import { SingletonError } from '../errors.js'
import { EMBEDDED_DEFAULT_PORT, EMBEDDED_HOME, ensureEmbedded } from './embedded.js'

/**
 * A pool for a CLI command. A connection that dies while idle (a restart) makes pg emit
 * 'error', which unheard would end the process with Node's raw message: heard here, the
 * next query opens a new connection, or fails with a clear error.
 */
export function commandPool(url: string, max = 1): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max })
  pool.on('error', () => {})
  return pool
}

/** A client for a CLI command, heard the same way: the next statement fails with its loss. */
export function commandClient(url: string): pg.Client {
  const client = new pg.Client({ connectionString: url })
  client.on('error', () => {})
  return client
}

export interface Connection {
  url: string
  embedded: boolean
}

/**
 * DATABASE_URL, or, only when asked for (`--embedded`, the demo), the embedded PostgreSQL
 * under ./.pg-singleton, started if needed and migrated. Without either, nothing is
 * started: a command that quietly ran against a database of its own while the real
 * cluster ran elsewhere would report on the wrong database.
 */
export async function resolveConnection(
  say: (line: string) => void,
  { embedded }: { embedded: boolean },
): Promise<Connection> {
  const url = process.env.DATABASE_URL
  if (!embedded) {
    if (url) return { url, embedded: false }
    throw new SingletonError(
      'INVALID_OPTION',
      'DATABASE_URL is not set: set it (in the environment or a .env file) to the PostgreSQL your app uses, ' +
        'e.g. DATABASE_URL=postgres://app@db/app. To try pg-singleton on a local embedded PostgreSQL instead, pass --embedded. Nothing was started.',
    )
  }
  if (url) say('--embedded: using the embedded PostgreSQL, not DATABASE_URL.')
  const port = Number(process.env.PG_SINGLETON_EMBEDDED_PORT ?? EMBEDDED_DEFAULT_PORT)
  const dataDir = join(EMBEDDED_HOME, 'pgdata')
  const server = await ensureEmbedded(dataDir, port)
  say(
    `Embedded PostgreSQL: ${server.started ? 'started' : 'using'} the one on 127.0.0.1:${port} (data in ${server.dataDir}). ` +
      'It keeps running for other local nodes; stop it with `pg-singleton embedded stop`.',
  )
  const pool = commandPool(server.url)
  try {
    await migrateToLatest(pool)
  } finally {
    await pool.end()
  }
  return { url: server.url, embedded: true }
}
