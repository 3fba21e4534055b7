import { describe, expect, it } from 'vitest'
import { createEventsTable, safetyViolations, waitUntilSettled } from './support/app-table.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { failOnNodesLeftRunning, startNode, writeConfig } from './support/nodes.js'

const db = useTestDatabase({ setup: ({ pool }) => createEventsTable(pool) })
failOnNodesLeftRunning()

interface Run {
  epoch: number
  scheduledFor: Date
  coalesced: number
  reissued: boolean
}

async function doneRuns(name: string): Promise<Run[]> {
  const { rows } = await db.pool.query(
    `SELECT epoch, scheduled_for, coalesced, reissued FROM pgsingleton.cleanup_runs
      WHERE singleton = $1 AND status = 'done' ORDER BY scheduled_for`,
    [name],
  )
  return rows.map((r) => ({
    epoch: Number(r.epoch),
    scheduledFor: r.scheduled_for,
    coalesced: r.coalesced,
    reissued: r.reissued,
  }))
}

/** A config file for a singleton whose one policy cleans app.events on `schedule`. */
function eventsConfig(name: string, schedule: { every: string } | { cron: string }) {
  return writeConfig({
    name,
    policies: [
      {
        name: 'old-events',
        table: 'app.events',
        column: 'created_at',
        olderThan: '1 hour',
        ...schedule,
      },
    ],
  })
}

describe('the schedule lives in the database', () => {
  it('after an outage, runs the first missed occurrence once, coalesces the rest, and resumes on its grid', async () => {
    const name = 'misfire'
    const config = await eventsConfig(name, { every: '1 second' })
    const first = startNode(db.url, config, 'first')
    await waitFor('three runs', async () => (await doneRuns(name)).length >= 3)
    first.signal('SIGTERM')
    expect((await first.exited).code).toBe(0)
    const beforeOutage = await doneRuns(name)
    const lastBefore = beforeOutage.at(-1) as Run

    // Nobody holds the singleton for a few occurrences: this wait is the scenario itself.
    await new Promise((resolve) => setTimeout(resolve, 3500))
    const second = startNode(db.url, config, 'second')
    await waitFor(
      'two runs of the new holder',
      async () => (await doneRuns(name)).filter((r) => r.epoch === 2).length >= 2,
    )
    await waitUntilSettled(db.pool, name)
    second.signal('SIGTERM')
    expect((await second.exited).code).toBe(0)

    const runs = await doneRuns(name)
    const [catchUp, resumed] = runs.filter((r) => r.epoch === 2) as [Run, Run]
    // Nothing dropped silently: the first missed slot itself runs, and says how many it stands for.
    expect(catchUp.scheduledFor.getTime() - lastBefore.scheduledFor.getTime()).toBe(1000)
    expect(catchUp.coalesced).toBeGreaterThanOrEqual(2)
    // Back on the grid: the next run is the first slot after the coalesced ones.
    expect(resumed.scheduledFor.getTime() - catchUp.scheduledFor.getTime()).toBe(
      (catchUp.coalesced + 1) * 1000,
    )
    // Every occurrence completed once, every one on the grid of the first.
    const origin = runs[0]?.scheduledFor.getTime() ?? 0
    for (const run of runs) expect((run.scheduledFor.getTime() - origin) % 1000).toBe(0)
    expect(new Set(runs.map((r) => r.scheduledFor.getTime())).size).toBe(runs.length)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })

  it('a cron pattern changed while a slot is due runs that slot once, then follows the new pattern', async () => {
    const name = 'changed-cron'
    const first = startNode(db.url, await eventsConfig(name, { cron: '0 3 * * *' }), 'first')
    await waitFor('the schedule written', async () => {
      const { rows } = await db.pool.query(
        'SELECT 1 FROM pgsingleton.schedules WHERE singleton = $1',
        [name],
      )
      return rows.length > 0
    })
    first.signal('SIGTERM')
    expect((await first.exited).code).toBe(0)
    // While nobody holds, a slot comes due (as after an outage) and a deploy changes the pattern.
    const { rows: due } = await db.pool.query<{ at: Date }>(
      `UPDATE pgsingleton.schedules SET next_run_at = date_trunc('second', now()) - interval '1 minute'
        WHERE singleton = $1 RETURNING next_run_at AS at`,
      [name],
    )
    const slot = due[0]?.at as Date
    const second = startNode(db.url, await eventsConfig(name, { cron: '0 0 1 1 *' }), 'second')
    try {
      await waitFor('the due slot run', async () => (await doneRuns(name)).length >= 1, 30_000)
      const runs = await doneRuns(name)
      expect(runs.map((r) => r.scheduledFor.toISOString())).toEqual([slot.toISOString()])
      const { rows } = await db.pool.query<{ cron: string; next_run_at: Date }>(
        'SELECT cron, next_run_at FROM pgsingleton.schedules WHERE singleton = $1',
        [name],
      )
      const nextYear = new Date(Date.UTC(new Date().getUTCFullYear() + 1, 0, 1))
      expect(rows).toEqual([{ cron: '0 0 1 1 *', next_run_at: nextYear }])
    } finally {
      second.signal('SIGTERM')
      await second.exited
    }
  })

  it("a weekday cron schedule's period, which overdue counts in, is the weekend's gap, also where an earlier version wrote one day", async () => {
    const name = 'weekdays'
    const config = await eventsConfig(name, { cron: '0 3 * * 1-5' })
    const period = async () =>
      (
        await db.pool.query<{ days: number }>(
          `SELECT (extract(epoch FROM period) / 86400)::float8 AS days
             FROM pgsingleton.schedules WHERE singleton = $1`,
          [name],
        )
      ).rows[0]?.days
    const node = startNode(db.url, config, 'only')
    try {
      await waitFor('the schedule written', async () => (await period()) !== undefined)
      expect(await period()).toBe(3)
      // What a node of an earlier version wrote: the gap after the next slot.
      await db.pool.query(
        `UPDATE pgsingleton.schedules SET period = interval '1 day' WHERE singleton = $1`,
        [name],
      )
      await waitFor(
        'the period mended by the next tick',
        async () => (await period()) === 3,
        30_000,
      )
    } finally {
      node.signal('SIGTERM')
      await node.exited
    }
  })

  it('an interval in months counts its missed slots on the calendar: the next slot still ahead is not skipped', async () => {
    const name = 'monthly'
    const config = await eventsConfig(name, { every: '11 months' })
    const first = startNode(db.url, config, 'first')
    await waitFor('the first run', async () => (await doneRuns(name)).length >= 1)
    first.signal('SIGTERM')
    expect((await first.exited).code).toBe(0)
    // A slot 331 days ago: more than the 330 days '11 months' counts as, less than the 334 to
    // 337 days eleven months take on the calendar, so the next slot is a few days ahead.
    const { rows: due } = await db.pool.query<{ at: Date; after: Date }>(
      `UPDATE pgsingleton.schedules SET next_run_at = date_trunc('second', now()) - interval '331 days',
                                        anchor = date_trunc('second', now()) - interval '331 days'
        WHERE singleton = $1
        RETURNING next_run_at AS at,
                  ((next_run_at AT TIME ZONE 'UTC') + interval '11 months') AT TIME ZONE 'UTC' AS after`,
      [name],
    )
    const { at, after } = due[0] as { at: Date; after: Date }
    expect(after.getTime()).toBeGreaterThan(Date.now())
    const second = startNode(db.url, config, 'second')
    try {
      const caughtUp = await waitFor(
        'the due slot run',
        async () => (await doneRuns(name)).find((r) => r.epoch === 2),
        30_000,
      )
      expect(caughtUp.scheduledFor.toISOString()).toBe(at.toISOString())
      expect(caughtUp.coalesced).toBe(0)
      const { rows } = await db.pool.query<{ next_run_at: Date }>(
        'SELECT next_run_at FROM pgsingleton.schedules WHERE singleton = $1',
        [name],
      )
      expect(rows[0]?.next_run_at.toISOString()).toBe(after.toISOString())
    } finally {
      second.signal('SIGTERM')
      await second.exited
    }
  })

  it('a monthly grid started on the 31st comes back to the last day of each month, instead of sticking at the 28th after February', async () => {
    const name = 'month-end'
    const config = await eventsConfig(name, { every: '1 month' })
    const first = startNode(db.url, config, 'first')
    await waitFor('the first run', async () => (await doneRuns(name)).length >= 1)
    first.signal('SIGTERM')
    expect((await first.exited).code).toBe(0)
    // A grid that began on January 31st of last year, whose slot of February 28th is due.
    const { rows: set } = await db.pool.query<{ at: Date }>(
      `UPDATE pgsingleton.schedules
          SET anchor = make_timestamptz(extract(year FROM now())::int - 1, 1, 31, 10, 0, 0, 'UTC'),
              next_run_at = make_timestamptz(extract(year FROM now())::int - 1, 2, 28, 10, 0, 0, 'UTC')
        WHERE singleton = $1 RETURNING next_run_at AS at`,
      [name],
    )
    const { rows: grid } = await db.pool.query<{ next: Date; missed: number }>(
      `SELECT min(t) FILTER (WHERE t > now()) AS next,
              count(*) FILTER (WHERE t > make_timestamptz(extract(year FROM now())::int - 1, 2, 28, 10, 0, 0, 'UTC') AND t <= now())::int AS missed
         FROM generate_series(0, 40) AS k,
              LATERAL (SELECT (make_timestamp(extract(year FROM now())::int - 1, 1, 31, 10, 0, 0) + k * interval '1 month') AT TIME ZONE 'UTC' AS t) AS slot`,
    )
    const expected = grid[0] as { next: Date; missed: number }
    const second = startNode(db.url, config, 'second')
    try {
      const caughtUp = await waitFor(
        'the due slot run',
        async () => (await doneRuns(name)).find((r) => r.epoch === 2),
        30_000,
      )
      expect(caughtUp.scheduledFor.toISOString()).toBe(set[0]?.at.toISOString())
      expect(caughtUp.coalesced).toBe(expected.missed)
      const { rows } = await db.pool.query<{ next_run_at: Date; day: number; last_day: boolean }>(
        `SELECT next_run_at, extract(day FROM next_run_at AT TIME ZONE 'UTC')::int AS day,
                (next_run_at AT TIME ZONE 'UTC')::date = (date_trunc('month', next_run_at AT TIME ZONE 'UTC') + interval '1 month - 1 day')::date AS last_day
           FROM pgsingleton.schedules WHERE singleton = $1`,
        [name],
      )
      expect(rows[0]?.next_run_at.toISOString()).toBe(expected.next.toISOString())
      expect(rows[0]?.last_day).toBe(true)
    } finally {
      second.signal('SIGTERM')
      await second.exited
    }
  })

  it("a schedule left by a policy no node holds any more, with a pattern this version cannot read, does not stop the others' runs", async () => {
    const name = 'left-behind'
    const config = await eventsConfig(name, { every: '1 second' })
    const node = startNode(db.url, config, 'only')
    try {
      await waitFor('a first run', async () => (await doneRuns(name)).length >= 1)
      // As a removed policy leaves its row (a newer version's pattern, or a hand edit).
      await db.pool.query(
        `INSERT INTO pgsingleton.schedules (singleton, policy, cron, time_zone, next_run_at, updated_epoch)
         VALUES ($1, 'removed', 'not a pattern', 'UTC', now() - interval '1 hour', 1)`,
        [name],
      )
      const before = (await doneRuns(name)).length
      await waitFor(
        'three more runs',
        async () => (await doneRuns(name)).length >= before + 3,
        30_000,
      )
      expect(node.output()).not.toMatch(/schedule tick failed/)
    } finally {
      node.signal('SIGTERM')
      await node.exited
    }
  })

  it('an every changed from 1 month to 30 days is written, though PostgreSQL compares the two as equal', async () => {
    const name = 'month-to-days'
    const every = async () =>
      (
        await db.pool.query<{ every: string }>(
          'SELECT every::text AS every FROM pgsingleton.schedules WHERE singleton = $1',
          [name],
        )
      ).rows[0]?.every
    for (const [value, expected] of [
      ['1 month', '1 mon'],
      ['30 days', '30 days'],
    ] as const) {
      const node = startNode(
        db.url,
        await eventsConfig(name, { every: value }),
        value.replace(' ', '-'),
      )
      try {
        await waitFor(
          `the schedule written as ${value}`,
          async () => (await every()) === expected,
          30_000,
        )
      } finally {
        node.signal('SIGTERM')
        await node.exited
      }
    }
  })

  it('holds the next occurrence back while a slow run is still going, so the queue never piles up', async () => {
    const name = 'slow-runs'
    await db.pool.query('CREATE TABLE app.slow (created_at timestamptz NOT NULL)')
    const refill = () =>
      db.pool.query(
        `INSERT INTO app.slow SELECT now() - interval '2 hours' FROM generate_series(1, 3000)`,
      )
    await refill()
    // 30 batches of 100, 50 ms apart: the first run takes well over the 1 s schedule.
    const config = await writeConfig({
      name,
      batchPauseMs: 50,
      policies: [
        {
          name: 'slow',
          table: 'app.slow',
          column: 'created_at',
          olderThan: '1 hour',
          every: '1 second',
          batchSize: 100,
        },
      ],
    })
    const node = startNode(db.url, config, 'slow-node')
    let mostOpen = 0
    const done = await waitFor(
      'three slow runs',
      async () => {
        const { rows } = await db.pool.query(
          `SELECT count(*) FILTER (WHERE status IN ('scheduled', 'running'))::int AS open,
                  count(*) FILTER (WHERE status = 'done')::int AS done
             FROM pgsingleton.cleanup_runs WHERE singleton = $1`,
          [name],
        )
        mostOpen = Math.max(mostOpen, rows[0].open)
        return rows[0].done >= 3 ? rows[0].done : undefined
      },
      30_000,
    )
    expect(done).toBeGreaterThanOrEqual(3)
    expect(mostOpen).toBe(1)
    const { rows } = await db.pool.query(
      `SELECT max(coalesced)::int AS most FROM pgsingleton.cleanup_runs WHERE singleton = $1 AND status = 'done'`,
      [name],
    )
    expect(rows[0].most).toBeGreaterThanOrEqual(1) // the slots that came due during the slow run
    await waitUntilSettled(db.pool, name)
    node.signal('SIGTERM')
    expect((await node.exited).code).toBe(0)
    expect(await safetyViolations(db.pool, name)).toEqual([])
  })
})
