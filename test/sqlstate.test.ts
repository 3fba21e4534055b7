import { describe, expect, it } from 'vitest'
import { isConnectionLoss, isPassingConnectionFailure, sqlState } from '../src/db/sqlstate.js'
import { errorMessage, SingletonError } from '../src/errors.js'

/** An error as node-postgres builds it from the server's message. */
function serverError(code: string, message: string, extra: object = {}) {
  return Object.assign(new Error(message), { code, severity: 'ERROR', ...extra })
}
/** A socket's failure, as Node reports it. */
function socketError(code: string) {
  return Object.assign(new Error(`connect ${code} 127.0.0.1:5432`), { code })
}

describe('what counts as an answer from the server', () => {
  it('only an error the server sent has a SQLSTATE: a socket error or our own code does not', () => {
    expect(sqlState(serverError('42501', 'permission denied'))).toBe('42501')
    expect(sqlState(socketError('EPIPE'))).toBeUndefined()
    expect(sqlState(new SingletonError('FENCED', 'x'))).toBeUndefined()
  })

  it('a session the server ended is lost, whatever language its messages are in', () => {
    // lc_messages = 'ru_RU': the severity reads ВАЖНО, not FATAL.
    const terminated = serverError('57P01', 'завершение подключения', { severity: 'ВАЖНО' })
    expect(isConnectionLoss(terminated)).toBe(true)
    expect(isConnectionLoss(serverError('57P02', 'crash', { severity: 'FATALT' }))).toBe(true)
    expect(isConnectionLoss(serverError('08006', 'connection failure'))).toBe(true)
    expect(isConnectionLoss(new Error('Connection terminated unexpectedly'))).toBe(true)
    expect(isConnectionLoss(serverError('55P03', 'lock not available'))).toBe(false)
  })
})

describe('failures of a connection that pass by themselves', () => {
  it('a refused, reset or timed-out connection, a restart, a database closed for a while', () => {
    for (const error of [
      socketError('ECONNREFUSED'),
      socketError('ECONNRESET'),
      new Error('Connection terminated due to connection timeout'),
      new Error('timeout exceeded when trying to connect'),
      serverError('57P03', 'the database system is starting up'),
      serverError('53300', 'sorry, too many clients already'),
      // Translated message: known by the routine that refuses it.
      serverError('55000', 'la base n’accepte pas de connexions', { routine: 'CheckMyDatabase' }),
      serverError('55000', 'database "x" is not currently accepting connections'),
      // Node's connect over several addresses: an AggregateError with a code.
      Object.assign(new AggregateError([socketError('ECONNREFUSED')], ''), {
        code: 'ECONNREFUSED',
      }),
      // Wrapped, as pg-singleton wraps pg-boss's start.
      new SingletonError('QUEUE_NOT_STARTED', 'pg-boss could not start', {
        cause: socketError('ECONNREFUSED'),
      }),
    ])
      expect(isPassingConnectionFailure(error), errorMessage(error)).toBe(true)
  })

  it('not a password, a permission, a schema, or a mistake in the code', () => {
    for (const error of [
      serverError('28P01', 'password authentication failed'),
      serverError('42501', 'permission denied for schema pgboss'),
      serverError('42P01', 'relation "pgboss.version" does not exist'),
      serverError('55000', 'object not in prerequisite state'),
      new Error('pg-boss is not installed'),
      new Error('Database not opened'),
    ])
      expect(isPassingConnectionFailure(error), errorMessage(error)).toBe(false)
  })

  it('an AggregateError without a message still says what failed', () => {
    const error = Object.assign(new AggregateError([socketError('ECONNREFUSED')], ''), {
      code: 'ECONNREFUSED',
    })
    expect(errorMessage(error)).toBe('ECONNREFUSED: connect ECONNREFUSED 127.0.0.1:5432')
  })
})
