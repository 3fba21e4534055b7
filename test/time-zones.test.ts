import { once } from 'node:events'
import pg from 'pg'
import { describe, expect, it } from 'vitest'
import {
  columnZoneWarning,
  cronZoneWarning,
  zoneRulesDiffer,
} from '../src/config/validate-policies.js'
import { createSingleton, type RetentionPolicy, type RunReport } from '../src/index.js'
import {
  createTestDatabase,
  type TestDatabase,
  useTestDatabase,
  waitFor,
} from './support/database.js'
import { failOnNodesLeftRunning, startNode, writeConfig } from './support/nodes.js'

// Each case runs in a database whose own TimeZone is east or west of UTC, so every
// session a node opens (its pool, its workers) reads times in that zone unless told not to.
// The two zones are 25 hours apart, so a date read in the wrong one is always off by at
// least a day, whatever the time of day the test runs at.
const EAST = 'Pacific/Kiritimati' // UTC+14
const WEST = 'Pacific/Pago_Pago' // UTC-11
const east = useTestDatabase({ setup: (db) => prepare(db, EAST) })
const west = useTestDatabase({ setup: (db) => prepare(db, WEST) })
failOnNodesLeftRunning()

async function prepare(db: TestDatabase, zone: string): Promise<void> {
  const name = new URL(db.url).pathname.slice(1)
  await db.pool.query(`ALTER DATABASE ${name} SET TimeZone = '${zone}'`)
  await db.pool.end()
  db.pool = new pg.Pool({ connectionString: db.url, max: 4 })
  await db.pool.query(`CREATE SCHEMA app;
    CREATE TABLE app.utc_wall (id serial PRIMARY KEY, label text, at timestamp NOT NULL);
    CREATE INDEX ON app.utc_wall (at);
    CREATE TABLE app.tokyo_wall (id serial PRIMARY KEY, label text, at timestamp NOT NULL);
    CREATE TABLE app.days (id serial PRIMARY KEY, label text, on_day date NOT NULL, zone text NOT NULL);
    CREATE INDEX ON app.days (on_day);
    CREATE TABLE app.instants (id serial PRIMARY KEY, label text, at timestamptz NOT NULL);`)
}

let seq = 0
async function cleanOnce(db: TestDatabase, policy: RetentionPolicy): Promise<RunReport> {
  const node = createSingleton({
    name: `tz-${++seq}`,
    connectionString: db.url,
    policies: [policy],
  })
  const done = once(node, 'cleanup:done') as Promise<[RunReport]>
  await node.start()
  const [report] = await done
  await node.stop()
  return report
}

async function labels(db: TestDatabase, table: string): Promise<string[]> {
  const { rows } = await db.pool.query<{ label: string }>(
    `SELECT label FROM ${table} ORDER BY label`,
  )
  return rows.map((r) => r.label)
}

/** UTC wall times, as Rails and many ORMs write `timestamp` columns. */
async function seedUtcWall(db: TestDatabase): Promise<void> {
  await db.pool.query(`TRUNCATE app.utc_wall;
    INSERT INTO app.utc_wall (label, at) VALUES
      ('a: 1 minute old',   (now() AT TIME ZONE 'UTC') - interval '1 minute'),
      ('b: 59 minutes old', (now() AT TIME ZONE 'UTC') - interval '59 minutes'),
      ('c: 61 minutes old', (now() AT TIME ZONE 'UTC') - interval '61 minutes'),
      ('d: 3 hours old',    (now() AT TIME ZONE 'UTC') - interval '3 hours'),
      ('e: from the future', (now() AT TIME ZONE 'UTC') + interval '1 hour');`)
}

const utcPolicy: RetentionPolicy = {
  name: 'utc-wall',
  table: 'app.utc_wall',
  column: 'at',
  timeZone: 'UTC',
  olderThan: '1 hour',
  every: '1 hour',
}

describe('"outdated" is judged in the policy\'s zone, never the session\'s', () => {
  it('east of UTC: UTC wall times in a database set to UTC+14 lose only rows over an hour old', async () => {
    await seedUtcWall(east)
    // The trap is real here: read in the session's zone, every row looks 14 hours older,
    // and a naive cut-off would take the 1-minute-old row.
    const { rows } = await east.pool.query(
      `SELECT count(*)::int AS n FROM app.utc_wall WHERE at < now() - interval '1 hour'`,
    )
    expect(rows[0].n).toBe(5)

    const report = await cleanOnce(east, utcPolicy)
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 2, rowsSkipped: 0 })
    expect(await labels(east, 'app.utc_wall')).toEqual([
      'a: 1 minute old',
      'b: 59 minutes old',
      'e: from the future',
    ])
  })

  it('west of UTC: the same rows in a database set to UTC-11 are all judged right too', async () => {
    await seedUtcWall(west)
    // Here the trap goes the other way: read in the session's zone nothing looks old.
    const { rows } = await west.pool.query(
      `SELECT count(*)::int AS n FROM app.utc_wall WHERE at < now() - interval '1 hour'`,
    )
    expect(rows[0].n).toBe(0)

    expect(await cleanOnce(west, utcPolicy)).toMatchObject({ status: 'done', rowsDeleted: 2 })
    expect(await labels(west, 'app.utc_wall')).toEqual([
      'a: 1 minute old',
      'b: 59 minutes old',
      'e: from the future',
    ])
  })

  it('local wall times in another zone than the database are read in the zone the policy names', async () => {
    await west.pool.query(`TRUNCATE app.tokyo_wall;
      INSERT INTO app.tokyo_wall (label, at) VALUES
        ('a: 30 minutes old', (now() AT TIME ZONE 'Asia/Tokyo') - interval '30 minutes'),
        ('b: 2 hours old',    (now() AT TIME ZONE 'Asia/Tokyo') - interval '2 hours');`)
    const report = await cleanOnce(west, {
      name: 'tokyo-wall',
      table: 'app.tokyo_wall',
      column: 'at',
      timeZone: 'asia/tokyo', // the catalog's spelling is looked up: Asia/Tokyo
      olderThan: '1 hour',
      every: '1 hour',
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 1 })
    expect(await labels(west, 'app.tokyo_wall')).toEqual(['a: 30 minutes old'])
  })

  it.each([
    [EAST, east],
    [WEST, west],
    [WEST, east],
    [EAST, west],
  ])('a date in %s goes only once its whole day is older than the cut-off', async (zone, db) => {
    await db.pool.query('TRUNCATE app.days')
    await db.pool.query(
      `INSERT INTO app.days (label, on_day, zone)
       SELECT 'today-' || d, (now() AT TIME ZONE $1)::date - d, $1 FROM generate_series(0, 3) AS d`,
      [zone],
    )
    // With olderThan 1 day: yesterday (in the zone) ended less than a day ago and stays;
    // the day before ended more than a day ago and goes. Neither zone has daylight saving.
    await cleanOnce(db, {
      name: 'days',
      table: 'app.days',
      column: 'on_day',
      timeZone: zone,
      olderThan: '1 day',
      every: '1 hour',
    })
    expect(await labels(db, 'app.days')).toEqual(['today-0', 'today-1'])
  })

  it('a batch cancelled by its statement_timeout and tried again smaller, then carefully, keeps the same cut-off: Tokyo wall times in a UTC+14 database lose only rows over an hour old', async () => {
    // Read in the database's zone (5 hours east of Tokyo), every young row here would look
    // over an hour old. The outdated ones carry a cascaded child each whose delete takes
    // 5 ms; laid out oldest first, the table is walked in page order, and the first batch,
    // the outdated rows of its first pages, is over a second of work: cancelled at 250 ms.
    // The last pages hold the rows either side of the cut-off, mixed.
    await east.pool.query(`CREATE TABLE app.tokyo_threads (id int PRIMARY KEY, label text NOT NULL, at timestamp NOT NULL);
      CREATE INDEX ON app.tokyo_threads (at);
      CREATE TABLE app.tokyo_posts (id bigserial PRIMARY KEY, thread int NOT NULL REFERENCES app.tokyo_threads ON DELETE CASCADE);
      CREATE INDEX ON app.tokyo_posts (thread);
      -- Counts every post delete, those rolled back too (a sequence is not rolled back).
      CREATE SEQUENCE app.post_deletes;
      CREATE FUNCTION app.slow_post() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM nextval('app.post_deletes'), pg_sleep(0.005); RETURN OLD; END $$;
      CREATE TRIGGER slow BEFORE DELETE ON app.tokyo_posts FOR EACH ROW EXECUTE FUNCTION app.slow_post();
      INSERT INTO app.tokyo_threads (id, label, at)
      SELECT g, label, (now() AT TIME ZONE 'Asia/Tokyo') - age FROM (
        SELECT g, CASE WHEN g <= 300 THEN 'old' WHEN g <= 330 THEN 'just outdated'
                       WHEN g <= 360 THEN 'just young' ELSE 'young' END AS label,
               CASE WHEN g <= 300 THEN interval '3 hours' - g * interval '1 second'
                    WHEN g <= 330 THEN interval '61 minutes'
                    WHEN g <= 360 THEN interval '59 minutes'
                    ELSE interval '30 minutes' END AS age
          FROM generate_series(1, 400) AS g ORDER BY g <= 300 DESC, CASE WHEN g <= 300 THEN g END, random()) x;
      INSERT INTO app.tokyo_posts (thread) SELECT id FROM app.tokyo_threads;
      ANALYZE app.tokyo_threads, app.tokyo_posts;`)
    const name = `tz-${++seq}`
    const node = createSingleton({
      name,
      connectionString: east.url,
      batchStatementTimeoutMs: 250,
      batchLockTimeoutMs: 50,
      policies: [
        {
          name: 'tokyo-threads',
          table: 'app.tokyo_threads',
          column: 'at',
          timeZone: 'Asia/Tokyo',
          olderThan: '1 hour',
          every: '1 hour',
          allowCascade: true,
        },
      ],
    })
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    const [report] = await done
    await node.stop()
    expect(report, report.reason).toMatchObject({
      status: 'done',
      rowsDeleted: 330,
      rowsSkipped: 0,
    })
    const { rows: left } = await east.pool.query<{ label: string; n: number }>(
      'SELECT label, count(*)::int AS n FROM app.tokyo_threads GROUP BY label ORDER BY label',
    )
    expect(left).toEqual([
      { label: 'just young', n: 30 },
      { label: 'young', n: 40 },
    ])
    const { rows: posts } = await east.pool.query<{ n: number }>(
      'SELECT count(*)::int AS n FROM app.tokyo_posts p JOIN app.tokyo_threads t ON t.id = p.thread',
    )
    expect(posts[0]?.n).toBe(70)
    // What committed came in more, smaller batches than the first try, rolled back whole.
    const { rows: batches } = await east.pool.query<{ n: number; biggest: number }>(
      `SELECT count(*)::int AS n, max(b.rows_deleted)::int AS biggest FROM pgsingleton.cleanup_batches b
         JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id WHERE r.singleton = $1`,
      [name],
    )
    expect(batches[0]?.n).toBeGreaterThan(1)
    expect(batches[0]?.biggest).toBeLessThan(330)
    // And some were tried and rolled back: more post deletes ran than the 330 that stayed.
    const { rows: tried } = await east.pool.query<{ n: string }>(
      'SELECT last_value AS n FROM app.post_deletes',
    )
    expect(
      Number(tried[0]?.n),
      'no batch was cancelled: the test no longer tries the retry',
    ).toBeGreaterThan(330)
  })

  it('timestamptz needs no zone, and one given is not used', async () => {
    await east.pool.query(`TRUNCATE app.instants;
      INSERT INTO app.instants (label, at) VALUES ('young', now() - interval '59 minutes'), ('old', now() - interval '61 minutes');`)
    const report = await cleanOnce(east, {
      name: 'instants',
      table: 'app.instants',
      column: 'at',
      timeZone: WEST,
      olderThan: '1 hour',
      every: '1 hour',
    })
    expect(report).toMatchObject({ rowsDeleted: 1 })
    expect(await labels(east, 'app.instants')).toEqual(['young'])
  })

  it('refuses a timestamp or date column without a zone, and a zone PostgreSQL does not know, before deleting anything', async () => {
    await seedUtcWall(east)
    const { timeZone: _none, ...withoutZone } = utcPolicy
    const node = createSingleton({
      name: 'tz-refused',
      connectionString: east.url,
      policies: [
        withoutZone,
        { ...utcPolicy, name: 'mars', timeZone: 'Mars/Olympus_Mons' },
        {
          name: 'days',
          table: 'app.days',
          column: 'on_day',
          olderThan: '1 day',
          every: '1 hour',
        },
      ],
    })
    const error = await node.start().then(
      () => undefined,
      (e: Error & { code: string }) => e,
    )
    expect(error?.code).toBe('INVALID_POLICY')
    // Every problem at once, each naming the policy, the field, why, and the fix.
    expect(error?.message).toMatch(/^3 problems in the configuration:/)
    expect(error?.message).toMatch(
      /policy "utc-wall", field timeZone: column "at" is a timestamp without time zone, which does not say which zone its values are in.*Add the zone the app writes them in, e\.g\. "timeZone": "UTC"/,
    )
    expect(error?.message).toMatch(/policy "days", field timeZone: column "on_day" is a date/)
    expect(error?.message).toMatch(
      /policy "mars", field timeZone: "Mars\/Olympus_Mons" is not a time zone PostgreSQL knows/,
    )
    expect(await labels(east, 'app.utc_wall')).toHaveLength(5)
  })

  it('each node logs every policy as it understood it: table, column, zone, interval as PostgreSQL normalised it, and the cut-off now', async () => {
    const config = await writeConfig({
      name: 'tz-logged',
      policies: [{ ...utcPolicy, olderThan: '1 day 12 hours', every: '90 minutes' }],
    })
    const node = startNode(east.url, config, 'tz-logger')
    const line = await waitFor('the policy line', async () =>
      node
        .output()
        .split('\n')
        .find((l) => l.includes('policy "utc-wall": delete rows')),
    )
    expect(line).toMatch(
      /policy "utc-wall": delete rows of "app"\."utc_wall" whose "at" \(timestamp without time zone, read in zone UTC\) is older than 1 day 12 hours \(PostgreSQL: '1 day 12:00:00'\); cut-off now \d{4}-\d\d-\d\dT[\d:.]+Z; every 90 minutes \('01:30:00'\)/,
    )
    const cutoff = new Date(/cut-off now (\S+);/.exec(line)?.[1] ?? '')
    const expected = Date.now() - 36 * 3600 * 1000
    expect(Math.abs(cutoff.getTime() - expected)).toBeLessThan(60_000)
    node.signal('SIGTERM')
    expect((await node.exited).code).toBe(0)
  })
})

describe('zone names are read from the zone database, never as abbreviations', () => {
  it('a database whose timezone_abbreviations make EST mean UTC+10 still reads EST as UTC-5', async () => {
    const db = await createTestDatabase()
    try {
      const name = new URL(db.url).pathname.slice(1)
      await db.pool.query(`ALTER DATABASE ${name} SET timezone_abbreviations = 'Australia'`)
      await db.pool.end()
      db.pool = new pg.Pool({ connectionString: db.url, max: 4 })
      // The trap: through AT TIME ZONE, 'EST' is now fifteen hours off.
      const { rows: trap } = await db.pool.query(
        `SELECT extract(hour FROM '2024-01-01 12:00'::timestamp AT TIME ZONE 'EST' AT TIME ZONE 'UTC')::int AS h`,
      )
      expect(trap[0].h).toBe(2)
      await db.pool.query(`CREATE SCHEMA app;
        CREATE TABLE app.est_wall (label text, at timestamp NOT NULL);
        INSERT INTO app.est_wall VALUES
          ('1 hour old',   (now() AT TIME ZONE 'America/Panama') - interval '1 hour'),
          ('10 hours old', (now() AT TIME ZONE 'America/Panama') - interval '10 hours'),
          ('20 hours old', (now() AT TIME ZONE 'America/Panama') - interval '20 hours');`)
      const report = await cleanOnce(db, {
        name: 'est',
        table: 'app.est_wall',
        column: 'at',
        timeZone: 'EST', // UTC-5 all year in the zone database, as America/Panama
        olderThan: '12 hours',
        every: '1 hour',
      })
      expect(report).toMatchObject({ status: 'done', rowsDeleted: 1 })
      expect(await labels(db, 'app.est_wall')).toEqual(['1 hour old', '10 hours old'])
    } finally {
      await db.drop()
    }
  })
})

describe('Etc/GMT zone names, whose sign is inverted', () => {
  it('warns, saying which side of UTC the zone is and how far off a row written in the zone the name seems to say would be judged', async () => {
    const warnings: string[] = []
    const node = createSingleton({
      name: `tz-${++seq}`,
      connectionString: west.url,
      policies: [{ ...utcPolicy, timeZone: 'Etc/GMT-3' }],
    })
    node.on('warning', (warning) => warnings.push(`${warning.code}: ${warning.message}`))
    await node.start()
    await node.stop()
    expect(warnings).toContainEqual(
      expect.stringMatching(
        /^LEGACY_ZONE_NAME: policy "utc-wall": timeZone "Etc\/GMT-3" is UTC\+3, 3 hours east of UTC: in the Etc\/GMT names the sign is inverted .* in a zone at UTC-3 would be judged 6 hours older than it is/,
      ),
    )
  })
})

describe('a database where the role itself has another TimeZone', () => {
  it('judges by the policy zone too (role settings reach every session of the node)', async () => {
    const db = await createTestDatabase()
    try {
      const role = `tz_role_${Math.random().toString(36).slice(2, 8)}`
      await db.pool.query(
        `CREATE ROLE ${role} LOGIN SUPERUSER PASSWORD 'x'; ALTER ROLE ${role} SET TimeZone = 'Australia/Lord_Howe'`,
      )
      try {
        await prepare(db, 'America/St_Johns')
        await seedUtcWall(db)
        const url = new URL(db.url)
        url.username = role
        url.password = 'x'
        const node = createSingleton({
          name: 'tz-role',
          connectionString: url.toString(),
          policies: [utcPolicy],
        })
        const done = once(node, 'cleanup:done') as Promise<[RunReport]>
        await node.start()
        expect((await done)[0]).toMatchObject({ rowsDeleted: 2 })
        await node.stop()
        expect(await labels(db, 'app.utc_wall')).toEqual([
          'a: 1 minute old',
          'b: 59 minutes old',
          'e: from the future',
        ])
      } finally {
        await db.pool.query(`DROP OWNED BY ${role}`).catch(() => {})
        const admin = new pg.Client({ connectionString: db.url })
        await admin.connect()
        await admin.query(`DROP ROLE IF EXISTS ${role}`).catch(() => {})
        await admin.end()
      }
    } finally {
      await db.drop()
    }
  })
})

describe("cron zones: this node's rules against the database's", () => {
  it('a cron zone whose rules this node reads otherwise than the database in the coming year gets a warning naming the zone, its users, the instant and both offsets', async () => {
    // Two zones that disagree stand in for one zone read by two rule sets: Europe/Berlin by
    // the database (UTC+1, UTC+2 in summer) against Africa/Lagos here (UTC+1 all year).
    // They agree in winter, and part at Berlin's next change to summer time.
    const { rows } = await west.pool.query<{ at: Date }>(
      `SELECT min(t) AS at FROM generate_series(date_trunc('hour', now()), date_trunc('hour', now()) + interval '400 days', interval '1 hour') AS t
        WHERE (t AT TIME ZONE 'Europe/Berlin') - (t AT TIME ZONE 'UTC') <> interval '1 hour'`,
    )
    const parting = rows[0]?.at as Date
    const differs = await zoneRulesDiffer(west.pool, 'Europe/Berlin', 'Africa/Lagos')
    expect(differs).toMatchObject({ at: parting, node: 60, database: 120 })
    const warning = await cronZoneWarning(
      west.pool,
      'Europe/Berlin',
      ['policy "nightly"', 'task "report"'],
      'Africa/Lagos',
    )
    expect(warning?.code).toBe('ZONE_RULES_DIFFER')
    expect(warning?.message).toContain(
      `policy "nightly", task "report": this node's rules for cron zone "Europe/Berlin"`,
    )
    expect(warning?.message).toContain(
      `disagree ${differs?.now ? 'now' : `at ${parting.toISOString()}`}: UTC+01:00 here, UTC+02:00 in PostgreSQL`,
    )
    // The same zone by the same rules on both sides: nothing to say.
    expect(await zoneRulesDiffer(west.pool, 'Europe/Berlin', 'Europe/Berlin')).toBeNull()
    expect(await cronZoneWarning(west.pool, 'UTC', ['policy "p"'])).toBeNull()
  })

  it('the zone of a timestamp column whose rules this node reads otherwise than the database gets a warning saying how much older rows it writes by its rules would look', async () => {
    // Over the past 400 days Berlin spent summers at UTC+2, Lagos never did.
    const warning = await columnZoneWarning(
      west.pool,
      'policy "visits"',
      'Europe/Berlin',
      '1 hour',
      'Africa/Lagos',
    )
    expect(warning?.code).toBe('ZONE_RULES_DIFFER')
    expect(warning?.message).toMatch(
      /^policy "visits", field timeZone: this node's rules for zone "Europe\/Berlin" .* disagree (now|at \S+): UTC\+01:00 here, UTC\+02:00 in PostgreSQL\. .*a row written then is judged 60 minutes older than it is \(olderThan is 1 hour\)/,
    )
    expect(await columnZoneWarning(west.pool, 'policy "p"', 'Europe/Berlin', '1 hour')).toBeNull()
  })

  it('a node whose cron and column zones the database reads as it does starts without a ZONE_RULES_DIFFER warning', async () => {
    const warnings: string[] = []
    const node = createSingleton({
      name: `tz-${++seq}`,
      connectionString: west.url,
      policies: [
        { ...utcPolicy, every: undefined, cron: '0 3 * * *', cronTimeZone: 'Europe/Berlin' },
      ],
    })
    node.on('warning', (warning) => warnings.push(warning.code))
    await node.start()
    await node.stop()
    expect(warnings).not.toContain('ZONE_RULES_DIFFER')
  })
})
