/**
 * Stable error codes. Users branch on `error.code`, never on message text, so a code
 * once published keeps its meaning.
 */
export type SingletonErrorCode =
  | 'INVALID_OPTION' // an option or config file value is wrong; names the option and the fix
  | 'INVALID_POLICY' // a retention policy does not match the database (table, column, interval)
  | 'SCHEMA_NOT_MIGRATED' // pgsingleton's migrations have not been run on this database
  | 'SCHEMA_TOO_NEW' // the database was migrated by a newer pg-singleton than this one
  | 'SESSION_NOT_KEPT' // the lock connection cannot keep a session (e.g. a transaction pooler)
  | 'CLEANUP_FAILED' // a cleanup batch failed; the run is recorded as failed and retried
  | 'ROWS_SKIPPED' // a run left rows it could not delete (locked, or refused by a constraint or trigger)
  | 'POLICY_DISAGREEMENT' // live nodes hold different definitions of a policy; it is held back
  | 'NODE_ID_IN_USE' // another live session of the singleton uses this node id
  | 'UNSUPPORTED_DEPENDENCY' // the app's pg or pg-boss is outside the supported range

export class SingletonError extends Error {
  override readonly name = 'SingletonError'
  readonly code: SingletonErrorCode

  constructor(code: SingletonErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
  }
}

/** The message of anything thrown, for logs and `cleanup_runs.error`. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error)
}
