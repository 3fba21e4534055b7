/**
 * Stable error codes. Users branch on `error.code`, never on message text, so a code
 * once published keeps its meaning.
 */
export type SingletonErrorCode =
  | 'INVALID_OPTION' // an option or config file value is wrong; names the option and the fix
  | 'INVALID_POLICY' // a retention policy does not match the database (table, column, interval)
  | 'SCHEMA_NOT_MIGRATED' // pgsingleton's migrations have not been run on this database
  | 'SCHEMA_TOO_NEW' // the database was migrated by a newer pg-singleton than this one
  | 'QUEUE_NOT_STARTED' // the holder's pg-boss did not start (a connection failure): it tries again, and steps down after stepDownAfterMs
  | 'SESSION_NOT_KEPT' // the lock connection cannot keep a session (e.g. a transaction pooler)
  | 'CLEANUP_FAILED' // a cleanup batch failed; the run is recorded as failed and retried
  | 'ROWS_SKIPPED' // a run left rows it could not delete (locked, or refused by a constraint or trigger)
  | 'POLICY_DISAGREEMENT' // live nodes hold different definitions of a policy; it is held back
  | 'NODE_ID_IN_USE' // another live session of the singleton uses this node id
  | 'UNSUPPORTED_DEPENDENCY' // the app's pg or pg-boss is outside the supported range
  | 'NODE_NOT_LIVE' // a worker got a job while its node's lock session was reconnecting; the job goes to another
  | 'TASK_FAILED' // a task's run failed (retried with backoff), or its handler threw after its fenced transaction committed
  | 'FENCED' // a task's fenced transaction may not commit: a newer holder exists, or the run was closed or paused
  | 'FENCED_ONCE' // a task's run called fenced() a second time; one fenced transaction per run
  | 'TASK_TIMEOUT' // a task's run took longer than its timeout: recorded failed and retried with backoff

export class SingletonError extends Error {
  override readonly name = 'SingletonError'
  readonly code: SingletonErrorCode

  constructor(code: SingletonErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
  }
}

/**
 * The message of anything thrown, for logs and `cleanup_runs.error`. Not every thrown
 * thing is an Error: an object says what it holds rather than `[object Object]`.
 */
export function errorMessage(error: unknown): string {
  if (error instanceof Error) {
    if (error.message) return error.message
    // Node's connect over several addresses fails with an AggregateError and no message.
    const inner = error instanceof AggregateError ? error.errors.map(errorMessage) : []
    const code = (error as { code?: unknown }).code
    return [typeof code === 'string' ? code : error.name, ...inner].filter(Boolean).join(': ')
  }
  if (typeof error === 'object' && error !== null) {
    const message = (error as { message?: unknown }).message
    if (typeof message === 'string') return message
    try {
      return JSON.stringify(error)
    } catch {
      return Object.prototype.toString.call(error)
    }
  }
  return String(error)
}
