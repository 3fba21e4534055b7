import type { BatchReport, RunReport } from './cleanup/run-cleanup.js'
import type { Lease } from './lock/lock-session.js'
import type { ScheduledRun } from './schedule/scheduler.js'

/** Something worth an operator's attention that does not stop the node. */
export interface SingletonWarning {
  /**
   * Stable: `UNINDEXED_COLUMN`, `LEGACY_ZONE_NAME`, `PARTITIONS_DELETED_BY_ROW`,
   * `POLICY_DISAGREEMENT`, `SESSION_SETTING_REFUSED`, `TAKEOVER_NOT_READIED`,
   * `SESSION_CHECK_SKIPPED`, `HAND_OVER_FAILED`, `STEP_DOWN_SKIPPED`, `ZONE_RULES_DIFFER`.
   */
  code: string
  message: string
}

/** Typed events of a singleton node. Listeners that throw are logged, never break the node. */
export interface SingletonEvents {
  /** Connected and queued for the lock. */
  'lock:waiting': [{ nodeId: string }]
  /** This node holds the singleton under a new epoch. */
  'lock:acquired': [Lease]
  /** This node stopped holding it without being asked to (fence, lost session). */
  'lock:lost': [{ lease: Lease; reason: string }]
  /** `stop()` released the lock. */
  'lock:released': [Lease]
  /** The holder scheduled a run of a policy or task (a due occurrence, or one taken over from an older epoch). */
  'schedule:sent': [ScheduledRun]
  'cleanup:batch': [BatchReport]
  /** A cleanup run ended: `done`, `fenced`, `failed` (retried later), `exhausted`, or `skipped` (not waiting for a worker). */
  'cleanup:done': [RunReport]
  /** A task's run ended: `done`, `fenced`, `failed` (retried later), `exhausted`, or `skipped`. */
  'task:done': [RunReport]
  warning: [SingletonWarning]
  /** Background failures: lock session, schedule ticks, cleanup batches. */
  error: [Error]
}
