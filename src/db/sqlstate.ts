/**
 * PostgreSQL SQLSTATE codes this package reacts to. Named so a reader sees the
 * condition, not a five-character riddle.
 * https://www.postgresql.org/docs/current/errcodes-appendix.html
 */
export const SQLSTATE = {
  /** `lock_timeout` elapsed while waiting for a lock (our wait slices end this way). */
  LOCK_NOT_AVAILABLE: '55P03',
  /** `statement_timeout` or a cancel request. */
  QUERY_CANCELED: '57014',
  /** `idle_session_timeout` cut the session (PostgreSQL 14+). */
  IDLE_SESSION_TIMEOUT: '57P05',
  /** `pg_terminate_backend` or a server shutdown ended the session. */
  ADMIN_SHUTDOWN: '57P01',
  /** `idle_in_transaction_session_timeout` ended the session. */
  IDLE_IN_TRANSACTION_TIMEOUT: '25P03',
  UNDEFINED_TABLE: '42P01',
  UNDEFINED_COLUMN: '42703',
  INVALID_SCHEMA_NAME: '3F000',
  INVALID_DATETIME_FORMAT: '22007',
  INVALID_TEXT_REPRESENTATION: '22P02',
  DATETIME_FIELD_OVERFLOW: '22008',
  INTERVAL_FIELD_OVERFLOW: '22015',
  NUMERIC_VALUE_OUT_OF_RANGE: '22003',
  UNIQUE_VIOLATION: '23505',
} as const

/** Parsing an interval string fails with one of these. */
export const INTERVAL_PARSE_ERRORS: readonly string[] = [
  SQLSTATE.INVALID_DATETIME_FORMAT,
  SQLSTATE.INVALID_TEXT_REPRESENTATION,
  SQLSTATE.DATETIME_FIELD_OVERFLOW,
  SQLSTATE.INTERVAL_FIELD_OVERFLOW,
  SQLSTATE.NUMERIC_VALUE_OUT_OF_RANGE,
]

export function sqlState(error: unknown): string | undefined {
  if (typeof error === 'object' && error !== null && 'code' in error) {
    const code = (error as { code: unknown }).code
    return typeof code === 'string' ? code : undefined
  }
  return undefined
}
