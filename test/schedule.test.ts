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

describe('the schedule lives in the database', () => {
  it('after an outage, runs the first missed occurrence once, coalesces the rest, and resumes on its grid', async () => {
    const name = 'misfire'
    const config = await writeConfig({
      name,
      policies: [
        {
          name: 'old-events',
          table: 'app.events',
          column: 'created_at',
          olderThan: '1 hour',
          every: '1 second',
        },
      ],
    })
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
