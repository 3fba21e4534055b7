import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { parseInterval } from '../src/config/interval.js'
import { resolveOptions } from '../src/config/options.js'
import { useTestDatabase } from './support/database.js'
import { failOnNodesLeftRunning, startNode, writeConfig } from './support/nodes.js'

const db = useTestDatabase()
failOnNodesLeftRunning()

const policy = {
  name: 'p',
  table: 'app.events',
  column: 'created_at',
  olderThan: '30 days',
  every: '1 minute',
}

describe('intervals: only unambiguous forms are accepted', () => {
  it.each([
    ['30', /a bare number has no unit \(PostgreSQL would read "30" as seconds\)/],
    ['6M', /units are spelled out \(PostgreSQL reads "6M" as 6 minutes\)/],
    ['1 m', /"m" is an abbreviation, and abbreviations are refused/],
    ['1 min', /"min" is an abbreviation/],
    ['2 hrs', /"hrs" is an abbreviation/],
    ['1d', /need a space between them/],
    ['-1 year 361 days', /signs are refused: every term must be positive/],
    ['1 mon -29 days', /signs are refused/],
    ['+1 day', /signs are refused/],
    ['1:30', /HH:MM forms are refused/],
    ['01:00:00', /HH:MM forms are refused/],
    ['1 day 02:00', /HH:MM forms are refused/],
    ['P30D', /ISO 8601 forms/],
    ['1 day ago', /"@" and "ago" forms are refused/],
    ['@ 1 day', /"@" and "ago" forms are refused/],
    ['0 days', /"0 days" is not positive/],
    ['1 millisecond', /"1 millisecond" is not a "<number> <unit>" term/],
    ['1 decade', /is not a "<number> <unit>" term/],
    ['30 dayz', /is not a "<number> <unit>" term/],
    ['1 day 2', /every number needs a unit/],
    ['', /it is empty/],
    ['1e3 days', /numbers with exponents are refused/],
    ['1 day 2 days', /"day" appears twice; give each unit once/],
    ['0.01 years', /months and years must be whole numbers/],
    ['1.5 months', /months and years must be whole numbers/],
    ['0.0000001 seconds', /more than 6 decimals/],
  ])('refuses %j, saying why and how to write it', (value, reason) => {
    const parsed = parseInterval(value)
    expect(parsed.ok).toBe(false)
    if (parsed.ok) return
    expect(parsed.reason).toMatch(reason)
    expect(parsed.reason).toMatch(/e\.g\. "30 days" or "1 hour 30 minutes"/)
  })

  it.each([
    ['30 days', '30 days'],
    ['1 day', '1 day'],
    ['1 days', '1 day'],
    ['2 Weeks', '2 weeks'],
    ['1 hour 30 minutes', '1 hour 30 minutes'],
    ['  7   days  ', '7 days'],
    ['1.5 hours', '1.5 hours'],
    ['007 seconds', '7 seconds'],
    [
      '1 year 2 months 3 weeks 4 days 5 hours 6 minutes 7 seconds',
      '1 year 2 months 3 weeks 4 days 5 hours 6 minutes 7 seconds',
    ],
  ])('accepts %j as %j', (value, canonical) => {
    expect(parseInterval(value)).toMatchObject({ ok: true, canonical })
  })

  it('names the policy, the field, the value and an example, for every refused interval at once', () => {
    let message = ''
    try {
      resolveOptions({
        name: 'x',
        connectionString: 'postgres://localhost/x',
        policies: [
          { ...policy, olderThan: '30' },
          { ...policy, name: 'q', every: '1 m' },
        ],
      })
    } catch (error) {
      message = (error as Error).message
    }
    expect(message).toMatch(/^2 problems in the configuration:/)
    expect(message).toMatch(
      /policy "p", field olderThan: "30" is refused: a bare number has no unit/,
    )
    expect(message).toMatch(/policy "q", field every: "1 m" is refused: "m" is an abbreviation/)
  })

  it('refuses them in a config file at start-up, exit 1, before anything is deleted', async () => {
    await db.pool.query(`CREATE SCHEMA app;
      CREATE TABLE app.events (created_at timestamptz NOT NULL);
      INSERT INTO app.events SELECT now() - interval '1 year' FROM generate_series(1, 10);`)
    const config = await writeConfig({ name: 'iv', policies: [{ ...policy, olderThan: '30' }] })
    const node = startNode(db.url, config, 'iv-node')
    const { code } = await node.exited
    expect(code).toBe(1)
    expect(node.output()).toMatch(
      /policy "p", field olderThan: "30" is refused: a bare number has no unit \(PostgreSQL would read "30" as seconds\).*\[INVALID_OPTION\]/,
    )
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM app.events')
    expect(rows[0].n).toBe(10)
  })
})

const UNITS = ['second', 'minute', 'hour', 'day', 'week', 'month', 'year']
const whole = fc.integer({ min: 1, max: 500 }).map(String)
const decimal = fc
  .tuple(fc.integer({ min: 0, max: 99 }), fc.integer({ min: 1, max: 999_999 }))
  .map(([w, f]) => `${w}.${String(f).padStart(6, '0')}`)
const term = fc
  .tuple(fc.constantFrom(...UNITS), fc.boolean(), fc.constantFrom(' ', '  ', '\t'))
  .chain(([unit, plural, gap]) =>
    (unit === 'month' || unit === 'year' ? whole : fc.oneof(whole, decimal)).map(
      (n) => `${n}${gap}${unit}${plural ? 's' : ''}`,
    ),
  )
const wellFormed = fc
  .uniqueArray(term, {
    minLength: 1,
    maxLength: 4,
    selector: (t) => t.replace(/s$/, '').split(/\s+/)[1],
  })
  .map((terms) => terms.join(' '))

describe('intervals: properties, checked against PostgreSQL', () => {
  it('whatever the input, the parser never throws, and what it accepts fits the grammar', () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.string(), wellFormed, fc.constantFrom('1 day', '-1 day', '1:30')),
        (value) => {
          const parsed = parseInterval(value)
          if (parsed.ok) {
            expect(parsed.canonical).toMatch(
              /^\d+(\.\d+)? (second|minute|hour|day|week|month|year)s?( \d+(\.\d+)? (second|minute|hour|day|week|month|year)s?)*$/,
            )
            expect(parseInterval(parsed.canonical)).toEqual(parsed)
          }
        },
      ),
      { numRuns: 2000 },
    )
  })

  it('an accepted interval means to PostgreSQL exactly what the text says, and is positive', async () => {
    await fc.assert(
      fc.asyncProperty(wellFormed, async (value) => {
        const parsed = parseInterval(value)
        expect(parsed.ok).toBe(true)
        if (!parsed.ok) return
        // PostgreSQL reads the user's text and our canonical form the same way, and both
        // are the sum of the terms built from numbers, not from text.
        const sum = parsed.terms
          .map((t) => `${Number(t.amount)} * interval '1 ${t.unit}'`)
          .join(' + ')
        const { rows } = await db.pool.query(
          `SELECT $1::interval = $2::interval AS same, $2::interval > interval '0' AS positive,
                  $2::interval = (${sum}) AS summed`,
          [value, parsed.canonical],
        )
        expect(rows[0]).toEqual({ same: true, positive: true, summed: true })
      }),
      { numRuns: 200 },
    )
  })

  it('what PostgreSQL reads as seconds, minutes or a negative span is never accepted', async () => {
    const suspicious = fc.oneof(
      fc.integer({ min: -1000, max: 1000 }).map(String),
      fc
        .tuple(fc.integer({ min: 0, max: 99 }), fc.integer({ min: 0, max: 59 }))
        .map(([h, m]) => `${h}:${m}`),
      fc
        .tuple(
          fc.integer({ min: 1, max: 99 }),
          fc.constantFrom('m', 'M', 'min', 's', 'h', 'd', 'y', 'mon'),
          fc.constantFrom('', ' '),
        )
        .map(([n, u, g]) => `${n}${g}${u}`),
      fc
        .tuple(term, fc.integer({ min: 1, max: 400 }), fc.constantFrom(...UNITS))
        .map(([t, n, u]) => `${t} -${n} ${u}`),
    )
    fc.assert(
      fc.property(suspicious, (value) => {
        expect(parseInterval(value).ok).toBe(false)
      }),
      { numRuns: 1000 },
    )
  })
})
