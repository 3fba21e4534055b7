import { mkdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import type pg from 'pg'
import { migrationFiles } from '../../migrations/index.js'
import { loadConfigFile, loadTasks } from '../config/config-file.js'
import { consoleLogger } from '../config/logger.js'
import { defaultNodeId } from '../config/options.js'
import { assertSchemaCurrent, migrateToLatest } from '../db/migrate.js'
import { createSingleton } from '../singleton.js'
import {
  describeDisagreement,
  type PolicyStatus,
  readPolicyStatus,
} from '../status/read-policy-status.js'
import { readStatus, type SingletonStatus } from '../status/read-status.js'
import { readTerms, type Term } from '../status/read-terms.js'
import { sleep } from '../wait.js'
import { commandClient, commandPool, resolveConnection } from './connection.js'
import { EMBEDDED_HOME, stopEmbedded } from './embedded.js'

const say = (line: string) => process.stderr.write(`${line}\n`)

export async function migrateCommand(args: {
  embedded: boolean
  sql?: boolean
  out?: string
}): Promise<void> {
  if (args.sql) {
    // The same migrations as SQL, for teams that run their own migration tool.
    const files = migrationFiles()
    if (!args.out) {
      for (const [name, text] of Object.entries(files))
        process.stdout.write(`-- ==== ${name}\n${text}\n`)
      return
    }
    await mkdir(args.out, { recursive: true })
    for (const [name, text] of Object.entries(files)) await writeFile(join(args.out, name), text)
    say(`Wrote ${Object.keys(files).join(', ')} to ${args.out}.`)
    return
  }
  const { url } = await resolveConnection(say, args)
  const pool = commandPool(url)
  try {
    const result = await migrateToLatest(pool)
    say(
      result.applied.length > 0
        ? `Applied ${result.applied.join(', ')}; schema pgsingleton is at version ${result.schemaVersion}, revision ${result.revision}.`
        : `Schema pgsingleton is up to date (version ${result.schemaVersion}, revision ${result.revision}).`,
    )
  } finally {
    await pool.end()
  }
}

export async function runCommand(args: {
  config: string
  nodeId?: string
  verbose?: boolean
  embedded: boolean
  metricsPort?: number
  metricsHost?: string
}): Promise<void> {
  const file = await loadConfigFile(args.config)
  const tasks = file.tasks ? await loadTasks(file.tasks) : undefined
  const nodeId = args.nodeId ?? defaultNodeId()
  const logger = consoleLogger(nodeId, args.verbose)
  // Registered before the node makes its instruments; loaded only when asked for.
  const metrics =
    args.metricsPort === undefined
      ? undefined
      : await serveMetrics(args.metricsPort, args.metricsHost ?? '0.0.0.0')
  if (metrics) logger.info({ url: metrics.url }, 'metrics in Prometheus text format')
  const { url } = await resolveConnection(say, args)
  const singleton = createSingleton({
    ...file,
    tasks,
    connectionString: url,
    lockConnectionString: process.env.PG_SINGLETON_LOCK_URL || undefined,
    nodeId,
    logger,
  })
  // Background errors are already logged, and a node lives through them, except one that
  // says it cannot run safely here (the lock session goes through a transaction pooler):
  // the node has stopped itself, and the process exits non-zero.
  singleton.on('error', (error) => {
    if ((error as { code?: string }).code !== 'SESSION_NOT_KEPT') return
    say(`pg-singleton: ${error.message} [SESSION_NOT_KEPT]`)
    singleton.stop().then(
      () => process.exit(1),
      () => process.exit(1),
    )
  })

  let stopping: Promise<void> | undefined
  const stop = (signal: string) => {
    if (stopping) {
      say(`${signal} again: exiting now`)
      process.exit(130)
    }
    stopping = singleton.stop().then(
      async () => {
        await metrics?.shutdown().catch(() => {})
        process.exit(0)
      },
      (error) => {
        logger.error({ error: String(error) }, 'stop failed')
        process.exit(1)
      },
    )
    // Logged once the stop has begun: a holder's hand-over is sent first.
    logger.info({ signal }, 'stopping: handing the lock over, letting the batch in flight end')
  }
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
  await singleton.start()
  logger.info(
    { singleton: file.name, policies: file.policies?.length ?? 0, tasks: tasks?.length ?? 0 },
    'started',
  )
}

/**
 * An OpenTelemetry MeterProvider whose Prometheus exporter serves `/metrics` on `port`,
 * registered as the global one, so the node's instruments report to it.
 */
async function serveMetrics(
  port: number,
  host: string,
): Promise<{ url: string; shutdown(): Promise<void> }> {
  const [{ metrics }, { MeterProvider }, { PrometheusExporter }] = await Promise.all([
    import('@opentelemetry/api'),
    import('@opentelemetry/sdk-metrics'),
    import('@opentelemetry/exporter-prometheus'),
  ])
  const exporter = await new Promise<InstanceType<typeof PrometheusExporter>>((resolve, reject) => {
    const created: InstanceType<typeof PrometheusExporter> = new PrometheusExporter(
      { port, host, endpoint: '/metrics' },
      (error) => (error ? reject(error) : resolve(created)),
    )
  })
  const provider = new MeterProvider({ readers: [exporter] })
  metrics.setGlobalMeterProvider(provider)
  return {
    url: `http://${host === '0.0.0.0' ? '127.0.0.1' : host}:${port}/metrics`,
    shutdown: () => provider.shutdown(),
  }
}

export async function statusCommand(args: {
  json?: boolean
  name?: string
  embedded: boolean
  watch?: boolean
}): Promise<void> {
  const { url } = await resolveConnection(say, args)
  const client = commandClient(url)
  await client.connect()
  try {
    await assertSchemaCurrent(client)
    if (args.watch) return await watch(client, args.name)
    const rows = await readStatus(client, args.name)
    const policies = await readPolicyStatus(client, args.name)
    const terms = await readTerms(client, args.name, 10)
    process.stdout.write(
      args.json
        ? `${JSON.stringify(
            rows.map((row) => ({
              ...row,
              policies: policies.filter((p) => p.singleton === row.name),
              terms: terms.filter((t) => t.name === row.name),
            })),
            null,
            2,
          )}\n`
        : formatStatus(rows, policies, terms),
    )
  } finally {
    await client.end()
  }
}

/** Redraws the status every second until Ctrl-C. */
async function watch(client: pg.Client, name: string | undefined): Promise<void> {
  let stopped = false
  const stop = () => {
    stopped = true
  }
  process.once('SIGINT', stop)
  process.once('SIGTERM', stop)
  while (!stopped) {
    const [rows, policies, terms, now] = await Promise.all([
      readStatus(client, name),
      readPolicyStatus(client, name),
      readTerms(client, name, 5),
      client.query<{ now: Date }>('SELECT now()'),
    ])
    process.stdout.write(
      `\x1b[2J\x1b[H${now.rows[0]?.now.toISOString()} (every 1 s; Ctrl-C to stop)\n\n${formatStatus(rows, policies, terms)}`,
    )
    await sleep(1000)
  }
}

export async function embeddedCommand(action: string | undefined): Promise<void> {
  if (action === 'stop') {
    const stopped = await stopEmbedded(join(EMBEDDED_HOME, 'pgdata'))
    say(stopped ? 'Stopped the embedded PostgreSQL.' : 'No embedded PostgreSQL was running.')
    return
  }
  if (action === 'start' || action === 'url') {
    // `url` prints the URL alone on stdout, for `psql "$(pg-singleton embedded url)"`.
    const tell = action === 'url' ? (line: string) => process.stderr.write(`${line}\n`) : say
    const { url } = await resolveConnection(tell, { embedded: true })
    process.stdout.write(`${url}\n`)
    return
  }
  throw new Error('usage: pg-singleton embedded start|url|stop')
}

export function formatStatus(
  rows: SingletonStatus[],
  policies: PolicyStatus[] = [],
  terms: Term[] = [],
): string {
  const names = [
    ...new Set([...rows.map((r) => r.name), ...policies.map((p) => p.singleton)]),
  ].sort()
  if (names.length === 0) return 'No singleton has run against this database yet.\n'
  const time = (value: Date | null) => (value ? value.toISOString() : '-')
  return names
    .map((name) => {
      const row = rows.find((r) => r.name === name)
      const lines = !row
        ? ['  holder      none (never held)']
        : [
            row.nodeId
              ? `  holder      ${row.nodeId} (backend ${row.backendPid}, epoch ${row.epoch ?? '?'}, since ${time(row.acquiredAt)}, heartbeat ${time(row.heartbeatAt)})`
              : `  holder      none (last: ${row.lastNodeId}, epoch ${row.lastEpoch})`,
            `  waiting     ${row.waitingNodes}${row.waitingNodeIds.length > 0 ? ` (${row.waitingNodeIds.join(', ')})` : ''}`,
            `  last run    ${row.lastRunAt ? `${row.lastRunPolicy} ${row.lastRunStatus} at ${time(row.lastRunAt)}, ${row.lastRunRows} rows deleted` : 'none yet'}`,
          ]
      return [
        name,
        ...lines,
        ...policies.filter((p) => p.singleton === name).flatMap(formatPolicy),
        ...formatTerms(terms.filter((t) => t.name === name)),
        '',
      ].join('\n')
    })
    .join('\n')
}

/** The latest terms, newest first: who held, from when to when, and how it ended. */
function formatTerms(terms: Term[]): string[] {
  if (terms.length === 0) return []
  return [
    '  terms',
    ...terms.slice(0, 5).map((t) => {
      const ended = t.endedAt
        ? `to ${t.endedAt.toISOString()}, ${t.endReason}${t.closedBy === 'successor' ? ' (closed by the next holder)' : ''}`
        : 'holding'
      return `    epoch ${t.epoch}  ${t.nodeId}  from ${t.acquiredAt.toISOString()} ${ended}`
    }),
  ]
}

function formatPolicy(p: PolicyStatus): string[] {
  const time = (value: Date | null) => (value ? value.toISOString() : '-')
  const head = `  ${p.kind === 'task' ? 'task  ' : 'policy'}      ${p.policy}: `
  if (p.agreement === 'disagree') {
    return [
      `${head}DISAGREE: held back until every live node holds the same definition`,
      ...describeDisagreement(p).map((line) => `                ${line}`),
    ]
  }
  const state =
    (p.paused
      ? 'PAUSED'
      : p.agreement === 'agree'
        ? `next ${time(p.nextRunAt)}`
        : 'no live node has it') +
    (p.cron ? ` (cron "${p.cron}" in ${p.cronTimeZone})` : '') +
    (p.overdue ? ' (OVERDUE: no success for over twice its interval)' : '')
  const open = p.openRunStatus
    ? `, run ${p.openRunStatus}${p.retryAt ? ` (retry at ${time(p.retryAt)})` : ''}`
    : ''
  const last = !p.lastRunAt
    ? ''
    : p.kind === 'task'
      ? `; last ${p.lastStatus} at ${time(p.lastRunAt)}`
      : `; last ${p.lastStatus} at ${time(p.lastRunAt)}, ${p.lastRowsDeleted} deleted${p.lastRowsSkipped ? `, ${p.lastRowsSkipped} skipped` : ''}; ${p.rowsDeleted24h} in 24 h`
  const error = p.lastError
    ? [`                last error at ${time(p.lastErrorAt)}: ${p.lastError}`]
    : []
  return [`${head}${state}${open}${last}`, ...error]
}
