import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { writeFile } from 'node:fs/promises'
import { cpus, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import pg from 'pg'

export const BIN = fileURLToPath(new URL('../../bin/pg-singleton.js', import.meta.url))
export const ROOT = fileURLToPath(new URL('../..', import.meta.url))

/** A latency distribution as the report prints it. */
export interface Distribution {
  n: number
  p50: number
  p95: number
  p99: number
  max: number
}

export function distribution(values: number[]): Distribution {
  const sorted = [...values].sort((a, b) => a - b)
  const at = (q: number) =>
    sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] ?? Number.NaN
  return {
    n: sorted.length,
    p50: at(0.5),
    p95: at(0.95),
    p99: at(0.99),
    max: sorted.at(-1) ?? Number.NaN,
  }
}

export const ms = (value: number, digits = 1) => `${value.toFixed(digits)} ms`

export function machine(pgVersion: string): { text: string; json: object } {
  const cpu = cpus()[0]?.model ?? 'unknown CPU'
  const json = {
    measuredAt: new Date().toISOString(),
    cpus: cpus().length,
    cpu,
    memoryGiB: Math.round(totalmem() / 2 ** 30),
    node: process.version,
    postgresql: pgVersion,
  }
  return {
    json,
    text: `Measured ${json.measuredAt} on ${json.cpus} × ${cpu}, ${json.memoryGiB} GiB RAM, Node ${process.version}, PostgreSQL ${pgVersion} over loopback (127.0.0.1).`,
  }
}

export interface NodeProcess {
  id: string
  child: ChildProcess
  exited: Promise<void>
}

/** A `pg-singleton run` process, as an app's sidecar would run it. */
export function startNode(
  url: string,
  config: string,
  id: string,
  env: Record<string, string> = {},
): NodeProcess {
  const child = spawn(process.execPath, [BIN, 'run', '--config', config, '--node-id', id], {
    env: { ...process.env, DATABASE_URL: url, ...env },
    stdio: 'ignore',
  })
  return { id, child, exited: new Promise((resolve) => child.once('exit', () => resolve())) }
}

/** A Node process running `source` (an ES module) from the package's folder, so it can import pg. */
export function script(source: string, env: Record<string, string> = {}): ChildProcess {
  return spawn(process.execPath, ['--input-type=module', '-e', source], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
}

export async function writeConfig(config: object): Promise<string> {
  const path = join(tmpdir(), `pg-singleton-bench-${randomBytes(4).toString('hex')}.json`)
  await writeFile(path, JSON.stringify(config))
  return path
}

export function rssMiB(pid: number | undefined): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024
}

/** CPU seconds (user + system) a process has used. */
export function cpuSeconds(pid: number | undefined): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? []
  return (Number(fields[11]) + Number(fields[12])) / 100
}

/**
 * How long a holder has held before a failover trial ends it: a random 0.5 to 5.5 s, a
 * whole cycle of its scheduler's ticks (at most 5 s apart) after its start-up, so a trial
 * strikes at a random phase of a settled holdership, a fenced tick in flight as often as
 * it happens. The failover section also strikes holders right after their takeover.
 */
export function settlePhaseMs(): number {
  return 500 + Math.random() * 5000
}

export async function waitUntil<T>(
  probe: () => Promise<T | undefined>,
  timeoutMs = 60_000,
  everyMs = 1,
): Promise<T> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    const value = await probe()
    if (value !== undefined) return value
    if (performance.now() > deadline) throw new Error(`gave up after ${timeoutMs} ms`)
    if (everyMs > 0) await new Promise((resolve) => setTimeout(resolve, everyMs))
  }
}

export async function scratchDatabase(
  serverUrl: string,
): Promise<{ url: string; drop(): Promise<void> }> {
  const name = `pgs_bench_${randomBytes(4).toString('hex')}`
  const admin = new pg.Client({ connectionString: serverUrl })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  const url = new URL(serverUrl)
  url.pathname = `/${name}`
  return {
    url: url.toString(),
    async drop() {
      await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
      await admin.end()
    },
  }
}
