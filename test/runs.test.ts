import { afterEach, describe, expect, it } from 'vitest'
import { fingerprint } from '../src/config/definition.js'
import { withFence } from '../src/runs/fence.js'
import * as runs from '../src/runs/runs.js'
import { RUN_STATUSES } from '../src/runs/statuses.js'

/** A claim that must succeed. */
async function claimed(
  pool: import('pg').Pool,
  runId: string,
  nodeId: string,
): Promise<runs.Claim> {
  const claim = await runs.claim(pool, runId, nodeId)
  if (typeof claim === 'string') throw new Error(`run ${runId} could not be claimed: ${claim}`)
  return claim
}

import { useTestDatabase } from './support/database.js'
import {
  definitionsOf,
  Holder,
  issueNow,
  LIMITS,
  openClient,
  workRun,
} from './support/run-harness.js'

const db = useTestDatabase({
  setup: async ({ pool }) => {
    await pool.query(`CREATE SCHEMA app;
      CREATE TABLE app.events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL);
      CREATE INDEX ON app.events (created_at);`)
  },
})
const POLICY = {
  name: 'old',
  table: 'app.events',
  column: 'created_at',
  olderThan: '1 hour',
  every: '1 minute',
  batchSize: 100,
}
const open: Holder[] = []
let seq = 0

afterEach(async () => {
  for (const holder of open.splice(0)) await holder.close().catch(() => {})
})

async function holder(singleton: string, policy = POLICY, nodeId = `n${++seq}`) {
  const [definition] = await definitionsOf(db.pool, [policy])
  if (!definition) throw new Error('no definition')
  const h = await new Holder(db.url, singleton, nodeId).join([definition])
  open.push(h)
  return { h, definition }
}

async function runRow(id: string) {
  const { rows } = await db.pool.query(
    'SELECT status, attempt, failures, retry_at, finished_at, error, epoch, reissued, coalesced FROM pgsingleton.cleanup_runs WHERE id = $1',
    [id],
  )
  return rows[0]
}

async function insertAged(count: number, age: string) {
  await db.pool.query(
    `INSERT INTO app.events (created_at) SELECT now() - $1::interval FROM generate_series(1, $2)`,
    [age, count],
  )
}

describe('the run state machine, driven transition by transition against PostgreSQL', () => {
  it('defines its statuses once: the code and the CHECK constraint list the same', async () => {
    const { rows } = await db.pool.query<{ def: string }>(
      `SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE conname = 'cleanup_runs_status_check'`,
    )
    const inCheck = [...(rows[0]?.def ?? '').matchAll(/'([a-z]+)'/g)].map((m) => m[1])
    expect(new Set(inCheck)).toEqual(new Set(RUN_STATUSES))
  })

  it('issue → claim → record batches → complete; a policy has one open run; an occurrence completes once', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertAged(250, '2 hours')
    await insertAged(10, '59 minutes')
    const { h, definition } = await holder('sm-happy')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    expect(run).toMatchObject({ policy: 'old', reissued: false, coalesced: 0 })
    expect(await runRow(run?.runId ?? '')).toMatchObject({ status: 'scheduled', attempt: 0 })
    // Due again, but the open run holds the policy back.
    expect(await issueNow(db.pool, h, definition)).toEqual([])
    await expect(
      db.pool.query(
        `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, definition, fingerprint)
         VALUES ('sm-happy', 'old', $1, now(), 'test', '{}', 'x')`,
        [h.lease?.epoch],
      ),
    ).rejects.toThrow(/cleanup_runs_one_open_per_policy/)

    const worked = await workRun(db.pool, run?.runId ?? '', h.nodeId)
    expect(worked.status).toBe('done')
    expect(worked.batches.map((b) => b.deleted)).toEqual([100, 100, 50])
    expect(await runRow(run?.runId ?? '')).toMatchObject({ status: 'done', attempt: 1 })
    expect(await runs.claim(db.pool, run?.runId ?? '', h.nodeId)).toBe('not waiting')

    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM app.events')
    expect(rows[0].n).toBe(10)
  })

  it('every write of a worker names its attempt: an abandoned attempt can change nothing', async () => {
    const { h, definition } = await holder('sm-attempts')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    const id = run?.runId ?? ''
    const first = await claimed(db.pool, id, h.nodeId)
    expect(await runs.fail(db.pool, first, 'boom', true)).toMatchObject({ status: 'failed' })
    // Its backoff over (the clock moved on), the holder schedules it again, and attempt 2 takes it.
    await db.pool.query(`UPDATE pgsingleton.cleanup_runs SET retry_at = now() WHERE id = $1`, [id])
    const retried = await withFence(db.pool, LIMITS, h.token(), (tx) =>
      runs.retryDue(tx, h.token()),
    )
    expect(retried).toMatchObject({ fenced: false, result: [{ runId: id }] })
    const second = await claimed(db.pool, id, h.nodeId)
    expect(second?.attempt).toBe(2)

    // Attempt 1 wakes up and tries everything it could.
    expect(
      (
        await runs.recordBatch(db.pool, LIMITS, first, {
          leaf: Number((await db.pool.query(`SELECT 'app.events'::regclass::oid AS o`)).rows[0].o),
          strategy: 'index',
          cursor: null,
          limit: 10,
          span: 1,
          careful: false,
        })
      ).outcome,
    ).toBe('superseded')
    expect(await runs.fail(db.pool, first, 'late failure', true)).toBeUndefined()
    await runs.fence(db.pool, first, 'late fence')
    expect(await runs.complete(db.pool, LIMITS, first)).toMatchObject({ status: 'fenced' })
    expect(await runRow(id)).toMatchObject({ status: 'running', attempt: 2, error: null })
  })

  it('fail backs off 1, 2, 4, 8 s and, after the fifth failure, ends the run as exhausted', async () => {
    const { h, definition } = await holder('sm-backoff')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    const id = run?.runId ?? ''
    const delays: number[] = []
    for (let failure = 1; failure <= runs.RETRY.limit; failure++) {
      const claim = await claimed(db.pool, id, h.nodeId)
      const result = await runs.fail(db.pool, claim, `failure ${failure}`, true)
      const row = await runRow(id)
      if (failure < runs.RETRY.limit) {
        expect(result?.status).toBe('failed')
        delays.push((row.retry_at.getTime() - row.finished_at.getTime()) / 1000)
        await db.pool.query(`UPDATE pgsingleton.cleanup_runs SET retry_at = now() WHERE id = $1`, [
          id,
        ])
        await withFence(db.pool, LIMITS, h.token(), (tx) => runs.retryDue(tx, h.token()))
      } else {
        expect(result).toMatchObject({ status: 'exhausted', retryAt: null })
      }
    }
    expect(delays.map((d) => Math.round(d))).toEqual([1, 2, 4, 8])
    expect(await runRow(id)).toMatchObject({ status: 'exhausted', failures: 5, error: 'failure 5' })
    // Exhausted is final and closed: the next occurrence of the policy can be issued.
    expect(await issueNow(db.pool, h, definition)).toHaveLength(1)
  })

  it('an interruption is retried without counting as a failure', async () => {
    const { h, definition } = await holder('sm-interrupt')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    const claim = await claimed(db.pool, run?.runId ?? '', h.nodeId)
    await runs.fail(db.pool, claim, 'interrupted between batches', false)
    expect(await runRow(run?.runId ?? '')).toMatchObject({ status: 'failed', failures: 0 })
  })

  it('a new epoch fences the old one: batches and completion of the old epoch change nothing, and the new holder takes the occurrence over', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertAged(30, '2 hours')
    const a = await holder('sm-epochs', POLICY, 'a')
    await a.h.hold()
    const [run] = await issueNow(db.pool, a.h, a.definition)
    const claim = await claimed(db.pool, run?.runId ?? '', 'a')
    await a.h.close()
    const b = await holder('sm-epochs', POLICY, 'b')
    await b.h.hold()
    const leaf = Number((await db.pool.query(`SELECT 'app.events'::regclass::oid AS o`)).rows[0].o)
    const batch = await runs.recordBatch(db.pool, LIMITS, claim, {
      leaf,
      strategy: 'index',
      cursor: null,
      limit: 10,
      span: 1,
      careful: false,
    })
    expect(batch.outcome).toBe('fenced')
    expect(await runs.complete(db.pool, LIMITS, claim)).toMatchObject({ status: 'fenced' })
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM app.events')
    expect(rows[0].n).toBe(30)

    const taken = await withFence(db.pool, LIMITS, b.h.token(), async (tx) => {
      await runs.takeOver(tx, b.h.token())
      return runs.issue(tx, b.h.token(), [
        { definition: b.definition, fingerprint: fingerprint(b.definition) },
      ])
    })
    if (taken.fenced) throw new Error('fenced')
    const [again] = taken.result
    expect(again).toMatchObject({ reissued: true, epoch: b.h.lease?.epoch })
    const { rows: same } = await db.pool.query(
      `SELECT a.scheduled_for = b.scheduled_for AS same FROM pgsingleton.cleanup_runs a, pgsingleton.cleanup_runs b
        WHERE a.id = $1 AND b.id = $2`,
      [run?.runId, again?.runId],
    )
    expect(same[0].same).toBe(true)
    expect((await workRun(db.pool, again?.runId ?? '', 'b')).status).toBe('done')
    const { rows: left } = await db.pool.query('SELECT count(*)::int AS n FROM app.events')
    expect(left[0].n).toBe(0)
  })

  it('a run that takes over an unfinished run stands for all that run stood for', async () => {
    const { h, definition } = await holder('sm-carried')
    await h.hold()
    // One occurrence, fenced, whose run stood for five more slots.
    await db.pool.query(
      `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, status, definition, fingerprint, error, coalesced)
       VALUES ('sm-carried', 'old', 0, now() - interval '1 minute', 'earlier', 'fenced', '{}', 'x', 'superseded', 5)`,
    )
    await db.pool.query(
      `INSERT INTO pgsingleton.schedules (singleton, policy, every, next_run_at, updated_epoch)
       VALUES ('sm-carried', 'old', '1 minute', now() + interval '1 hour', 0)`,
    )
    const issued = await withFence(db.pool, LIMITS, h.token(), (tx) =>
      runs.issue(tx, h.token(), [{ definition, fingerprint: fingerprint(definition) }]),
    )
    expect(issued).toMatchObject({ fenced: false, result: [{ reissued: true, coalesced: 5 }] })
  })

  it('a takeover issues one run per policy for all the occurrences earlier holders left unfinished', async () => {
    const { h, definition } = await holder('sm-pileup')
    await h.hold()
    // Three occurrences whose runs an earlier holder left fenced, one after the other.
    await db.pool.query(
      `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, status, definition, fingerprint, error)
       SELECT 'sm-pileup', 'old', 0, now() - g * interval '1 minute', 'earlier', 'fenced', '{}', 'x', 'superseded'
         FROM generate_series(1, 3) AS g`,
    )
    // The schedule is not due: only the unfinished occurrences are there to take over.
    await db.pool.query(
      `INSERT INTO pgsingleton.schedules (singleton, policy, every, next_run_at, updated_epoch)
       VALUES ('sm-pileup', 'old', '1 minute', now() + interval '1 hour', 0)`,
    )
    const issue = () =>
      withFence(db.pool, LIMITS, h.token(), (tx) =>
        runs.issue(tx, h.token(), [{ definition, fingerprint: fingerprint(definition) }]),
      )
    const first = await issue()
    expect(first).toMatchObject({ fenced: false, result: [{ reissued: true, coalesced: 2 }] })
    const { rows } = await db.pool.query(
      `SELECT r.scheduled_for = (SELECT max(scheduled_for) FROM pgsingleton.cleanup_runs WHERE singleton = 'sm-pileup' AND status = 'fenced') AS latest
         FROM pgsingleton.cleanup_runs r WHERE r.singleton = 'sm-pileup' AND r.status = 'scheduled'`,
    )
    expect(rows).toEqual([{ latest: true }])
    expect(await issue()).toMatchObject({ fenced: false, result: [] })
  })

  it('a run an earlier holder issued is not claimed after a takeover: the new holder closes it and issues its occurrence again', async () => {
    const a = await holder('sm-claim-epoch', POLICY, 'a')
    await a.h.hold()
    const [run] = await issueNow(db.pool, a.h, a.definition)
    await a.h.close()
    const b = await holder('sm-claim-epoch', POLICY, 'b')
    await b.h.hold()
    // Before the new holder's first tick, its worker finds the job.
    expect(await runs.claim(db.pool, run?.runId ?? '', 'b')).toBe('not waiting')
    expect(await runRow(run?.runId ?? '')).toMatchObject({ status: 'scheduled', attempt: 0 })
    const taken = await withFence(db.pool, LIMITS, b.h.token(), async (tx) => {
      await runs.takeOver(tx, b.h.token())
      return runs.issue(tx, b.h.token(), [
        { definition: b.definition, fingerprint: fingerprint(b.definition) },
      ])
    })
    expect(taken).toMatchObject({ fenced: false, result: [{ reissued: true }] })
    const again = taken.fenced ? undefined : taken.result[0]
    expect(await claimed(db.pool, again?.runId ?? '', 'b')).toMatchObject({
      epoch: b.h.lease?.epoch,
      attempt: 1,
    })
  })

  it('a failed run waiting for its retry keeps its failures and its backoff across a takeover: the new holder retries the same row when retry_at comes', async () => {
    const a = await holder('sm-retry-takeover', POLICY, 'a')
    await a.h.hold()
    const [run] = await issueNow(db.pool, a.h, a.definition)
    const runId = run?.runId ?? ''
    for (let failure = 1; failure <= 2; failure++) {
      const claim = await claimed(db.pool, runId, 'a')
      await runs.fail(db.pool, claim, `failure ${failure}`, true)
      await db.pool.query(`UPDATE pgsingleton.cleanup_runs SET retry_at = now() WHERE id = $1`, [
        runId,
      ])
      const retried = await withFence(db.pool, LIMITS, a.h.token(), (tx) =>
        runs.retryDue(tx, a.h.token()),
      )
      expect(retried).toMatchObject({ fenced: false, result: [{ runId }] })
    }
    // The third failure, with a backoff ahead; then the holder goes.
    const third = await claimed(db.pool, runId, 'a')
    const failed = await runs.fail(db.pool, third, 'failure 3', true)
    await a.h.close()
    const b = await holder('sm-retry-takeover', POLICY, 'b')
    await b.h.hold()
    const tick = () =>
      withFence(db.pool, LIMITS, b.h.token(), async (tx) => {
        await runs.takeOver(tx, b.h.token())
        return {
          retried: await runs.retryDue(tx, b.h.token()),
          issued: await runs.issue(tx, b.h.token(), [
            { definition: b.definition, fingerprint: fingerprint(b.definition) },
          ]),
        }
      })
    // Before its retry_at: nothing is issued or retried, and the row is the new epoch's.
    expect(await tick()).toMatchObject({ fenced: false, result: { retried: [], issued: [] } })
    expect(await runRow(runId)).toMatchObject({
      status: 'failed',
      failures: 3,
      attempt: 3,
      epoch: String(b.h.lease?.epoch),
      retry_at: failed?.retryAt,
    })
    await db.pool.query(`UPDATE pgsingleton.cleanup_runs SET retry_at = now() WHERE id = $1`, [
      runId,
    ])
    expect(await tick()).toMatchObject({
      fenced: false,
      result: { retried: [{ runId }], issued: [] },
    })
    const fourth = await claimed(db.pool, runId, 'b')
    expect(fourth.attempt).toBe(4)
  })

  it('a run issued for a due slot that also takes over unfinished occurrences says it is reissued, and stands for them', async () => {
    const { h, definition } = await holder('sm-due-and-unfinished')
    await h.hold()
    await db.pool.query(
      `INSERT INTO pgsingleton.cleanup_runs (singleton, policy, epoch, scheduled_for, scheduled_by, status, definition, fingerprint, error)
       SELECT 'sm-due-and-unfinished', 'old', 0, now() - g * interval '1 minute', 'earlier', 'fenced', '{}', 'x', 'superseded'
         FROM generate_series(1, 3) AS g`,
    )
    // Due now, with no slot missed before it.
    await db.pool.query(
      `INSERT INTO pgsingleton.schedules (singleton, policy, every, next_run_at, updated_epoch)
       VALUES ('sm-due-and-unfinished', 'old', '1 hour', now() - interval '1 second', 0)`,
    )
    const issued = await withFence(db.pool, LIMITS, h.token(), (tx) =>
      runs.issue(tx, h.token(), [{ definition, fingerprint: fingerprint(definition) }]),
    )
    expect(issued).toMatchObject({ fenced: false, result: [{ reissued: true, coalesced: 3 }] })
    const { rows } = await db.pool.query(
      `SELECT reissued, coalesced, scheduled_for = (SELECT last_scheduled_for FROM pgsingleton.schedules WHERE singleton = 'sm-due-and-unfinished') AS at_slot
         FROM pgsingleton.cleanup_runs WHERE singleton = 'sm-due-and-unfinished' AND status = 'scheduled'`,
    )
    expect(rows).toEqual([{ reissued: true, coalesced: 3, at_slot: true }])
  })

  it('a node that is not live may not claim: its definitions do not count towards the agreement', async () => {
    const { h, definition } = await holder('sm-unregistered')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    expect(await runs.claim(db.pool, run?.runId ?? '', 'never-registered')).toBe('not live')
    expect(await runRow(run?.runId ?? '')).toMatchObject({ status: 'scheduled', attempt: 0 })
  })

  it('a node that registers while a batch is in flight waits for it; the batches after it see the node', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertAged(40, '2 days')
    const { h, definition } = await holder('sm-join', POLICY, 'keeper')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    const claim = await claimed(db.pool, run?.runId ?? '', 'keeper')
    const leaf = Number((await db.pool.query(`SELECT 'app.events'::regclass::oid AS o`)).rows[0].o)
    const request: runs.BatchRequest = {
      leaf,
      strategy: 'index',
      cursor: null,
      limit: 10,
      span: 1,
      careful: false,
    }
    // The app holds the table: the batch waits inside its delete, after its agreement check.
    const app = await openClient(db.url)
    await app.query('BEGIN; LOCK TABLE app.events IN SHARE MODE')
    const slow = { ...LIMITS, lockTimeoutMs: 20_000 }
    const inFlight = runs.recordBatch(db.pool, slow, claim, request)
    await new Promise((resolve) => setTimeout(resolve, 300))
    let joined = false
    const other = holder('sm-join', { ...POLICY, olderThan: '90 days' }, 'other').then((o) => {
      joined = true
      return o
    })
    await new Promise((resolve) => setTimeout(resolve, 500))
    expect(joined).toBe(false) // its registration waits for the batch
    await app.query('COMMIT')
    await app.end()
    expect((await inFlight).outcome).toBe('deleted')
    await other
    expect((await runs.recordBatch(db.pool, LIMITS, claim, request)).outcome).toBe('disagree')
    const { rows } = await db.pool.query(
      `SELECT max(b.ended_at) < (SELECT registered_at FROM pgsingleton.nodes WHERE singleton = 'sm-join' AND node_id = 'other') AS before
         FROM pgsingleton.cleanup_batches b WHERE b.run_id = $1`,
      [claim.runId],
    )
    expect(rows[0].before).toBe(true)
  })

  it('takeOver closes a running run whose node holds no membership lock, and the occurrence is issued again', async () => {
    const { h, definition } = await holder('sm-orphan')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    // Claimed by a worker on another node, whose lock session then ends (a crash).
    const worker = await holder('sm-orphan', POLICY, 'a-node-that-died')
    await claimed(db.pool, run?.runId ?? '', 'a-node-that-died')
    worker.h.session.destroy()
    await new Promise((resolve) => setTimeout(resolve, 200))
    const result = await withFence(db.pool, LIMITS, h.token(), async (tx) => {
      await runs.takeOver(tx, h.token())
      return runs.issue(tx, h.token(), [{ definition, fingerprint: fingerprint(definition) }])
    })
    expect(await runRow(run?.runId ?? '')).toMatchObject({
      status: 'fenced',
      error: expect.stringMatching(/a-node-that-died is gone/),
    })
    expect(result).toMatchObject({ fenced: false, result: [{ reissued: true }] })
  })

  it('a batch stops as soon as a live node holds another definition of the policy, and goes on once it is gone', async () => {
    await db.pool.query('TRUNCATE app.events')
    await insertAged(50, '2 days')
    const { h, definition } = await holder('sm-agree', POLICY, 'keeper')
    await h.hold()
    const [run] = await issueNow(db.pool, h, definition)
    const claim = await claimed(db.pool, run?.runId ?? '', 'keeper')
    const other = await holder('sm-agree', { ...POLICY, olderThan: '1 day' }, 'other')
    const leaf = Number((await db.pool.query(`SELECT 'app.events'::regclass::oid AS o`)).rows[0].o)
    const request: runs.BatchRequest = {
      leaf,
      strategy: 'index',
      cursor: null,
      limit: 10,
      span: 1,
      careful: false,
    }
    expect((await runs.recordBatch(db.pool, LIMITS, claim, request)).outcome).toBe('disagree')
    await other.h.close()
    expect((await runs.recordBatch(db.pool, LIMITS, claim, request)).outcome).toBe('deleted')
  })
})
