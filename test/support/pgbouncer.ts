import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { tmpdir, userInfo } from 'node:os'
import { join } from 'node:path'
import pg from 'pg'

export const PGBOUNCER = '/usr/sbin/pgbouncer'

/**
 * A real PgBouncer (Debian's package) in front of one test database. PgBouncer refuses to
 * run as root, so as root it runs as the `postgres` user.
 */
export class PgBouncer {
  #child: ChildProcess | undefined
  #dir = ''
  #log = ''
  port = 0

  constructor(
    private readonly targetUrl: string,
    private readonly mode: 'transaction' | 'session',
    private readonly poolSize = 5,
  ) {}

  /** The target database's URL, through the pooler. */
  get url(): string {
    const url = new URL(this.targetUrl)
    url.hostname = '127.0.0.1'
    url.port = String(this.port)
    return url.toString()
  }

  async start(): Promise<this> {
    const target = new URL(this.targetUrl)
    const db = target.pathname.slice(1)
    this.port = await freePort()
    this.#dir = await mkdtemp(join(tmpdir(), 'pgbouncer-'))
    const user = decodeURIComponent(target.username || 'postgres')
    const password = decodeURIComponent(target.password)
    await writeFile(join(this.#dir, 'userlist.txt'), `"${user}" "${password}"\n`)
    await writeFile(
      join(this.#dir, 'pgbouncer.ini'),
      `[databases]
${db} = host=${target.hostname} port=${target.port || 5432} dbname=${db} user=${user}${password ? ` password=${password}` : ''}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${this.port}
unix_socket_dir =
auth_type = trust
auth_file = ${join(this.#dir, 'userlist.txt')}
pool_mode = ${this.mode}
default_pool_size = ${this.poolSize}
max_client_conn = 500
server_round_robin = 0
ignore_startup_parameters = extra_float_digits,options,statement_timeout
logfile = ${join(this.#dir, 'pgbouncer.log')}
pidfile = ${join(this.#dir, 'pgbouncer.pid')}
`,
    )
    const asRoot = userInfo().uid === 0
    const ids = asRoot
      ? {
          uid: Number(execFileSync('id', ['-u', 'postgres']).toString().trim()),
          gid: Number(execFileSync('id', ['-g', 'postgres']).toString().trim()),
        }
      : {}
    if (asRoot) {
      await chmod(this.#dir, 0o777)
      execFileSync('chown', ['-R', 'postgres', this.#dir])
    }
    this.#child = spawn(PGBOUNCER, [join(this.#dir, 'pgbouncer.ini')], {
      stdio: ['ignore', 'pipe', 'pipe'],
      ...ids,
    })
    this.#child.stdout?.on('data', (chunk) => {
      this.#log += chunk
    })
    this.#child.stderr?.on('data', (chunk) => {
      this.#log += chunk
    })
    const deadline = Date.now() + 10_000
    for (;;) {
      const client = new pg.Client({ connectionString: this.url, connectionTimeoutMillis: 1000 })
      client.on('error', () => {})
      try {
        await client.connect()
        await client.query('SELECT 1')
        await client.end()
        return this
      } catch (error) {
        await client.end().catch(() => {})
        if (this.#child.exitCode !== null || Date.now() > deadline)
          throw new Error(`PgBouncer did not start: ${String(error)}\n${this.#log}`)
        await new Promise((resolve) => setTimeout(resolve, 100))
      }
    }
  }

  async stop(): Promise<void> {
    const child = this.#child
    if (child && child.exitCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve))
      child.kill('SIGINT')
      await exited
    }
    if (this.#dir) await rm(this.#dir, { recursive: true, force: true })
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
