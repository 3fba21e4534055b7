/**
 * pg-singleton's public API. Everything not exported here is internal.
 */

export {
  migrationFiles,
  migrationProvider,
  migrations,
  SCHEMA_REVISION,
  SCHEMA_VERSION,
  withPgSingletonMigrations,
} from '../migrations/index.js'
export type { BatchReport, RunReport } from './cleanup/run-cleanup.js'
export { type ConfigFile, loadConfigFile } from './config/config-file.js'
export type {
  ColumnType,
  PolicyDefinition,
  RunDefinition,
  TaskDefinition,
} from './config/definition.js'
export type { Logger } from './config/logger.js'
export { consoleLogger, silentLogger } from './config/logger.js'
export type { ResolvedOptions, SingletonOptions } from './config/options.js'
export { DEFAULTS } from './config/options.js'
export type { RetentionPolicy } from './config/policy.js'
export type { ConfigFileTask, SingletonTask, TaskContext } from './config/task.js'
export { assertSchemaCurrent, type MigrationResult, migrateToLatest } from './db/migrate.js'
export { SingletonError, type SingletonErrorCode } from './errors.js'
export type { SingletonEvents, SingletonWarning } from './events.js'
export { lockKey } from './lock/lock-key.js'
export type { Lease } from './lock/lock-session.js'
export {
  forgetSingleton,
  pausePolicy,
  requestRun,
  resumePolicy,
} from './operations/controls.js'
export { type PlannedTable, type PolicyPlan, planPolicies } from './operations/plan.js'
export type { ScheduledRun } from './schedule/scheduler.js'
export { createSingleton, Singleton } from './singleton.js'
export { type Agreement, type PolicyStatus, readPolicyStatus } from './status/read-policy-status.js'
export type { SingletonStatus } from './status/read-status.js'
export { readStatus } from './status/read-status.js'
export { readTerms, type Term } from './status/read-terms.js'
