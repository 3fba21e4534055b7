import { type ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { afterEach, expect } from 'vitest'

export const BIN = fileURLToPath(new URL('../../bin/pg-singleton.js', import.meta.url))

export interface NodeProcess {
  id: string
  child: ChildProcess
  output(): string
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  signal(signal: NodeJS.Signals): void
}

const running = new Set<NodeProcess>()

/** Writes a config file for a test and returns its path. */
export async function writeConfig(config: object): Promise<string> {
  const path = join(tmpdir(), `pg-singleton-config-${randomBytes(4).toString('hex')}.json`)
  await writeFile(path, JSON.stringify(config, null, 2))
  return path
}

/**
 * Runs the CLI as a real process, the node binary itself (not through npm exec), so a
 * signal reaches the node and nothing else.
 */
export function runCli(
  args: string[],
  env: Record<string, string | undefined>,
  cwd?: string,
): NodeProcess {
  let out = ''
  const child = spawn(process.execPath, [BIN, ...args], {
    env: { ...process.env, ...env },
    cwd,
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  child.stdout?.on('data', (chunk) => {
    out += chunk
  })
  child.stderr?.on('data', (chunk) => {
    out += chunk
  })
  const node: NodeProcess = {
    id: args[args.indexOf('--node-id') + 1] ?? 'cli',
    child,
    output: () => out,
    exited: new Promise((resolve) =>
      child.once('exit', (code, signal) => resolve({ code, signal })),
    ),
    signal: (signal) => {
      child.kill(signal)
    },
  }
  running.add(node)
  node.exited.then(() => running.delete(node))
  return node
}

export function startNode(
  url: string,
  config: string,
  nodeId: string,
  env: Record<string, string> = {},
): NodeProcess {
  return runCli(['run', '--config', config, '--node-id', nodeId], { DATABASE_URL: url, ...env })
}

/** SIGTERM to every node still running, and waits for all of them to exit. */
export async function stopAll(nodes: NodeProcess[]): Promise<void> {
  for (const node of nodes)
    if (node.child.exitCode === null && node.child.signalCode === null) node.signal('SIGTERM')
  await Promise.all(nodes.map((node) => node.exited))
}

/** For afterEach: kills what a test left running and reports it, so the test fails. */
export async function reapNodes(): Promise<string[]> {
  const left = [...running]
  for (const node of left) {
    node.child.kill('SIGCONT')
    node.child.kill('SIGKILL')
  }
  await Promise.all(left.map((node) => node.exited))
  return left.map((node) => node.id)
}

/** Fails each test of the file that leaves a node process running (and kills it). */
export function failOnNodesLeftRunning(): void {
  afterEach(async () => {
    expect(await reapNodes(), 'the test left node processes running').toEqual([])
  })
}
