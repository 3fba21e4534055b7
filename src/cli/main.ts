import { parseArgs } from 'node:util'
import { config as loadDotenv } from 'dotenv'
import { SingletonError } from '../errors.js'

// Each command's module is loaded when that command runs: a node (`run`) then carries no
// code of the dashboard, the demo or the operator commands (a smaller process, whose crash
// the server notices sooner).
const commands = () => import('./commands.js')
const operatorCommands = () => import('./operator-commands.js')

const HELP = `pg-singleton: one cluster-wide scheduled singleton, held in PostgreSQL

Usage:
  pg-singleton migrate                      create or upgrade the pgsingleton schema (and pg-boss's)
  pg-singleton migrate --sql [--out DIR]    print (or write to DIR) the same migrations as SQL files
  pg-singleton run [--config F] [--node-id ID] [--verbose] [--metrics-port N]
                                            run a node: queue for the lock, schedule and clean;
                                            with --metrics-port, serve Prometheus metrics at
                                            http://HOST:N/metrics (--metrics-host, default 0.0.0.0)
  pg-singleton status [--json] [--watch] [--name N]
                                            who holds the singleton, who waits, each policy
  pg-singleton plan [--config F] [--json]   what each policy would delete now, and how;
                                            deletes nothing
  pg-singleton pause|resume POLICY [--name N]
                                            stop, or start again, a policy's runs
  pg-singleton run-now POLICY [--name N]    a run of the policy now, outside its schedule
  pg-singleton dashboard [--port N] [--host H]
                                            a read-only status page (live), and its JSON at
                                            /api/status; default http://127.0.0.1:8089
  pg-singleton forget [--name N]            remove every record of a singleton that no
                                            longer exists (refused while a node of it lives)
  pg-singleton demo                         three nodes, a table to clean, a failover, live
                                            (always on the embedded PostgreSQL)
  pg-singleton embedded start|url|stop      the embedded PostgreSQL for trying things out

Options:
  --embedded     use the embedded PostgreSQL (data under ./.pg-singleton) instead of
                 DATABASE_URL; without DATABASE_URL every command but demo and embedded
                 needs it

Environment (a .env file in the working directory is loaded):
  DATABASE_URL                  the PostgreSQL to use
  PG_SINGLETON_LOCK_URL         where the lock session connects, when DATABASE_URL goes
                                through a transaction pooler (PgBouncer): PostgreSQL itself
  PG_SINGLETON_EMBEDDED_PORT    port of the embedded PostgreSQL (default 54329)

--config defaults to ./pg-singleton.config.json.
`

export async function main(argv: string[]): Promise<number> {
  loadDotenv({ quiet: true })
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string', short: 'c', default: './pg-singleton.config.json' },
      'node-id': { type: 'string' },
      json: { type: 'boolean', default: false },
      watch: { type: 'boolean', default: false },
      name: { type: 'string' },
      verbose: { type: 'boolean', short: 'v', default: false },
      embedded: { type: 'boolean', default: false },
      sql: { type: 'boolean', default: false },
      out: { type: 'string' },
      'metrics-port': { type: 'string' },
      'metrics-host': { type: 'string' },
      port: { type: 'string' },
      host: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  })
  const [command, action] = positionals
  if (values.help || !command) {
    process.stdout.write(HELP)
    return command || values.help ? 0 : 2
  }
  switch (command) {
    case 'migrate':
      await (await commands()).migrateCommand({
        embedded: values.embedded,
        sql: values.sql,
        out: values.out,
      })
      return 0
    case 'run':
      await (await commands()).runCommand({
        config: values.config,
        nodeId: values['node-id'],
        verbose: values.verbose,
        embedded: values.embedded,
        metricsPort: port(values['metrics-port'], '--metrics-port', 1),
        metricsHost: values['metrics-host'],
      })
      return -1 // keeps running until a signal
    case 'dashboard':
      await (await import('./dashboard.js')).dashboardCommand({
        embedded: values.embedded,
        port: port(values.port, '--port') ?? 8089,
        host: values.host ?? '127.0.0.1',
      })
      return -1 // serves until a signal
    case 'status':
      await (await commands()).statusCommand({
        json: values.json,
        name: values.name,
        embedded: values.embedded,
        watch: values.watch,
      })
      return 0
    case 'plan':
      await (await operatorCommands()).planCommand({
        config: values.config,
        embedded: values.embedded,
        json: values.json,
      })
      return 0
    case 'pause':
    case 'resume':
    case 'run-now':
      await (await operatorCommands()).controlCommand(command, action, {
        config: values.config,
        name: values.name,
        embedded: values.embedded,
      })
      return 0
    case 'forget':
      await (await operatorCommands()).forgetCommand({
        config: values.config,
        name: values.name,
        embedded: values.embedded,
      })
      return 0
    case 'demo':
      await (await import('./demo.js')).demoCommand()
      return 0
    case 'embedded':
      await (await commands()).embeddedCommand(action)
      return 0
    default:
      process.stderr.write(`unknown command "${command}"\n\n${HELP}`)
      return 2
  }
}

/** A TCP port from the command line (0: any free one). */
/** A port flag's value; 0 (any free port) only where the address is printed after listening. */
function port(value: string | undefined, flag: string, min = 0): number | undefined {
  if (value === undefined) return undefined
  const n = Number(value)
  if (!Number.isInteger(n) || n < min || n > 65535) {
    throw new SingletonError(
      'INVALID_OPTION',
      `${flag}: "${value}" is not a port number (${min}-65535).`,
    )
  }
  return n
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code >= 0) process.exit(code)
  },
  (error: unknown) => {
    const code = error instanceof SingletonError ? ` [${error.code}]` : ''
    process.stderr.write(
      `pg-singleton: ${error instanceof Error ? error.message : String(error)}${code}\n`,
    )
    process.exit(1)
  },
)
