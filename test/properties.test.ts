import fc from 'fast-check'
import pg from 'pg'
import { afterAll, describe, expect, it } from 'vitest'
import { quoteIdent } from '../src/config/identifier.js'
import { parseInterval } from '../src/config/interval.js'
import { resolveOptions } from '../src/config/options.js'
import { validatePolicies } from '../src/config/validate-policies.js'
import { useTestDatabase } from './support/database.js'
import { Holder, issueNow, workRun } from './support/run-harness.js'

const db = useTestDatabase({
  setup: ({ pool }) => pool.query('CREATE SCHEMA props').then(() => {}),
})

/** Every SQL text this process sends while `recording` is on. */
const sent: string[] = []
let recording = false
const originalQuery = pg.Client.prototype.query
pg.Client.prototype.query = function (this: pg.Client, ...args: unknown[]) {
  if (recording) {
    const first = args[0] as string | { text?: string }
    sent.push(typeof first === 'string' ? first : (first?.text ?? ''))
  }
  return (originalQuery as (...a: unknown[]) => unknown).apply(this, args)
} as typeof pg.Client.prototype.query
afterAll(() => {
  pg.Client.prototype.query = originalQuery
})

let seq = 0
const HOSTILE = [
  '"; DROP TABLE props.victim; --',
  'a"b',
  "O'Brien",
  '\\',
  '$1',
  '%I %s %L',
  "' OR 1=1 --",
  ')); DELETE FROM props.victim; --',
  'tab\there',
  '名前 テーブル',
  '-- comment',
  '/* x */',
  '$$',
  '$fn$',
  'UPPER lower',
  ' ',
]
/** A hostile name, made unique (and impossible to meet by chance in our own SQL) by its tail. */
const hostileName = fc
  .tuple(fc.constantFrom(...HOSTILE), fc.string({ maxLength: 8 }))
  .map(([fragment, tail]) => `${fragment}${tail.replace(/\0/g, '')}☃${++seq}`)
  .filter((name) => Buffer.byteLength(name) <= 63)

describe('properties of the config loader and the cleanup', () => {
  it('hostile table, column and zone names never reach SQL as text, and are cleaned all the same', async () => {
    await db.pool.query('CREATE TABLE props.victim (x int); INSERT INTO props.victim VALUES (1)')
    await fc.assert(
      fc.asyncProperty(
        hostileName,
        hostileName,
        fc.constantFrom('UTC', 'Europe/Berlin', "UTC'; DROP TABLE props.victim; --", 'Mars/Base'),
        async (table, column, zone) => {
          const t = `props.${quoteIdent(table)}`
          await db.pool.query(
            `CREATE TABLE ${t} (${quoteIdent(column)} timestamp NOT NULL);
             INSERT INTO ${t} SELECT (now() AT TIME ZONE 'UTC') - g * interval '1 hour' FROM generate_series(0, 5) g;`,
          )
          const policyName = `p${seq}`
          sent.length = 0
          recording = true
          let refused: Error | undefined
          let deleted = 0
          const holder = new Holder(db.url, `props-${seq}`, `node-${seq}`)
          try {
            const options = resolveOptions({
              name: `props-${seq}`,
              connectionString: db.url,
              policies: [
                {
                  name: policyName,
                  table: `props.${table}`,
                  column,
                  timeZone: zone,
                  olderThan: '150 minutes',
                  every: '1 minute',
                  batchSize: 2,
                },
              ],
            })
            const { definitions } = await validatePolicies(db.pool, options.policies)
            const [definition] = definitions
            if (!definition) throw new Error('no definition')
            await holder.join(definitions)
            await holder.hold()
            const [run] = await issueNow(db.pool, holder, definition)
            const worked = await workRun(db.pool, run?.runId ?? '', holder.nodeId)
            deleted = worked.batches.reduce((sum, b) => sum + b.deleted, 0)
          } catch (error) {
            refused = error as Error
          } finally {
            recording = false
            await holder.close().catch(() => {})
          }
          for (const text of sent) {
            expect(text.includes(table), `the table name reached SQL text: ${text}`).toBe(false)
            expect(text.includes(column), `the column name reached SQL text: ${text}`).toBe(false)
            expect(
              text.includes(zone) && zone !== 'UTC',
              `the zone reached SQL text: ${text}`,
            ).toBe(false)
          }
          if (zone === 'UTC' || zone === 'Europe/Berlin') {
            expect(refused).toBeUndefined()
            // Rows 3, 4 and 5 hours old (in UTC wall time): what Europe/Berlin reads as 1 or 2
            // hours older than that is older still, so it takes at least as many.
            if (zone === 'UTC') expect(deleted).toBe(3)
            else expect(deleted).toBeGreaterThanOrEqual(3)
          } else {
            expect(refused?.message).toMatch(/timeZone/)
            const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM ${t}`)
            expect(rows[0].n).toBe(6)
          }
          await db.pool.query(`DROP TABLE ${t}`)
        },
      ),
      { numRuns: 25 },
    )
    const { rows } = await db.pool.query('SELECT count(*)::int AS n FROM props.victim')
    expect(rows[0].n).toBe(1)
  })

  it('every accepted policy deletes only rows older than its cut-off in its zone, checked against a table of known ages', async () => {
    const zones = [
      'UTC',
      'America/New_York',
      'Europe/Berlin',
      'Europe/Dublin',
      'Australia/Lord_Howe',
      'Asia/Kathmandu',
      'America/St_Johns',
      'Pacific/Chatham',
      'Pacific/Kiritimati',
      'Pacific/Pago_Pago',
      'America/Santiago',
    ]
    const olderThan = fc
      .tuple(
        fc.constantFrom('minute', 'hour', 'day', 'week', 'month', 'year'),
        fc.integer({ min: 1, max: 40 }),
        fc.option(
          fc.tuple(fc.constantFrom('hour', 'minute', 'second'), fc.integer({ min: 1, max: 59 })),
        ),
      )
      .map(([unit, n, extra]) => {
        const amount = unit === 'year' ? Math.min(n, 2) : unit === 'month' ? Math.min(n, 14) : n
        const head = `${amount} ${unit}${amount === 1 ? '' : 's'}`
        return extra && extra[0] !== unit ? `${head} ${extra[1]} ${extra[0]}s` : head
      })
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...zones),
        fc.constantFrom(...zones),
        fc.constantFrom('timestamptz', 'timestamp', 'date'),
        olderThan,
        // With an index on the column (and no statistics yet, so no estimate of the share)
        // a run walks the index; without, the pages.
        fc.boolean(),
        async (zone, sessionZone, type, interval, indexed) => {
          const n = ++seq
          const table = `props.ages_${n}`
          // Instants around the cut-off, around the zone's clock changes, and spread out.
          await db.pool.query(
            `CREATE TABLE ${table} (id serial PRIMARY KEY, v ${type} NOT NULL, true_at timestamptz NOT NULL, day_end timestamptz)`,
          )
          if (indexed) await db.pool.query(`CREATE INDEX ON ${table} (v)`)
          await db.pool.query(
            `WITH cut AS (SELECT ((now() AT TIME ZONE 'UTC') - $2::interval) AT TIME ZONE 'UTC' AS c),
             changes AS (
               SELECT t FROM generate_series(date_trunc('hour', now()) - interval '3 years', now(), interval '1 hour') AS t
                WHERE (t AT TIME ZONE $1) - ((t - interval '1 hour') AT TIME ZONE $1) <> interval '1 hour'
             ),
             instants AS (
               SELECT c + s * interval '1 minute' AS t FROM cut, generate_series(-150, 150, 7) AS s
               UNION ALL SELECT c + s * interval '1 day' FROM cut, generate_series(-3, 3) AS s
               UNION ALL SELECT t + s * interval '10 minutes' FROM changes, generate_series(-9, 9) AS s
               UNION ALL SELECT now() - random() * interval '1000 days' FROM generate_series(1, 40)
             )
             INSERT INTO ${table} (v, true_at)
             SELECT CASE $3 WHEN 'timestamptz' THEN t::text WHEN 'timestamp' THEN (t AT TIME ZONE $1)::text
                           ELSE (t AT TIME ZONE $1)::date::text END::${type}, t
               FROM instants`,
            [zone, interval, type],
          )
          if (type === 'date') {
            // The first instant whose local date, in the zone, is past the row's: scanned
            // minute by minute from instant to wall time, the direction that is never
            // ambiguous (clock changes fall on whole minutes).
            await db.pool.query(
              `UPDATE ${table} SET day_end = (
                 SELECT min(m) FROM generate_series(date_trunc('minute', true_at), true_at + interval '50 hours', interval '1 minute') AS m
                  WHERE (m AT TIME ZONE $1)::date > v)`,
              [zone],
            )
          }
          const { rows: before } = await db.pool.query<{
            id: number
            at: string
            end: string | null
            text: string
          }>(
            `SELECT id, (extract(epoch FROM true_at) * 1000000)::bigint::text AS at,
                    (extract(epoch FROM day_end) * 1000000)::bigint::text AS end, v::text || ' @ ' || true_at::text AS text
               FROM ${table}`,
          )
          const session = new pg.Pool({
            connectionString: db.url,
            max: 2,
            options: `-c TimeZone=${sessionZone}`,
          })
          const holder = new Holder(db.url, `ages-${n}`, `node-${n}`)
          try {
            const options = resolveOptions({
              name: `ages-${n}`,
              connectionString: db.url,
              policies: [
                {
                  name: 'ages',
                  table,
                  column: 'v',
                  timeZone: zone,
                  olderThan: interval,
                  every: '1 minute',
                  batchSize: 37,
                },
              ],
            })
            const { definitions } = await validatePolicies(session, options.policies)
            const [definition] = definitions
            if (!definition) throw new Error('no definition')
            await holder.join(definitions)
            await holder.hold()
            const [run] = await issueNow(session, holder, definition)
            const worked = await workRun(session, run?.runId ?? '', holder.nodeId)
            expect(worked.status).toBe('done')

            // The cut-offs the batches used, checked against UTC calendar arithmetic done here.
            const { rows: batches } = await db.pool.query<{ began: string; cutoff: string }>(
              `SELECT (extract(epoch FROM b.began_at) * 1000000)::bigint::text AS began,
                      (extract(epoch FROM b.cutoff) * 1000000)::bigint::text AS cutoff
                 FROM pgsingleton.cleanup_batches b WHERE b.run_id = $1`,
              [run?.runId],
            )
            const { rows: sizes } = await db.pool.query<{ most: number }>(
              `SELECT max(b.rows_deleted + b.rows_skipped)::int AS most FROM pgsingleton.cleanup_batches b WHERE b.run_id = $1`,
              [run?.runId],
            )
            expect(sizes[0]?.most).toBeLessThanOrEqual(37)
            const parts = await intervalParts(interval)
            for (const b of batches) expect(BigInt(b.cutoff)).toBe(utcMinus(BigInt(b.began), parts))
            const bounds = batches.map((b) => BigInt(b.cutoff))
            expect(bounds.length).toBeGreaterThan(0)
            // BigInt has no Math.min/max: sort.
            const sorted = [...bounds].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
            const earliest = sorted[0] ?? 0n
            const latest = sorted[sorted.length - 1] ?? 0n

            const { rows: kept } = await db.pool.query<{ id: number }>(`SELECT id FROM ${table}`)
            const keptIds = new Set(kept.map((k) => k.id))
            for (const row of before) {
              const gone = !keptIds.has(row.id)
              const at = BigInt(row.at)
              // A date stands for its whole day in the zone; anything else for its instant.
              const end = type === 'date' ? BigInt(row.end ?? '0') : at + 1n
              if (gone) {
                // Safety: nothing goes that was not wholly older than the cut-off of its time.
                expect(
                  end <= latest,
                  `row ${row.id} (${row.text}) went, but it ends after the cut-off`,
                ).toBe(true)
              } else if (type === 'timestamptz') {
                expect(
                  end > earliest,
                  `row ${row.id} (${row.text}) was older than the cut-off and stayed`,
                ).toBe(true)
              } else {
                // Wall times in the hour a clock goes back are read as the later instant:
                // such a row may stay up to the size of the change past the cut-off.
                expect(
                  end > earliest - HOUR,
                  `row ${row.id} (${row.text}) was well older than the cut-off and stayed`,
                ).toBe(true)
              }
            }
          } finally {
            await holder.close().catch(() => {})
            await session.end()
          }
        },
      ),
      { numRuns: 30 },
    )
  })
})

const HOUR = 3_600_000_000n

interface IntervalParts {
  months: number
  days: number
  micros: bigint
}

/** PostgreSQL's own months, days and time of the interval (parsing is tested elsewhere). */
async function intervalParts(text: string): Promise<IntervalParts> {
  const parsed = parseInterval(text)
  if (!parsed.ok) throw new Error(parsed.reason)
  const { rows } = await db.pool.query(
    `SELECT (extract(year FROM i) * 12 + extract(month FROM i))::int AS months,
            extract(day FROM i)::int AS days,
            (extract(epoch FROM i - make_interval(months => (extract(year FROM i) * 12 + extract(month FROM i))::int,
                                                  days => extract(day FROM i)::int)) * 1000000)::bigint::text AS micros
       FROM (SELECT $1::interval AS i) s`,
    [parsed.canonical],
  )
  return { months: rows[0].months, days: rows[0].days, micros: BigInt(rows[0].micros) }
}

/**
 * `instant - interval` on the UTC calendar, as the cut-off is defined: months first (the
 * day of the month clamped to the month's last), then days, then time.
 */
function utcMinus(instantMicros: bigint, parts: IntervalParts): bigint {
  const ms = Number(instantMicros / 1000n)
  const subMs = instantMicros - BigInt(ms) * 1000n
  const date = new Date(ms)
  const y = date.getUTCFullYear()
  const m = date.getUTCMonth() - parts.months
  const targetYear = y + Math.floor(m / 12)
  const targetMonth = ((m % 12) + 12) % 12
  const lastDay = new Date(Date.UTC(targetYear, targetMonth + 1, 0)).getUTCDate()
  const day = Math.min(date.getUTCDate(), lastDay)
  const shifted = Date.UTC(
    targetYear,
    targetMonth,
    day - parts.days,
    date.getUTCHours(),
    date.getUTCMinutes(),
    date.getUTCSeconds(),
    date.getUTCMilliseconds(),
  )
  return BigInt(shifted) * 1000n + subMs - parts.micros
}
