import pg from 'pg'
import {
  fingerprint,
  type PolicyDefinition,
  type RunDefinition,
} from '../../src/config/definition.js'
import { type RetentionPolicy, resolvePolicies } from '../../src/config/policy.js'
import { validatePolicies } from '../../src/config/validate-policies.js'
import { type Lease, LockSession } from '../../src/lock/lock-session.js'
import { type TransactionLimits, withFence } from '../../src/runs/fence.js'
import * as runs from '../../src/runs/runs.js'

export const LIMITS: TransactionLimits = {
  lockTimeoutMs: 500,
  statementTimeoutMs: 20_000,
  idleInTransactionTimeoutMs: 5000,
}

/**
 * A node without the node: a real lock session that registers definitions and holds the
 * lock under a bumped epoch, so tests can drive the run transitions one by one against
 * PostgreSQL, with nothing scheduling or working behind their back.
 */
export class Holder {
  readonly session: LockSession
  lease: Lease | undefined
  #joined = false

  constructor(
    url: string,
    readonly singleton: string,
    readonly nodeId: string,
  ) {
    this.session = new LockSession(
      { connectionString: url },
      {
        name: singleton,
        nodeId,
        idleSessionTimeoutMs: 60_000,
        lockWaitSliceMs: 5000,
        connectionCheckMs: 1000,
        deadAfterMs: 5000,
      },
    )
  }

  /** Connects and registers; a standby until `hold()`. */
  async join(definitions: readonly RunDefinition[]): Promise<this> {
    this.#joined = true
    await this.session.connect()
    await this.session.register(definitions)
    return this
  }

  async hold(): Promise<Lease> {
    const never = new AbortController().signal
    const lease = await this.session.acquire(never)
    if (!lease) throw new Error('no lease')
    this.lease = lease
    return lease
  }

  token(): runs.FenceTokenWithNode {
    if (!this.lease) throw new Error('hold() first')
    return { singleton: this.singleton, epoch: this.lease.epoch, nodeId: this.nodeId }
  }

  async close(): Promise<void> {
    if (this.#joined) await this.session.release()
  }
}

/** Checks policies the way a node does at start-up and returns their definitions. */
export async function definitionsOf(
  pool: pg.Pool,
  policies: RetentionPolicy[],
): Promise<PolicyDefinition[]> {
  return [...(await validatePolicies(pool, resolvePolicies(policies))).definitions]
}

/** Makes the policy due now and issues its run, as a holder's tick would. */
export async function issueNow(
  pool: pg.Pool,
  holder: Holder,
  definition: PolicyDefinition,
): Promise<runs.IssuedRun[]> {
  const token = holder.token()
  const outcome = await withFence(pool, LIMITS, token, async (tx) => {
    await tx.query(
      `INSERT INTO pgsingleton.schedules (singleton, policy, every, next_run_at, updated_epoch)
       VALUES ($1, $2, $3::interval, now(), $4)
       ON CONFLICT (singleton, policy) DO UPDATE SET next_run_at = now()`,
      [token.singleton, definition.name, definition.every, token.epoch],
    )
    return runs.issue(tx, token, [{ definition, fingerprint: fingerprint(definition) }])
  })
  if (outcome.fenced) throw new Error('fenced')
  return outcome.result
}

export interface Worked {
  claim: runs.Claim
  batches: runs.BatchResult[]
  status: 'done' | 'fenced' | 'retaken' | 'stopped'
}

/**
 * Claims a run and works it to the end the way the worker does (leaf by leaf; a batch
 * that fails for row reasons is redone carefully), without the worker's process around it.
 */
export async function workRun(
  pool: pg.Pool,
  runId: string,
  nodeId: string,
  limit?: number,
): Promise<Worked> {
  const claimed = await runs.claim(pool, runId, nodeId)
  if (typeof claimed === 'string') throw new Error(`run ${runId} could not be claimed: ${claimed}`)
  const claim = claimed as runs.Claim<PolicyDefinition>
  const { rows: leaves } = await pool.query<{ leaf: string; strategy: 'index' | 'tidrange' }>(
    `SELECT l.leaf, l.strategy FROM pgsingleton.cleanup_leaves(to_regclass(format('%I.%I', $1::text, $2::text)), $3) l`,
    [claim.definition.schema, claim.definition.table, claim.definition.column],
  )
  const batches: runs.BatchResult[] = []
  for (const leaf of leaves) {
    let request: runs.BatchRequest = {
      leaf: Number(leaf.leaf),
      strategy: leaf.strategy,
      cursor: null,
      limit: limit ?? claim.definition.batchSize,
      span: 4,
      careful: false,
    }
    for (;;) {
      let batch: runs.BatchResult
      try {
        batch = await runs.recordBatch(pool, LIMITS, claim, request)
      } catch (error) {
        if (request.careful) throw error
        request = { ...request, careful: true }
        continue
      }
      batches.push(batch)
      if (batch.outcome !== 'deleted') return { claim, batches, status: 'stopped' }
      if (batch.leafDone) break
      request = {
        ...request,
        cursor: batch.cursor,
        careful: request.careful && batch.skipped > 0,
      }
    }
  }
  // As a worker does: done only if the run's record holds what its batches returned.
  const sum = (of: (batch: runs.BatchResult) => number) =>
    batches.reduce((total, batch) => total + of(batch), 0)
  const done = await runs.complete(pool, LIMITS, claim, {
    rowsDeleted: claim.rowsDeleted + sum((batch) => batch.deleted),
    rowsSkipped: claim.rowsSkipped + sum((batch) => batch.skipped),
    batches: claim.batches + batches.filter((batch) => batch.selected > 0).length,
  })
  return { claim, batches, status: done.status }
}

/** A client of its own, for transactions a test holds open (an app holding row locks). */
export async function openClient(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url })
  client.on('error', () => {})
  await client.connect()
  return client
}
