import { metrics, ValueType } from '@opentelemetry/api'
import type pg from 'pg'

/**
 * pg-singleton's metrics, through the OpenTelemetry API: no-ops unless the app registers
 * an OpenTelemetry SDK (a MeterProvider) before the node starts (`pg-singleton run
 * --metrics-port N` registers one that serves Prometheus text). Names start with
 * `pgsingleton_`; every series has the attribute `singleton`.
 *
 * - `pgsingleton_is_holder` (gauge, 1 on the node that holds, 0 elsewhere; attribute `node`)
 * - `pgsingleton_epoch` (gauge, the epoch this node holds, on the holder)
 * - `pgsingleton_holderships` (counter: holderships this node started)
 * - `pgsingleton_rows_deleted` (counter; attribute `policy`)
 * - `pgsingleton_batch_duration_seconds` (histogram: a cleanup batch's transaction)
 * - `pgsingleton_run_duration_seconds` (histogram; attributes `policy`, `kind`, `status`)
 * - `pgsingleton_task_runs` (counter; attributes `task`, `status`)
 * - `pgsingleton_task_failures` (counter; attribute `task`)
 * - `pgsingleton_last_success_age_seconds` (gauge, read from `pgsingleton.policy_status` by
 *   the holder only, so a standby opens no connection for it; attributes `policy`, `kind`):
 *   the thing to alert on.
 */
export class SingletonMetrics {
  readonly #meter = metrics.getMeter('pg-singleton')
  readonly #base: { singleton: string }
  readonly #holderships
  readonly #rowsDeleted
  readonly #batchDuration
  readonly #runDuration
  readonly #taskRuns
  readonly #taskFailures

  constructor(
    singleton: string,
    nodeId: string,
    state: {
      /** The epoch this node holds, or undefined. */
      holding(): number | undefined
      /** The pool, while holding. */
      pool(): pg.Pool | undefined
    },
  ) {
    this.#base = { singleton }
    const meter = this.#meter
    meter
      .createObservableGauge('pgsingleton_is_holder', {
        description: '1 on the node that holds the singleton, 0 on the others',
        valueType: ValueType.INT,
      })
      .addCallback((result) => {
        result.observe(state.holding() === undefined ? 0 : 1, { singleton, node: nodeId })
      })
    meter
      .createObservableGauge('pgsingleton_epoch', {
        description: 'the epoch (fencing token) of the holdership this node holds',
        valueType: ValueType.INT,
      })
      .addCallback((result) => {
        const epoch = state.holding()
        if (epoch !== undefined) result.observe(epoch, { singleton, node: nodeId })
      })
    meter
      .createObservableGauge('pgsingleton_last_success_age_seconds', {
        description:
          'seconds since the last successful run of each policy and task (reported by the holder)',
        unit: 's',
      })
      .addCallback(async (result) => {
        const pool = state.pool()
        if (state.holding() === undefined || !pool) return
        const { rows } = await pool
          .query<{ policy: string; kind: string; age: number | null }>(
            `SELECT p.policy, p.kind,
                    greatest(0, extract(epoch FROM clock_timestamp() - coalesce(p.last_success_at, s.created_at)))::float8 AS age
               FROM pgsingleton.policy_status p
               LEFT JOIN pgsingleton.schedules s USING (singleton, policy)
              WHERE p.singleton = $1`,
            [singleton],
          )
          .catch(() => ({ rows: [] as { policy: string; kind: string; age: number | null }[] }))
        for (const row of rows) {
          if (row.age !== null)
            result.observe(row.age, { singleton, policy: row.policy, kind: row.kind })
        }
      })
    this.#holderships = meter.createCounter('pgsingleton_holderships', {
      description: 'holderships this node started',
      valueType: ValueType.INT,
    })
    this.#rowsDeleted = meter.createCounter('pgsingleton_rows_deleted', {
      description: 'rows deleted by cleanup runs on this node',
      valueType: ValueType.INT,
    })
    this.#batchDuration = meter.createHistogram('pgsingleton_batch_duration_seconds', {
      description: "a cleanup batch's transaction, by the server's clock",
      unit: 's',
      advice: {
        explicitBucketBoundaries: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      },
    })
    this.#runDuration = meter.createHistogram('pgsingleton_run_duration_seconds', {
      description: 'a run of a policy or task on this node, from its claim to its end',
      unit: 's',
      advice: {
        explicitBucketBoundaries: [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600],
      },
    })
    this.#taskRuns = meter.createCounter('pgsingleton_task_runs', {
      description: 'task runs that ended on this node, by status',
      valueType: ValueType.INT,
    })
    this.#taskFailures = meter.createCounter('pgsingleton_task_failures', {
      description: 'task runs that failed on this node',
      valueType: ValueType.INT,
    })
  }

  holdershipStarted(): void {
    this.#holderships.add(1, this.#base)
  }

  batch(policy: string, rows: number, elapsedMs: number): void {
    this.#rowsDeleted.add(rows, { ...this.#base, policy })
    this.#batchDuration.record(elapsedMs / 1000, { ...this.#base, policy })
  }

  run(report: { policy: string; kind: string; status: string; durationMs?: number }): void {
    if (report.durationMs !== undefined) {
      this.#runDuration.record(report.durationMs / 1000, {
        ...this.#base,
        policy: report.policy,
        kind: report.kind,
        status: report.status,
      })
    }
    if (report.kind !== 'task') return
    this.#taskRuns.add(1, { ...this.#base, task: report.policy, status: report.status })
    if (report.status === 'failed' || report.status === 'exhausted') {
      this.#taskFailures.add(1, { ...this.#base, task: report.policy })
    }
  }
}
