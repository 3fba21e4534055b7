import type pg from 'pg'

/** One row of `pgsingleton.status`, in camelCase. Holder fields are null when nobody holds the lock. */
export interface SingletonStatus {
  name: string
  nodeId: string | null
  backendPid: number | null
  epoch: number | null
  acquiredAt: Date | null
  heartbeatAt: Date | null
  waitingNodes: number
  waitingNodeIds: string[]
  lastEpoch: number
  lastNodeId: string
  lastRunAt: Date | null
  lastRunRows: number | null
  lastRunPolicy: string | null
  lastRunStatus: string | null
}

interface StatusRow {
  name: string
  node_id: string | null
  backend_pid: number | null
  epoch: string | null
  acquired_at: Date | null
  heartbeat_at: Date | null
  waiting_nodes: number
  waiting_node_ids: string[]
  last_epoch: string
  last_node_id: string
  last_run_at: Date | null
  last_run_rows: string | null
  last_run_policy: string | null
  last_run_status: string | null
}

/** Reads `pgsingleton.status`: every singleton, or the one named. */
export async function readStatus(
  pool: pg.Pool | pg.Client,
  name?: string,
): Promise<SingletonStatus[]> {
  const { rows } = await pool.query<StatusRow>(
    'SELECT * FROM pgsingleton.status WHERE $1::text IS NULL OR name = $1 ORDER BY name',
    [name ?? null],
  )
  return rows.map((row) => ({
    name: row.name,
    nodeId: row.node_id,
    backendPid: row.backend_pid,
    epoch: row.epoch === null ? null : Number(row.epoch),
    acquiredAt: row.acquired_at,
    heartbeatAt: row.heartbeat_at,
    waitingNodes: row.waiting_nodes,
    waitingNodeIds: row.waiting_node_ids,
    lastEpoch: Number(row.last_epoch),
    lastNodeId: row.last_node_id,
    lastRunAt: row.last_run_at,
    lastRunRows: row.last_run_rows === null ? null : Number(row.last_run_rows),
    lastRunPolicy: row.last_run_policy,
    lastRunStatus: row.last_run_status,
  }))
}
