/**
 * PostgreSQL SQLSTATE codes this package reacts to. Named so a reader sees the
 * condition, not a five-character riddle.
 * https://www.postgresql.org/docs/current/errcodes-appendix.html
 */
export const SQLSTATE = {
  /** `lock_timeout` elapsed while waiting for a lock (our wait slices end this way). */
  LOCK_NOT_AVAILABLE: '55P03',
  UNDEFINED_TABLE: '42P01',
  UNDEFINED_FUNCTION: '42883',
  INVALID_SCHEMA_NAME: '3F000',
  INVALID_DATETIME_FORMAT: '22007',
  INVALID_TEXT_REPRESENTATION: '22P02',
  DATETIME_FIELD_OVERFLOW: '22008',
  INTERVAL_FIELD_OVERFLOW: '22015',
  NUMERIC_VALUE_OUT_OF_RANGE: '22003',
  UNIQUE_VIOLATION: '23505',
  DEADLOCK_DETECTED: '40P01',
  /** The statement was cancelled: its `statement_timeout` elapsed (or pg_cancel_backend). */
  QUERY_CANCELED: '57014',
} as const

/**
 * Failures that can be tied to the rows a batch touched: integrity (23), data (22),
 * triggers (09, 27), raised by a trigger (P0), a lock held on a row or a referencing row,
 * a deadlock. A batch that fails this way is done again carefully, row by row where
 * needed (pgsingleton.cleanup_batch, which lists the same conditions).
 */
export function mayBeTiedToRows(error: unknown): boolean {
  const code = sqlState(error)
  if (!code) return false
  return (
    ['23', '22', '09', '27', 'P0'].includes(code.slice(0, 2)) ||
    code === SQLSTATE.LOCK_NOT_AVAILABLE ||
    code === SQLSTATE.DEADLOCK_DETECTED
  )
}

/** Parsing an interval string fails with one of these. */
export const INTERVAL_PARSE_ERRORS: readonly string[] = [
  SQLSTATE.INVALID_DATETIME_FORMAT,
  SQLSTATE.INVALID_TEXT_REPRESENTATION,
  SQLSTATE.DATETIME_FIELD_OVERFLOW,
  SQLSTATE.INTERVAL_FIELD_OVERFLOW,
  SQLSTATE.NUMERIC_VALUE_OUT_OF_RANGE,
]

/**
 * The SQLSTATE of an error the server sent; undefined for anything else. A socket's
 * failure carries a `code` too (ECONNRESET, EPIPE, which has five characters), and so
 * does a SingletonError: neither is the server's answer. pg's DatabaseError carries the
 * message's severity; nothing else does.
 */
export function sqlState(error: unknown): string | undefined {
  if (typeof error !== 'object' || error === null) return undefined
  const { code, severity } = error as { code?: unknown; severity?: unknown }
  return typeof code === 'string' && typeof severity === 'string' ? code : undefined
}

/**
 * The session is gone, or the server will not keep one: no answer at all (a closed or
 * reset socket, a client-side deadline), a connection exception (08), the server ending
 * the session (pg_terminate_backend, a shutdown, a crash of another backend, the idle
 * session timeout) or refusing new ones (starting up, recovering, too many connections).
 */
export function isConnectionLoss(error: unknown): boolean {
  const code = sqlState(error)
  if (code === undefined) return true
  // By code: the severity's text is translated (lc_messages), so 'FATAL' is only a hint.
  const { severity } = error as { severity: string }
  return (
    code.startsWith('08') ||
    SESSION_ENDING.has(code) ||
    severity === 'FATAL' ||
    severity === 'PANIC'
  )
}

const SESSION_ENDING = new Set([
  '57P01', // admin_shutdown: pg_terminate_backend, a fast shutdown
  '57P02', // crash_shutdown: another backend crashed, the server restarts
  '57P03', // cannot_connect_now
  '57P04', // database_dropped
  '57P05', // idle_session_timeout
  '25P03', // idle_in_transaction_session_timeout
])

/**
 * A connection that failed, or was refused, for a reason that passes by itself: the
 * server unreachable, restarting, recovering or out of connections, the database closed
 * to new ones, the path reset or timed out. Not a password, a permission or a schema:
 * those stay until someone changes them. Looks through a wrapping error's cause.
 */
export function isPassingConnectionFailure(error: unknown): boolean {
  for (let e = error, depth = 0; e && depth < 5; depth++) {
    const code = sqlState(e)
    const message = typeof e === 'object' && 'message' in e ? String(e.message) : ''
    if (code !== undefined) {
      return (
        code.startsWith('08') ||
        PASSING_SQLSTATES.has(code) ||
        // The database closed to new connections (ALLOW_CONNECTIONS false): by the
        // server routine that refuses it, since the message may be translated.
        (code === '55000' &&
          ((e as { routine?: unknown }).routine === 'CheckMyDatabase' ||
            /not currently accepting connections/.test(message)))
      )
    }
    const errno = typeof e === 'object' && 'code' in e ? (e as { code: unknown }).code : undefined
    if (typeof errno === 'string' && PASSING_ERRNOS.has(errno)) return true
    if (PASSING_MESSAGES.test(message)) return true
    e = typeof e === 'object' && 'cause' in e ? (e as { cause: unknown }).cause : undefined
  }
  return false
}

const PASSING_SQLSTATES = new Set([
  '57P01', // admin_shutdown: pg_terminate_backend, a fast shutdown
  '57P02', // crash_shutdown: another backend crashed, the server restarts
  '57P03', // cannot_connect_now: starting up, in recovery
  '57P05', // idle_session_timeout
  '57014', // query_canceled: a statement_timeout
  '55P03', // lock_not_available: a lock_timeout (a migration holding pg-boss's tables)
  '40001', // serialization_failure
  '40P01', // deadlock_detected
  '25006', // read_only_sql_transaction: a primary demoted, its successor not yet reached
  '53000', // insufficient_resources
  '53200', // out_of_memory
  '53300', // too_many_connections
])
const PASSING_ERRNOS = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EAI_AGAIN',
])
// node-postgres's own words for a connection lost or never made in time.
const PASSING_MESSAGES =
  /Connection terminated|connection timeout|timeout exceeded when trying to connect|timeout expired|Query read timeout|Client has encountered a connection error/i
