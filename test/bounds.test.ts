import fc from 'fast-check'
import { describe, expect, it } from 'vitest'
import { BOUND_6, BOUND_7, UP as REVISION_7 } from '../migrations/0007_plain_bounds.js'
import { useTestDatabase } from './support/database.js'

const db = useTestDatabase({
  setup: async ({ pool }) => {
    await pool.query('CREATE SCHEMA bounds')
    // Both revisions' bound queries, run as cleanup_batch runs them (format, then EXECUTE
    // with the cut-off, the cursor and the limit), with revision 6's rows at the bound
    // turned into the rows passed, as its batch did.
    await pool.query(`CREATE FUNCTION bounds.both(q6 text, q7 text, col text, leaf text, pred text,
        after_cursor text, cutoff timestamptz, pos jsonb, lim integer,
        OUT ahead6 integer, OUT bound6 jsonb, OUT one6 boolean, OUT passed6 integer,
        OUT ahead7 integer, OUT bound7 jsonb, OUT one7 boolean, OUT passed7 integer)
      LANGUAGE plpgsql AS $$
      DECLARE at_bound integer;
      BEGIN
        EXECUTE format(q6, col, leaf, pred, after_cursor) INTO ahead6, bound6, one6, at_bound USING cutoff, pos, lim;
        passed6 := CASE WHEN ahead6 <= lim THEN ahead6 ELSE ahead6 - at_bound END;
        EXECUTE format(q7, col, leaf, pred, after_cursor) INTO ahead7, bound7, one7, passed7 USING cutoff, pos, lim;
      END $$`)
  },
})

/** The query text of a bound snippet: the format string in its EXECUTE format('...', ...). */
const queryOf = (snippet: string) => {
  const text = snippet.split("'")[1]
  if (!text || snippet.split("'").length !== 3) throw new Error('a bound snippet has one literal')
  return text
}

const TYPES = {
  timestamptz: { type: 'timestamp with time zone', cast: 'timestamptz' },
  timestamp: { type: 'timestamp without time zone', cast: 'timestamp' },
  date: { type: 'date', cast: 'date' },
} as const

describe("schema step 7's bound query", () => {
  it('the bound query this test runs is the one step 7 installs', () => {
    // (The bound snippets are what the test runs; the function must hold them as they are.)
    expect(REVISION_7).toContain(BOUND_7.trim())
    expect(REVISION_7).not.toContain(BOUND_6.trim())
  })

  it("gives revision 6's numbers on any table, cursor and limit: rows ahead, the bound, one value, rows passed", async () => {
    let table = 0
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...(Object.keys(TYPES) as (keyof typeof TYPES)[])),
        // Values as days from a base: few distinct ones, so ties are common; some NULLs and
        // infinities.
        fc.array(
          fc.oneof(
            { weight: 8, arbitrary: fc.integer({ min: 0, max: 12 }) },
            { weight: 1, arbitrary: fc.constantFrom(null, '-infinity', 'infinity') },
          ),
          { maxLength: 60 },
        ),
        fc.integer({ min: 0, max: 13 }),
        fc.oneof(
          fc.constant(null),
          fc.record({
            day: fc.integer({ min: 0, max: 12 }),
            tid: fc.constantFrom('(0,0)', '(0,5)'),
          }),
        ),
        fc.integer({ min: 1, max: 12 }),
        fc.constantFrom('UTC', 'America/New_York', 'Pacific/Chatham'),
        async (kind, values, cutDay, cursor, lim, zone) => {
          const { type, cast } = TYPES[kind]
          const name = `bounds.t${++table}`
          await db.pool.query(`CREATE TABLE ${name} (id serial, v ${cast})`)
          await db.pool.query(`CREATE INDEX ON ${name} (v)`)
          const literal = (value: (typeof values)[number]) =>
            value === null
              ? 'NULL'
              : typeof value === 'string'
                ? `'${value}'::${cast}`
                : `('2026-03-01 01:30'::timestamp + ${value} * interval '1 day' + ${value % 3} * interval '7 hours')::${cast}`
          if (values.length > 0)
            await db.pool.query(
              `INSERT INTO ${name} (v) VALUES ${values.map((v) => `(${literal(v)})`).join(', ')}`,
            )
          const client = await db.pool.connect()
          try {
            await client.query('BEGIN')
            // As resolve_leaf sets it: timestamp and date values are read in the policy's zone.
            await client.query(`SELECT set_config('TimeZone', $1, true)`, [zone])
            const { rows: pre } = await client.query<{ pred: string; cutoff: Date; pos: unknown }>(
              `SELECT pgsingleton.outdated_predicate('v', $1) AS pred,
                      ('2026-03-01 00:00'::timestamp + $2 * interval '1 day')::timestamptz AS cutoff,
                      CASE WHEN $3::int IS NULL THEN NULL
                           ELSE jsonb_build_array(to_jsonb(('2026-03-01 01:30'::timestamp + $3 * interval '1 day')::${cast}), $4::text) END AS pos`,
              [type, cutDay, cursor?.day ?? null, cursor?.tid ?? null],
            )
            const { pred, cutoff, pos } = pre[0] as { pred: string; cutoff: Date; pos: unknown }
            // As cleanup_batch (revision 6 and 7) builds it.
            const after =
              pos === null
                ? ''
                : cursor?.tid === '(0,0)'
                  ? `AND "v" >= ($2->>0)::${cast}`
                  : `AND "v" >= ($2->>0)::${cast} AND ("v", ctid) > (($2->>0)::${cast}, ($2->>1)::tid)`
            const { rows } = await client.query(
              'SELECT * FROM bounds.both($1, $2, $3, $4, $5, $6, $7, $8, $9)',
              [
                queryOf(BOUND_6),
                queryOf(BOUND_7),
                'v',
                name,
                pred,
                after,
                cutoff,
                pos === null ? null : JSON.stringify(pos),
                lim,
              ],
            )
            const r = rows[0]
            const six = { ahead: r.ahead6, bound: r.bound6, one: r.one6, passed: r.passed6 }
            const seven = { ahead: r.ahead7, bound: r.bound7, one: r.one7, passed: r.passed7 }
            // Where no row is ahead, revision 6's batch returned before reading the rest.
            if (six.ahead === 0) expect(seven.ahead).toBe(0)
            else expect(seven).toEqual(six)
          } finally {
            await client.query('ROLLBACK')
            client.release()
            await db.pool.query(`DROP TABLE ${name}`)
          }
        },
      ),
      { numRuns: 300 },
    )
  })
})
