import { join } from 'node:path'
import pg from 'pg'
import { migrateToLatest } from '../db/migrate.js'
import { EMBEDDED_DEFAULT_PORT, EMBEDDED_HOME, ensureEmbedded } from './embedded.js'

export interface Connection {
  url: string
  embedded: boolean
}

/**
 * DATABASE_URL when set; otherwise the embedded PostgreSQL under ./.pg-singleton, started
 * if needed and migrated, so a new user can try everything with no database at all.
 */
export async function resolveConnection(say: (line: string) => void): Promise<Connection> {
  const url = process.env.DATABASE_URL
  if (url) return { url, embedded: false }
  const port = Number(process.env.PG_SINGLETON_EMBEDDED_PORT ?? EMBEDDED_DEFAULT_PORT)
  const dataDir = join(EMBEDDED_HOME, 'pgdata')
  const server = await ensureEmbedded(dataDir, port)
  say(
    `No DATABASE_URL: ${server.started ? 'started' : 'using'} the embedded PostgreSQL on 127.0.0.1:${port} (data in ${server.dataDir}). ` +
      'It keeps running for other local nodes; stop it with `pg-singleton embedded stop`.',
  )
  const pool = new pg.Pool({ connectionString: server.url, max: 1 })
  try {
    await migrateToLatest(pool)
  } finally {
    await pool.end()
  }
  return { url: server.url, embedded: true }
}
