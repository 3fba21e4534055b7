import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as delay } from 'node:timers/promises'
import pg from 'pg'
import { afterEach, describe, expect, it } from 'vitest'
import { fingerprint, type TaskDefinition } from '../src/config/definition.js'
import { resolveTasks } from '../src/config/task.js'
import {
  createSingleton,
  type RunReport,
  type Singleton,
  type SingletonTask,
  type TaskContext,
} from '../src/index.js'
import * as runs from '../src/runs/runs.js'
import { readPolicyStatus } from '../src/status/read-policy-status.js'
import { runTask } from '../src/tasks/run-task.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, runCli, startNode, writeConfig } from './support/nodes.js'
import { Holder, LIMITS } from './support/run-harness.js'

const db = useTestDatabase({
  setup: ({ pool }) =>
    pool
      .query(`CREATE SCHEMA app;
        CREATE TABLE app.task_writes (task text, scheduled_for timestamptz, epoch bigint, node text,
                                      written_at timestamptz DEFAULT clock_timestamp());
        CREATE TABLE app.events (at timestamptz NOT NULL);`)
      .then(() => {}),
})
failOnNodesLeftRunning()

const nodes: Singleton[] = []
afterEach(async () => {
  for (const node of nodes.splice(0)) await node.stop()
})

let seq = 0
function node(
  tasks: SingletonTask[],
  extra: object = {},
): { node: Singleton; name: string; errors: Error[] } {
  const name = `tasks-${++seq}`
  const singleton = createSingleton({ name, connectionString: db.url, tasks, ...extra })
  const errors: Error[] = []
  singleton.on('error', (error) => errors.push(error))
  nodes.push(singleton)
  return { node: singleton, name, errors }
}

/** A handler that writes its occurrence through fenced(), as a user's would. */
const writeOccurrence = async (ctx: TaskContext) => {
  await ctx.fenced((client) =>
    client.query(
      'INSERT INTO app.task_writes (task, scheduled_for, epoch, node) VALUES ($1, $2, $3, $4)',
      [ctx.name, ctx.scheduledFor, ctx.epoch, ctx.nodeId],
    ),
  )
}

async function writesOf(task: string) {
  const { rows } = await db.pool.query<{ scheduled_for: Date; epoch: string }>(
    'SELECT scheduled_for, epoch FROM app.task_writes WHERE task = $1 ORDER BY scheduled_for',
    [task],
  )
  return rows
}

describe("tasks: the user's own code, once per occurrence across the cluster, fenced", () => {
  it('a fenced transaction commits with its WAL flush where the app turned synchronous_commit off', async () => {
    // As a role or database setting would: every connection of the app's pool starts with it off.
    const pool = new pg.Pool({
      connectionString: db.url,
      options: '-c synchronous_commit=off',
      max: 4,
    })
    try {
      const seen: string[] = []
      const { node: n } = node(
        [
          {
            name: 'durable',
            every: '1 hour',
            handler: async (ctx) => {
              await ctx.fenced(async (client) => {
                seen.push(
                  (await client.query('SHOW synchronous_commit')).rows[0].synchronous_commit,
                )
              })
            },
          },
        ],
        { pool },
      )
      const done = once(n, 'task:done') as Promise<[RunReport]>
      await n.start()
      expect((await done)[0]).toMatchObject({ status: 'done' })
      expect((await pool.query('SHOW synchronous_commit')).rows[0].synchronous_commit).toBe('off')
      expect(seen).toEqual(['on'])
      await n.stop()
    } finally {
      await pool.end()
    }
  })

  it('runs a task on its schedule with its context; what it writes through fenced() is written once per done run', async () => {
    const seen: {
      scheduledFor: Date
      epoch: number
      nodeId: string
      aborted: boolean
      runId: string
      attempt: number
      coalesced: number
      reissued: boolean
    }[] = []
    const { node: n, name } = node([
      {
        name: 'tick',
        every: '1 second',
        handler: async (ctx) => {
          seen.push({
            scheduledFor: ctx.scheduledFor,
            epoch: ctx.epoch,
            nodeId: ctx.nodeId,
            aborted: ctx.signal.aborted,
            runId: ctx.runId,
            attempt: ctx.attempt,
            coalesced: ctx.coalesced,
            reissued: ctx.reissued,
          })
          // The first run outlasts two slots: the next run stands for the ones it missed.
          if (seen.length === 1) await delay(2_500)
          await writeOccurrence(ctx)
        },
      },
    ])
    const reports: RunReport[] = []
    n.on('task:done', (report) => reports.push(report))
    await n.start()
    await waitFor('three runs', async () => reports.filter((r) => r.status === 'done').length >= 3)
    // While the node is live, its definition is the one agreed on.
    const [status] = await readPolicyStatus(db.pool, name)
    expect(status).toMatchObject({
      policy: 'tick',
      kind: 'task',
      agreement: 'agree',
      every: '00:00:01',
    })
    expect(status?.lastSuccessAt).toBeInstanceOf(Date)
    await n.stop()
    expect(seen[0]).toMatchObject({ nodeId: n.options.nodeId, aborted: false })
    expect(seen[0]?.scheduledFor).toBeInstanceOf(Date)
    const { rows: done } = await db.pool.query<{ scheduled_for: Date }>(
      `SELECT scheduled_for FROM pgsingleton.cleanup_runs WHERE singleton = $1 AND status = 'done' AND kind = 'task' ORDER BY scheduled_for`,
      [name],
    )
    const written = await writesOf('tick')
    expect(written.map((w) => w.scheduled_for.toISOString())).toEqual(
      done.map((d) => d.scheduled_for.toISOString()),
    )
    // The context names the run as the database recorded it.
    const { rows: recorded } = await db.pool.query<{
      id: string
      attempt: number
      coalesced: number
      reissued: boolean
      scheduled_for: Date
    }>(
      `SELECT id::text, attempt, coalesced, reissued, scheduled_for FROM pgsingleton.cleanup_runs
        WHERE singleton = $1 AND status = 'done' ORDER BY scheduled_for`,
      [name],
    )
    const byId = new Map(recorded.map((row) => [row.id, row]))
    for (const ctx of seen.filter((s) => byId.has(s.runId))) {
      const row = byId.get(ctx.runId)
      expect(ctx).toMatchObject({
        attempt: row?.attempt,
        coalesced: row?.coalesced,
        reissued: row?.reissued,
        scheduledFor: row?.scheduled_for,
      })
    }
    expect(seen.filter((s) => byId.has(s.runId)).length).toBe(recorded.length)
    // To the microsecond: the slot a handler is told joins the row it names.
    for (const ctx of seen.filter((s) => byId.has(s.runId))) {
      const { rows: same } = await db.pool.query(
        'SELECT scheduled_for = $2::timestamptz AS same FROM pgsingleton.cleanup_runs WHERE id = $1',
        [ctx.runId, ctx.scheduledFor.toISOString()],
      )
      expect(same).toEqual([{ same: true }])
    }
    expect(seen[1]?.coalesced).toBeGreaterThanOrEqual(1)
    expect(seen.every((s) => s.attempt === 1)).toBe(true)
  })

  it('a second fenced() in one run throws FENCED_ONCE without running its function; a handler that never calls fenced() completes its run', async () => {
    const outcomes: string[] = []
    const { node: n, name } = node([
      {
        name: 'twice',
        every: '1 hour',
        handler: async (ctx) => {
          await ctx.fenced(async () => outcomes.push('first'))
          await ctx
            .fenced(async () => outcomes.push('second'))
            .catch((error: { code?: string }) => outcomes.push(`refused ${error.code}`))
        },
      },
      { name: 'plain', every: '1 hour', handler: () => outcomes.push('plain') },
    ])
    const reports: RunReport[] = []
    n.on('task:done', (report) => reports.push(report))
    await n.start()
    await waitFor('both ran', async () => reports.length >= 2)
    expect(outcomes.sort()).toEqual(['first', 'plain', 'refused FENCED_ONCE'])
    expect(reports.map((r) => [r.policy, r.status]).sort()).toEqual([
      ['plain', 'done'],
      ['twice', 'done'],
    ])
    const { rows } = await db.pool.query(
      `SELECT policy, status FROM pgsingleton.cleanup_runs WHERE singleton = $1 ORDER BY policy`,
      [name],
    )
    expect(rows).toEqual([
      { policy: 'plain', status: 'done' },
      { policy: 'twice', status: 'done' },
    ])
  })

  it('a handler that throws fails its run, which is retried with backoff and then succeeds; the error is recorded and reported', async () => {
    let calls = 0
    const attempts: { runId: string; attempt: number }[] = []
    const {
      node: n,
      name,
      errors,
    } = node([
      {
        name: 'flaky',
        every: '1 hour',
        handler: async (ctx) => {
          calls += 1
          attempts.push({ runId: ctx.runId, attempt: ctx.attempt })
          if (calls === 1) throw new Error('the mail server said no')
          await writeOccurrence(ctx)
        },
      },
    ])
    const reports: RunReport[] = []
    n.on('task:done', (report) => reports.push(report))
    await n.start()
    await waitFor(
      'a failure and then a success',
      async () => reports.some((r) => r.status === 'done'),
      15_000,
    )
    expect(reports.map((r) => r.status)).toEqual(['failed', 'done'])
    expect(errors.map((e) => (e as { code?: string }).code)).toContain('TASK_FAILED')
    const { rows } = await db.pool.query(
      'SELECT status, failures, error FROM pgsingleton.cleanup_runs WHERE singleton = $1',
      [name],
    )
    expect(rows).toEqual([{ status: 'done', failures: 1, error: null }])
    // The retry is the same run, its second attempt.
    const { rows: ids } = await db.pool.query<{ id: string }>(
      'SELECT id::text FROM pgsingleton.cleanup_runs WHERE singleton = $1',
      [name],
    )
    expect(attempts).toEqual([
      { runId: ids[0]?.id, attempt: 1 },
      { runId: ids[0]?.id, attempt: 2 },
    ])
    const [status] = await readPolicyStatus(db.pool, name)
    expect(status?.lastError ?? null).toBeNull()
    expect((await writesOf('flaky')).length).toBe(1)
  })

  it('a fenced transaction that does not commit fails its run, even when the handler swallows the error: an error in fn, an aborted transaction, fn ending it itself, or the deadline', async () => {
    const attempts = new Map<string, number>()
    const swallow =
      (name: string, fn: (client: import('pg').PoolClient) => Promise<unknown>) =>
      async (ctx: TaskContext) => {
        const n = (attempts.get(name) ?? 0) + 1
        attempts.set(name, n)
        if (n > 1) return writeOccurrence(ctx) // the retry succeeds
        await ctx
          .fenced(async (client) => {
            await client.query(
              'INSERT INTO app.task_writes (task, scheduled_for) VALUES ($1, now())',
              [name],
            )
            return fn(client)
          })
          .catch(() => {}) // the handler swallows it and returns
      }
    const { node: n, name } = node(
      [
        {
          name: 'throws',
          every: '1 hour',
          handler: swallow('throws', async () => {
            throw new Error('fn failed')
          }),
        },
        {
          name: 'aborted',
          every: '1 hour',
          // An SQL error caught inside fn leaves the transaction aborted: COMMIT would roll back.
          handler: swallow('aborted', (client) => client.query('SELECT 1/0').catch(() => {})),
        },
        {
          name: 'commits-itself',
          every: '1 hour',
          handler: swallow('commits-itself', (client) => client.query('COMMIT')),
        },
        {
          name: 'too-slow',
          every: '1 hour',
          // Each statement within its timeout, the whole transaction not.
          handler: swallow('too-slow', async (client) => {
            for (let i = 0; i < 6; i++) await client.query('SELECT pg_sleep(0.1)')
          }),
        },
      ],
      { batchStatementTimeoutMs: 300 },
    )
    const reports: RunReport[] = []
    n.on('task:done', (report) => reports.push(report))
    await n.start()
    const names = ['throws', 'aborted', 'commits-itself', 'too-slow']
    await waitFor(
      'each task to fail once and then succeed',
      async () =>
        names.every((t) => reports.some((r) => r.policy === t && r.status === 'done'))
          ? true
          : undefined,
      30_000,
    )
    for (const t of ['throws', 'aborted', 'too-slow']) {
      expect(
        reports.filter((r) => r.policy === t).map((r) => r.status),
        t,
      ).toEqual(['failed', 'done'])
    }
    // A function that commits by itself commits the run's completion with its writes: the
    // occurrence is done, and the report says what went wrong.
    const itself = reports.filter((r) => r.policy === 'commits-itself')
    expect(itself.map((r) => r.status)).toEqual(['done'])
    expect(itself[0]?.reason).toMatch(/ended its transaction itself/)
    const { rows } = await db.pool.query<{ policy: string; status: string; failures: number }>(
      `SELECT policy, status, failures FROM pgsingleton.cleanup_runs WHERE singleton = $1 ORDER BY policy`,
      [name],
    )
    expect(rows.map((r) => [r.policy, r.status, r.failures])).toEqual([
      ['aborted', 'done', 1],
      ['commits-itself', 'done', 0],
      ['throws', 'done', 1],
      ['too-slow', 'done', 1],
    ])
    // Only the retries' writes are there, except what fn committed by itself (not fenced,
    // which is why that is an error).
    for (const t of ['throws', 'aborted', 'too-slow']) {
      const written = await writesOf(t)
      expect(written.length, t).toBe(1)
      expect(written[0]?.epoch, t).not.toBeNull()
    }
    expect(reports.find((r) => r.policy === 'too-slow')?.reason).toMatch(/longer than 300 ms/)
  })

  it('a fenced() under an epoch that is no longer current runs nothing and commits nothing, and the run ends fenced', async () => {
    const definition: TaskDefinition = {
      kind: 'task',
      name: 'stale',
      every: '1 hour',
      cron: null,
      cronTimeZone: null,
    }
    const a = await new Holder(db.url, 'tasks-stale', 'a').join([definition])
    const lease = await a.hold()
    const { rows } = await db.pool.query(
      `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, definition, fingerprint, kind)
       VALUES ('tasks-stale', 'stale', $1, now(), 'a', $2, $3, 'task') RETURNING id`,
      [lease.epoch, JSON.stringify(definition), fingerprint(definition)],
    )
    const claimed = await runs.claim(db.pool, String(rows[0].id), 'a')
    if (typeof claimed === 'string') throw new Error(claimed)
    // A newer holder takes over before the task writes.
    await a.close()
    const b = await new Holder(db.url, 'tasks-stale', 'b').join([definition])
    await b.hold()
    let ran = false
    let refusal: { code?: string; message?: string } | undefined
    const report = await runTask(
      {
        pool: db.pool,
        nodeId: 'a',
        limits: LIMITS,
        handlers: new Map([
          [
            'stale',
            async (ctx: TaskContext) => {
              await ctx
                .fenced(async (client) => {
                  ran = true
                  await client.query("INSERT INTO app.task_writes (task) VALUES ('stale')")
                })
                .catch((error) => {
                  refusal = error
                })
            },
          ],
        ]),
      },
      claimed as runs.Claim<TaskDefinition>,
      new AbortController().signal,
    )
    await b.close()
    expect(ran).toBe(false)
    expect(refusal).toMatchObject({
      code: 'FENCED',
      message: expect.stringMatching(/newer holder/),
    })
    expect(report.status).toBe('fenced')
    expect((await writesOf('stale')).length).toBe(0)
  })

  it("a stopping holder keeps its session while a task outlasts the server's idle_session_timeout, then reports lock:released", async () => {
    // After the hand-over the holder sends no heartbeats; its session must not idle out
    // (the node would drop from the cluster, and the release fail) while its work ends.
    let started = false
    let finishTask: () => void = () => {}
    const { node: n, errors } = node(
      [
        {
          name: 'long',
          every: '1 hour',
          handler: async () => {
            started = true
            await new Promise<void>((resolve) => {
              finishTask = resolve
            })
          },
        },
      ],
      { heartbeatMs: 250, fenceAfterMs: 1000, idleSessionTimeoutMs: 1500 },
    )
    await n.start()
    await waitFor('the task runs', async () => started)
    const released = once(n, 'lock:released')
    const stopping = n.stop()
    // Past the idle timeout, the lock session (named after the node) is still there.
    try {
      await new Promise((resolve) => setTimeout(resolve, 2500))
      const { rows } = await db.pool.query(
        'SELECT pid FROM pg_stat_activity WHERE application_name = $1',
        [n.options.nodeId],
      )
      expect(rows).toHaveLength(1)
    } finally {
      finishTask()
    }
    await stopping
    const [lease] = await released
    expect(lease).toMatchObject({ nodeId: n.options.nodeId })
    expect(errors).toEqual([])
  })

  it("a config file with tasks (and no policies): each module's default export is the handler, a relative module is read from the config file's folder", async () => {
    const dir = tmpdir()
    const module = join(dir, `pg-singleton-task-${process.pid}-${++seq}.mjs`)
    await writeFile(
      module,
      `export default async function (ctx) {
         await ctx.fenced((client) => client.query(
           'INSERT INTO app.task_writes (task, scheduled_for, epoch, node) VALUES ($1, $2, $3, $4)',
           [ctx.name, ctx.scheduledFor, ctx.epoch, ctx.nodeId]))
       }\n`,
    )
    const config = await writeConfig({
      name: 'cli-tasks',
      tasks: [
        { name: 'from-module', module: `./${module.split('/').pop()}`, cron: '*/2 * * * * *' },
      ],
    })
    const cli = startNode(db.url, config, 'cli-task-node')
    try {
      await waitFor(
        'two occurrences written',
        async () => (await writesOf('from-module')).length >= 2,
        20_000,
      )
    } finally {
      cli.signal('SIGTERM')
      expect((await cli.exited).code, cli.output()).toBe(0)
    }
    // Six-field cron: on even seconds.
    for (const w of await writesOf('from-module')) {
      expect(w.scheduled_for.getUTCMilliseconds()).toBe(0)
      expect(w.scheduled_for.getUTCSeconds() % 2).toBe(0)
    }
    const [status] = await readPolicyStatus(db.pool, 'cli-tasks')
    expect(status).toMatchObject({ kind: 'task', cron: '*/2 * * * * *', cronTimeZone: 'UTC' })

    const plan = runCli(['plan', '--config', config], { DATABASE_URL: db.url })
    expect((await plan.exited).code, plan.output()).toBe(0)
    expect(plan.output()).toMatch(
      /task "from-module": on cron "\*\/2 \* \* \* \* \*" in UTC; next \d{4}-/,
    )

    const bad = await writeConfig({
      name: 'cli-tasks-bad',
      tasks: [{ name: 'x', module: './nope.mjs', every: '1 hour' }],
    })
    const refused = startNode(db.url, bad, 'cli-task-bad')
    expect((await refused.exited).code).toBe(1)
    expect(refused.output()).toMatch(/task "x", field module: .*nope\.mjs could not be loaded/)
  }, 60_000)

  it("pause stops a task's runs and resume starts them again; run-now runs it outside its schedule", async () => {
    const { node: n, name } = node([{ name: 'hourly', every: '1 hour', handler: writeOccurrence }])
    const reports: RunReport[] = []
    n.on('task:done', (report) => reports.push(report))
    await n.start()
    await waitFor('the first run', async () => reports.length >= 1)
    const pause = runCli(['pause', 'hourly', '--name', name], { DATABASE_URL: db.url })
    expect((await pause.exited).code, pause.output()).toBe(0)
    const runNow = runCli(['run-now', 'hourly', '--name', name], { DATABASE_URL: db.url })
    expect((await runNow.exited).code).not.toBe(0) // refused while paused
    const resume = runCli(['resume', 'hourly', '--name', name], { DATABASE_URL: db.url })
    expect((await resume.exited).code, resume.output()).toBe(0)
    const again = runCli(['run-now', 'hourly', '--name', name], { DATABASE_URL: db.url })
    expect((await again.exited).code, again.output()).toBe(0)
    await waitFor('the asked-for run', async () => reports.length >= 2, 15_000)
    expect((await writesOf('hourly')).length).toBe(2)
  })

  it('a run past its timeout is told to stop, recorded failed at once (TASK_TIMEOUT) while its handler still runs, and retried; its late fenced() runs nothing', async () => {
    let calls = 0
    let firstReturned = false
    let signalReason: unknown
    let lateFenced: unknown
    const {
      node: n,
      name,
      errors,
    } = node([
      {
        name: 'slow',
        every: '1 hour',
        timeout: '2 seconds',
        handler: async (ctx) => {
          calls += 1
          if (calls > 1) return writeOccurrence(ctx)
          // The first run outlives its limit, hears the signal, and carries on regardless.
          await new Promise((resolve) => ctx.signal.addEventListener('abort', resolve))
          signalReason = ctx.signal.reason
          await new Promise((resolve) => setTimeout(resolve, 2000))
          lateFenced = await writeOccurrence(ctx).then(
            () => 'ran',
            (error: unknown) => error,
          )
          firstReturned = true
        },
      },
    ])
    const reports: RunReport[] = []
    n.on('task:done', (report) => reports.push(report))
    await n.start()
    // Recorded failed at the limit, not when the handler gives up.
    const failed = await waitFor(
      'the run recorded failed at its timeout',
      async () => {
        const { rows } = await db.pool.query<{
          status: string
          failures: number
          error: string
          ran_ms: number
        }>(
          `SELECT status, failures, error, (extract(epoch FROM finished_at - started_at) * 1000)::float8 AS ran_ms
             FROM pgsingleton.cleanup_runs WHERE singleton = $1`,
          [name],
        )
        return rows[0]?.status === 'failed' ? rows[0] : undefined
      },
      15_000,
    )
    // Reported as it is recorded, not when the handler returns.
    await waitFor('the TASK_TIMEOUT error', async () =>
      errors.some((e) => (e as { code?: string }).code === 'TASK_TIMEOUT'),
    )
    expect(firstReturned).toBe(false)
    expect(failed.failures).toBe(1)
    expect(failed.error).toMatch(/took longer than its timeout \(2 s\)/)
    expect(failed.ran_ms).toBeGreaterThanOrEqual(1900)
    expect((signalReason as { code?: string }).code).toBe('TASK_TIMEOUT')
    // The retry runs once the stuck handler has returned, and does the occurrence.
    await waitFor('the retry done', async () => reports.some((r) => r.status === 'done'), 20_000)
    expect((lateFenced as { code?: string }).code).toBe('TASK_TIMEOUT')
    expect(reports.map((r) => [r.status, r.timedOut ?? false])).toEqual([
      ['failed', true],
      ['done', false],
    ])
    // Once: not again when the handler returned.
    expect(errors.map((e) => (e as { code?: string }).code)).toEqual(['TASK_TIMEOUT'])
    const { rows } = await db.pool.query(
      'SELECT status, failures FROM pgsingleton.cleanup_runs WHERE singleton = $1',
      [name],
    )
    expect(rows).toEqual([{ status: 'done', failures: 1 }])
    expect((await writesOf('slow')).length).toBe(1)
    // Its pg-boss job lives a minute past the run's limit, so the run's own timeout comes first.
    const { rows: jobs } = await db.pool.query<{ expire_seconds: number }>(
      `SELECT DISTINCT expire_seconds FROM pgboss.job WHERE name = $1`,
      [`pgsingleton/cleanup/${name}`],
    )
    expect(jobs).toEqual([{ expire_seconds: 62 }])
  })

  it('a timeout is seconds, minutes or hours up to 23 hours; the default leaves the definition as a node without the option registers it', () => {
    const refused = (timeout: unknown) => () =>
      createSingleton({
        name: 'x',
        connectionString: db.url,
        tasks: [{ name: 't', every: '1 hour', timeout, handler: () => {} } as SingletonTask],
      })
    expect(refused('1 day')).toThrow(
      /task "t", field timeout: "1 day" is refused: give it in seconds, minutes or hours/,
    )
    expect(refused('24 hours')).toThrow(/from 1 second to 23 hours/)
    expect(refused('0.5 seconds')).toThrow(/from 1 second to 23 hours/)
    expect(refused('10m')).toThrow(/task "t", field timeout: "10m" is refused/)
    expect(refused(90)).toThrow(/task "t", field timeout: 90 is refused/)
    expect(refused('90 minutes')).not.toThrow()
    // A limit of an hour, however written, is the default: no limit in the definition.
    const [hour] = resolveTasks([
      { name: 't', every: '1 hour', timeout: '60 minutes', handler: () => {} },
    ])
    expect(hour?.timeoutSeconds).toBeNull()
    // What a node without the option registers for a task: its fingerprint is unchanged.
    const base = {
      kind: 'task',
      name: 't',
      every: '1 hour',
      cron: null,
      cronTimeZone: null,
    } as const
    const before = createHash('sha256')
      .update(JSON.stringify(['task', 't', '1 hour', null, null]))
      .digest('hex')
      .slice(0, 16)
    expect(fingerprint(base)).toBe(before)
    // Another limit is part of the definition: nodes must agree on it.
    expect(fingerprint({ ...base, timeoutSeconds: 5400 })).not.toBe(before)
  })

  it('while a task is paused nothing of it starts: the holder does not tick for it, its retry waits, and a run already queued ends without its handler', async () => {
    const setPaused = (singleton: string, task: string, paused: boolean) =>
      db.pool.query(
        `INSERT INTO pgsingleton.policy_controls (singleton, policy, paused) VALUES ($1, $2, $3)
           ON CONFLICT (singleton, policy) DO UPDATE SET paused = excluded.paused, changed_at = now()`,
        [singleton, task, paused],
      )
    let release: () => void = () => {}
    const released = new Promise<void>((resolve) => {
      release = resolve
    })
    let blockerRunning = false
    let victimCalls = 0
    let flakyCalls = 0
    let name = ''
    // The node's pool, to count how often it takes a connection.
    const pool = new pg.Pool({ connectionString: db.url, max: 4 })
    let acquired = 0
    pool.on('acquire', () => {
      acquired += 1
    })
    const { node: n, name: singleton } = node(
      [
        {
          name: 'blocker',
          every: '1 hour',
          handler: async () => {
            blockerRunning = true
            await released
          },
        },
        {
          name: 'victim',
          every: '1 second',
          handler: () => {
            victimCalls += 1
          },
        },
        {
          name: 'flaky',
          every: '1 hour',
          handler: async () => {
            flakyCalls += 1
            if (flakyCalls === 1) {
              // Paused while its run fails: the retry, due a second later, must wait.
              await setPaused(name, 'flaky', true)
              throw new Error('failed once')
            }
          },
        },
      ],
      { pool },
    )
    name = singleton
    try {
      const runsOf = async (task: string) =>
        (
          await db.pool.query<{ status: string; error: string | null }>(
            'SELECT status, error FROM pgsingleton.cleanup_runs WHERE singleton = $1 AND policy = $2 ORDER BY id',
            [name, task],
          )
        ).rows
      await n.start()
      await waitFor('the blocker holding the worker', async () => blockerRunning, 15_000)
      // A run of victim issued while the worker is busy: its job waits in the queue.
      await waitFor(
        'a queued run of victim',
        async () => (await runsOf('victim')).some((r) => r.status === 'scheduled'),
        15_000,
      )
      await setPaused(name, 'victim', true)
      const callsAtPause = victimCalls
      release()
      await waitFor(
        'the queued run of victim ended by the pause',
        async () => (await runsOf('victim')).some((r) => r.status === 'fenced'),
        15_000,
      )
      expect((await runsOf('victim')).find((r) => r.status === 'fenced')?.error).toMatch(
        /was paused; the occurrence runs again after resume/,
      )
      await waitFor(
        'flaky failed',
        async () => (await runsOf('flaky'))[0]?.status === 'failed',
        15_000,
      )
      // Now victim is due and flaky's retry is due (a second after its failure), both paused.
      // Neither runs, and neither makes the holder tick faster: each tick takes a connection
      // from the node's pool, and a holder ticking every 20 ms takes 50 a second.
      await new Promise((resolve) => setTimeout(resolve, 1000))
      const before = acquired
      await new Promise((resolve) => setTimeout(resolve, 4000))
      const perSecond = (acquired - before) / 4
      expect(victimCalls).toBe(callsAtPause)
      expect(flakyCalls).toBe(1)
      expect((await runsOf('flaky')).map((r) => r.status)).toEqual(['failed'])
      // At rest: a tick at most every 5 s, the worker's polls and the heartbeat's checks.
      expect(perSecond).toBeLessThan(10)
      await setPaused(name, 'victim', false)
      await setPaused(name, 'flaky', false)
      await waitFor('victim running again', async () => victimCalls > callsAtPause, 15_000)
      await waitFor(
        'the retry of flaky done',
        async () => (await runsOf('flaky'))[0]?.status === 'done',
        15_000,
      )
      expect(flakyCalls).toBe(2)
    } finally {
      await n.stop()
      await pool.end()
    }
  })

  it("is refused at construction when neither policies nor tasks are given, or a task shares a policy's name, or lacks a handler", () => {
    expect(() => createSingleton({ name: 'x', connectionString: db.url })).toThrow(
      /give at least one retention policy or task/,
    )
    expect(() =>
      createSingleton({
        name: 'x',
        connectionString: db.url,
        policies: [
          { name: 'same', table: 'app.events', column: 'at', olderThan: '1 day', every: '1 hour' },
        ],
        tasks: [{ name: 'same', every: '1 hour', handler: () => {} }],
      }),
    ).toThrow(/task "same": a policy has the same name/)
    expect(() =>
      createSingleton({
        name: 'x',
        connectionString: db.url,
        tasks: [{ name: 't', every: '1 hour' } as unknown as SingletonTask],
      }),
    ).toThrow(/task "t", field handler: expected a function/)
  })

  it('a cleanup policy on a cron schedule runs at its slots', async () => {
    await db.pool.query(
      "INSERT INTO app.events SELECT now() - interval '2 days' FROM generate_series(1, 50)",
    )
    const { node: n } = node([], {
      policies: [
        {
          name: 'cron-clean',
          table: 'app.events',
          column: 'at',
          olderThan: '1 day',
          cron: '*/2 * * * * *',
        },
      ],
    })
    const done = once(n, 'cleanup:done') as Promise<[RunReport]>
    await n.start()
    const [report] = await done
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 50 })
    const { rows } = await db.pool.query<{ scheduled_for: Date }>(
      `SELECT scheduled_for FROM pgsingleton.cleanup_runs WHERE policy = 'cron-clean'`,
    )
    expect((rows[0]?.scheduled_for.getUTCSeconds() ?? 1) % 2).toBe(0)
  })
})
