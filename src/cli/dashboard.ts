import { startDashboard } from '../dashboard/server.js'
import { assertSchemaCurrent } from '../db/migrate.js'
import { commandClient, resolveConnection } from './connection.js'

const say = (line: string) => process.stderr.write(`${line}\n`)

/** `pg-singleton dashboard`: serves the status page until SIGINT or SIGTERM. */
export async function dashboardCommand(args: {
  embedded: boolean
  port: number
  host: string
}): Promise<void> {
  const { url } = await resolveConnection(say, args)
  const client = commandClient(url)
  await client.connect()
  try {
    await assertSchemaCurrent(client)
  } finally {
    await client.end()
  }
  const server = await startDashboard({ connectionString: url, port: args.port, host: args.host })
  // The first line on stdout is the address (a test or a script can read it).
  process.stdout.write(`${server.url}\n`)
  say(`pg-singleton dashboard on ${server.url} (JSON at ${server.url}api/status); Ctrl-C to stop`)
  const stop = () => {
    server.close().then(
      () => process.exit(0),
      () => process.exit(1),
    )
  }
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
}
