import { describe, expect, it } from 'vitest'
import { parseTableName, quoteIdent } from '../src/config/identifier.js'
import { resolveOptions, withoutApplicationName } from '../src/config/options.js'
import { lockKey } from '../src/lock/lock-key.js'

const policy = {
  name: 'old-events',
  table: 'app.events',
  column: 'created_at',
  olderThan: '30 days',
  every: '1 minute',
}
const base = { name: 'cleaner', connectionString: 'postgres://localhost/x', policies: [policy] }

function codeAndMessage(make: () => unknown): { code: string; message: string } {
  try {
    make()
  } catch (error) {
    return { code: (error as { code: string }).code, message: (error as Error).message }
  }
  throw new Error('expected an error')
}

describe('options are resolved once and validated with messages that name the option', () => {
  it('fills in safe defaults and freezes the result', () => {
    const options = resolveOptions(base)
    expect(options.heartbeatMs).toBe(1000)
    expect(options.fenceAfterMs).toBe(2000)
    expect(options.idleSessionTimeoutMs).toBe(3000)
    expect(options.policies[0]?.batchSize).toBe(100_000)
    expect(options.policies[0]?.table).toEqual({ schema: 'app', name: 'events' })
    expect(Object.isFrozen(options)).toBe(true)
    expect(Object.isFrozen(options.policies[0])).toBe(true)
  })

  it('refuses a fenceAfterMs that would let the server hand the lock on before the holder fences', () => {
    const error = codeAndMessage(() =>
      resolveOptions({ ...base, fenceAfterMs: 3000, idleSessionTimeoutMs: 3000 }),
    )
    expect(error.code).toBe('INVALID_OPTION')
    expect(error.message).toMatch(/fenceAfterMs \(3000\).*idleSessionTimeoutMs \(3000\)/)
    expect(
      codeAndMessage(() => resolveOptions({ ...base, heartbeatMs: 2000, fenceAfterMs: 1500 }))
        .message,
    ).toMatch(/fenceAfterMs \(1500\) must be greater than heartbeatMs \(2000\)/)
  })

  it.each([
    [{ name: 'bad name!' }, /name: "bad name!"/],
    [{ connectionString: undefined }, /connectionString/],
    [{ policies: [] }, /policies, tasks: give at least one retention policy or task/],
    [{ policies: [{ ...policy, batchSize: 0 }] }, /policy "old-events", field batchSize: 0/],
    [{ policies: [{ ...policy, batchSize: 1.5 }] }, /field batchSize: 1.5/],
    [{ policies: [{ ...policy, olderthan: '1 day' }] }, /policies\[0\]\.olderthan: unknown field/],
    [{ policies: [policy, policy] }, /"old-events" is used by two policies/],
    [
      { policies: [{ ...policy, table: '.events' }] },
      /field table \(schema part of "\.events"\): the name is empty/,
    ],
    [
      { policies: [{ ...policy, column: 'x'.repeat(64) }] },
      /field column: "x{64}" is longer than PostgreSQL's 63-byte/,
    ],
    [{ heartbeatMs: -1 }, /heartbeatMs: -1 must be a number/],
  ])('refuses %o', (patch, message) => {
    const error = codeAndMessage(() => resolveOptions({ ...base, ...patch } as never))
    expect(error.code).toBe('INVALID_OPTION')
    expect(error.message).toMatch(message)
  })
})

describe('identifiers', () => {
  it('splits schema.table at the first dot and keeps everything literally', () => {
    expect(parseTableName('events', 'x')).toEqual({ schema: 'public', name: 'events' })
    expect(parseTableName('My Schema.Events.2024', 'x')).toEqual({
      schema: 'My Schema',
      name: 'Events.2024',
    })
    expect(parseTableName('app.events"; DROP TABLE x; --', 'x')).toEqual({
      schema: 'app',
      name: 'events"; DROP TABLE x; --',
    })
  })

  it('always quotes, doubling embedded quotes', () => {
    expect(quoteIdent('events')).toBe('"events"')
    expect(quoteIdent('a"b')).toBe('"a""b"')
  })
})

describe('lock keys', () => {
  it('are 64-bit, stable, and differ between names', () => {
    expect(lockKey('db-cleaner')).toBe(732401445611706878n) // the documented SQL gives the same
    expect(lockKey('a')).not.toBe(lockKey('b'))
  })
})

describe('an application_name in a connection URL', () => {
  it('is taken out, and nothing else of the URL changes', () => {
    expect(withoutApplicationName('postgres://u:p%40ss@h:5432/db?application_name=app')).toBe(
      'postgres://u:p%40ss@h:5432/db',
    )
    expect(
      withoutApplicationName('postgres://h/db?sslmode=require&application%5Fname=app&port=6432'),
    ).toBe('postgres://h/db?sslmode=require&port=6432')
    expect(
      withoutApplicationName('postgresql:///db?host=/var/run/postgresql&application_name'),
    ).toBe('postgresql:///db?host=/var/run/postgresql')
    // What follows a # is no parameter to pg, and must not become one.
    expect(withoutApplicationName('postgres://h/db?application_name=app#3&sslmode=disable')).toBe(
      'postgres://h/db#3&sslmode=disable',
    )
    expect(withoutApplicationName('postgres://h/db?sslmode=verify-full')).toBe(
      'postgres://h/db?sslmode=verify-full',
    )
    expect(withoutApplicationName(undefined)).toBeUndefined()
    expect(
      resolveOptions({ ...base, connectionString: 'postgres://h/x?application_name=app' })
        .connectionString,
    ).toBe('postgres://h/x')
  })
})
