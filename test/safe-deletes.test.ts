import { once } from 'node:events'
import { describe, expect, it } from 'vitest'
import { chooseWalk } from '../src/cleanup/run-cleanup.js'
import type { PolicyDefinition } from '../src/config/definition.js'
import { resolvePolicies } from '../src/config/policy.js'
import { validatePolicies } from '../src/config/validate-policies.js'
import { createSingleton, type RetentionPolicy, type RunReport } from '../src/index.js'
import { readPolicyStatus } from '../src/status/read-policy-status.js'
import { sleep } from '../src/wait.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { openClient } from './support/run-harness.js'

const db = useTestDatabase({ setup: ({ pool }) => pool.query('CREATE SCHEMA app').then(() => {}) })

let seq = 0
async function cleanOnce(
  policy: RetentionPolicy,
  extra: object = {},
): Promise<{ report: RunReport; errors: Error[]; name: string }> {
  const name = `sd-${++seq}`
  const node = createSingleton({ name, connectionString: db.url, policies: [policy], ...extra })
  const errors: Error[] = []
  node.on('error', (error) => errors.push(error))
  const done = once(node, 'cleanup:done') as Promise<[RunReport]>
  await node.start()
  const [report] = await done
  await node.stop()
  return { report, errors, name }
}

async function batchesOf(singleton: string) {
  const { rows } = await db.pool.query<{ relation: string; rows_deleted: number; n: number }>(
    `SELECT b.relation, b.rows_deleted, b.rows_skipped FROM pgsingleton.cleanup_batches b
       JOIN pgsingleton.cleanup_runs r ON r.id = b.run_id
      WHERE r.singleton = $1 ORDER BY b.run_id, b.batch`,
    [singleton],
  )
  return rows
}

async function count(sql: string): Promise<number> {
  const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM ${sql}`)
  return rows[0].n
}

/**
 * Cleans `table` (outdated: `on_day` over 7 days old, batches of 100) while an app
 * transaction that ran `update` holds the rows it changed: once a batch waits for them,
 * the app commits. Returns the run's report and the outdated rows left.
 */
async function cleanWhileAppMoves(
  name: string,
  table: string,
  update: string,
): Promise<{ report: RunReport; left: number }> {
  const app = await openClient(db.url)
  try {
    await app.query('BEGIN')
    await app.query(update)
    const cleaning = cleanOnce(
      {
        name,
        table,
        column: 'on_day',
        timeZone: 'UTC',
        olderThan: '7 days',
        every: '1 hour',
        batchSize: 100,
      },
      { batchLockTimeoutMs: 30_000 },
    )
    await waitFor('a batch waiting for the rows the app changed', async () => {
      const { rows } = await db.pool.query(
        `SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%cleanup_batch%'`,
      )
      return rows[0].n > 0
    })
    await app.query('COMMIT')
    const { report } = await cleaning
    return { report, left: await count(`${table} WHERE on_day < current_date - 7`) }
  } finally {
    await app.end()
  }
}

describe('partitioned and inheritance tables: no batch deletes more than batchSize', () => {
  it('a range-partitioned table is cleaned partition by partition, each batch within batchSize', async () => {
    await db.pool.query(`CREATE TABLE app.metrics (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz NOT NULL, v int)
        PARTITION BY RANGE (at);
      CREATE TABLE app.metrics_old PARTITION OF app.metrics FOR VALUES FROM ('-infinity') TO (now() - interval '2 days');
      CREATE TABLE app.metrics_mid PARTITION OF app.metrics FOR VALUES FROM (now() - interval '2 days') TO (now() - interval '12 hours');
      CREATE TABLE app.metrics_new PARTITION OF app.metrics DEFAULT;
      CREATE INDEX ON app.metrics (at);
      INSERT INTO app.metrics (at, v) SELECT now() - interval '3 days' - g * interval '1 second', g FROM generate_series(1, 700) g;
      INSERT INTO app.metrics (at, v) SELECT now() - interval '36 hours' + g * interval '1 second', g FROM generate_series(1, 700) g;
      INSERT INTO app.metrics (at, v) SELECT now() - interval '18 hours' - g * interval '1 second', g FROM generate_series(1, 300) g;
      INSERT INTO app.metrics (at, v) SELECT now() - interval '1 hour', g FROM generate_series(1, 300) g;`)
    // Every partition's first pages hold rows at the same ctids: a delete by ctid through
    // the parent would take the same slots in each of them.
    const { report, name } = await cleanOnce({
      name: 'metrics',
      table: 'app.metrics',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      batchSize: 100,
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 1400, rowsSkipped: 0 })
    const batches = await batchesOf(name)
    expect(Math.max(...batches.map((b) => b.rows_deleted))).toBeLessThanOrEqual(100)
    expect(new Set(batches.map((b) => b.relation))).toEqual(
      new Set(['app.metrics_old', 'app.metrics_mid']),
    )
    expect(batches.reduce((sum, b) => sum + b.rows_deleted, 0)).toBe(1400)
    expect(await count(`app.metrics WHERE at < now() - interval '1 day'`)).toBe(0)
    expect(await count('app.metrics')).toBe(600)
  })

  it('an inheritance parent with rows of its own and two children, one with more columns', async () => {
    await db.pool.query(`CREATE TABLE app.logs (at timestamp NOT NULL, line text);
      CREATE TABLE app.logs_web (status int) INHERITS (app.logs);
      CREATE TABLE app.logs_jobs () INHERITS (app.logs);
      CREATE INDEX ON app.logs (at);
      INSERT INTO app.logs (at, line) SELECT (now() AT TIME ZONE 'UTC') - interval '2 days', 'parent' FROM generate_series(1, 230);
      INSERT INTO app.logs_web (at, line, status) SELECT (now() AT TIME ZONE 'UTC') - interval '2 days', 'web', 200 FROM generate_series(1, 170);
      INSERT INTO app.logs_jobs (at, line) SELECT (now() AT TIME ZONE 'UTC') - interval '2 days', 'jobs' FROM generate_series(1, 90);
      INSERT INTO app.logs_jobs (at, line) SELECT (now() AT TIME ZONE 'UTC') - interval '1 hour', 'young' FROM generate_series(1, 40);`)
    const { report, name } = await cleanOnce({
      name: 'logs',
      table: 'app.logs',
      column: 'at',
      timeZone: 'UTC',
      olderThan: '1 day',
      every: '1 hour',
      batchSize: 50,
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 490 })
    const batches = await batchesOf(name)
    expect(Math.max(...batches.map((b) => b.rows_deleted))).toBeLessThanOrEqual(50)
    expect(new Set(batches.map((b) => b.relation))).toEqual(
      new Set(['app.logs', 'app.logs_web', 'app.logs_jobs']),
    )
    expect(await count('app.logs')).toBe(40)
    expect(await count(`app.logs WHERE line <> 'young'`)).toBe(0)
  })
})

describe('page-order batches stay within batchSize', () => {
  it('a table walked in page order, denser than its statistics say, is cleaned in batches of at most batchSize', async () => {
    // Tiny rows (about 200 a page), no index, no statistics: the first span guesses 32
    // pages, which would hold some 6,000 rows; the batch rolls that back and shrinks.
    await db.pool.query(`CREATE TABLE app.dense (at timestamptz NOT NULL) WITH (autovacuum_enabled = false);
      INSERT INTO app.dense SELECT now() - interval '2 days' FROM generate_series(1, 20000);
      INSERT INTO app.dense SELECT now() - interval '1 hour' FROM generate_series(1, 3000);
      INSERT INTO app.dense SELECT now() - interval '2 days' FROM generate_series(1, 5000);`)
    const { report, name } = await cleanOnce({
      name: 'dense',
      table: 'app.dense',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      batchSize: 1000,
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 25000, rowsSkipped: 0 })
    const batches = await batchesOf(name)
    expect(Math.max(...batches.map((b) => b.rows_deleted))).toBeLessThanOrEqual(1000)
    expect(await count('app.dense')).toBe(3000)
  })

  it('with a batchSize below the rows of one page, a page is deleted from row by row', async () => {
    await db.pool.query(`CREATE TABLE app.tiny (at timestamptz NOT NULL);
      INSERT INTO app.tiny SELECT now() - interval '2 days' FROM generate_series(1, 2000);
      INSERT INTO app.tiny SELECT now() FROM generate_series(1, 100);
      ANALYZE app.tiny;`)
    const { report, name } = await cleanOnce({
      name: 'tiny',
      table: 'app.tiny',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      batchSize: 50,
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 2000 })
    const batches = await batchesOf(name)
    expect(Math.max(...batches.map((b) => b.rows_deleted))).toBeLessThanOrEqual(50)
    expect(await count('app.tiny')).toBe(100)
  })
})

describe('what a delete may touch besides the outdated rows', () => {
  it('a partition being detached (DETACH ... CONCURRENTLY left half done) is not cleaned', async () => {
    await db.pool.query(`CREATE TABLE app.readings (at timestamptz NOT NULL) PARTITION BY RANGE (at);
      CREATE TABLE app.readings_old PARTITION OF app.readings FOR VALUES FROM ('-infinity') TO ('2020-01-01');
      CREATE TABLE app.readings_new PARTITION OF app.readings FOR VALUES FROM ('2020-01-01') TO ('infinity');
      INSERT INTO app.readings SELECT '2019-06-01'::timestamptz FROM generate_series(1, 30);
      INSERT INTO app.readings SELECT now() - interval '2 days' FROM generate_series(1, 20);`)
    // The detach waits for a transaction that uses the table, and gives up: the partition
    // stays "detach pending", already invisible through the parent.
    const app = await openClient(db.url)
    const detacher = await openClient(db.url)
    try {
      await app.query('BEGIN; SELECT count(*) FROM app.readings')
      await detacher.query(`SET statement_timeout = '500ms'`)
      await expect(
        detacher.query('ALTER TABLE app.readings DETACH PARTITION app.readings_old CONCURRENTLY'),
      ).rejects.toThrow(/statement timeout/)
      await app.query('COMMIT')
    } finally {
      await app.end()
      await detacher.end()
    }
    const { rows } = await db.pool.query(
      `SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = 'app.readings_old'::regclass`,
    )
    expect(rows).toEqual([{ inhdetachpending: true }])
    const { report } = await cleanOnce({
      name: 'readings',
      table: 'app.readings',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 20 })
    expect(await count('app.readings_old')).toBe(30)
  })

  it('refuses a table whose foreign keys would cascade to young rows, unless the policy allows it, and a table with DELETE rules', async () => {
    await db.pool.query(`CREATE TABLE app.messages (id int PRIMARY KEY, at timestamptz NOT NULL,
        reply_to int REFERENCES app.messages ON DELETE CASCADE);
      INSERT INTO app.messages VALUES (1, now() - interval '40 days', NULL), (2, now() - interval '1 hour', 1);
      CREATE TABLE app.ruled (at timestamptz NOT NULL);
      CREATE RULE keep_a_copy AS ON DELETE TO app.ruled DO ALSO NOTIFY ruled;`)
    const policy = {
      name: 'messages',
      table: 'app.messages',
      column: 'at',
      olderThan: '30 days',
      every: '1 hour',
    }
    const refused = createSingleton({
      name: 'cascade-refused',
      connectionString: db.url,
      policies: [policy, { ...policy, name: 'ruled', table: 'app.ruled' }],
    })
    const error = await refused.start().then(
      () => undefined,
      (e: Error & { code: string }) => e,
    )
    expect(error?.code).toBe('INVALID_POLICY')
    expect(error?.message).toMatch(
      /policy "messages", field table: deleting outdated rows of "app\.messages" would also delete or change the rows that reference them, however young: app\.messages \(messages_reply_to_fkey\) ON DELETE CASCADE\. Set "allowCascade": true/,
    )
    expect(error?.message).toMatch(
      /policy "ruled", field table: "app\.ruled" has DELETE rules \(keep_a_copy on app\.ruled\)/,
    )
    expect(await count('app.messages')).toBe(2)

    const { report } = await cleanOnce({ ...policy, allowCascade: true })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 1 })
    expect(await count('app.messages')).toBe(0) // the reply went with it, as allowed
  })

  it('a batch its statement_timeout cancels (rows deleted with it by ON DELETE CASCADE) is tried again smaller, and the run finishes', async () => {
    await db.pool.query(`CREATE TABLE app.threads (id int PRIMARY KEY, at timestamptz NOT NULL);
      CREATE INDEX ON app.threads (at);
      CREATE TABLE app.posts (id bigserial PRIMARY KEY, thread int NOT NULL REFERENCES app.threads ON DELETE CASCADE);
      CREATE INDEX ON app.posts (thread);
      -- Work each post's cascaded delete does: 5 ms.
      CREATE FUNCTION app.slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.005); RETURN OLD; END $$;
      CREATE TRIGGER slow BEFORE DELETE ON app.posts FOR EACH ROW EXECUTE FUNCTION app.slow();
      INSERT INTO app.threads SELECT g, now() - interval '40 days' FROM generate_series(1, 400) AS g;
      INSERT INTO app.threads SELECT g, now() FROM generate_series(401, 450) AS g;
      INSERT INTO app.posts (thread) SELECT t FROM generate_series(1, 450) AS t;
      ANALYZE app.threads, app.posts;`)
    // The first batch would take all 400 outdated threads, and their posts with them: over
    // 2 s of work, against a statement timeout of 250 ms.
    const { report, name } = await cleanOnce(
      {
        name: 'threads',
        table: 'app.threads',
        column: 'at',
        olderThan: '30 days',
        every: '1 hour',
        allowCascade: true,
      },
      { batchStatementTimeoutMs: 250, batchLockTimeoutMs: 50 },
    )
    expect(report, report.reason).toMatchObject({
      status: 'done',
      rowsDeleted: 400,
      rowsSkipped: 0,
    })
    expect(await count('app.threads')).toBe(50)
    expect(await count('app.posts')).toBe(50)
    expect(await count("app.threads WHERE at < now() - interval '30 days'")).toBe(0)
    // What committed came in smaller batches than the first try, which was rolled back.
    const batches = await batchesOf(name)
    expect(batches.length).toBeGreaterThan(1)
    expect(Math.max(...batches.map((b) => b.rows_deleted))).toBeLessThanOrEqual(62)
  })

  it('rows the delete leaves in place without an error (a trigger returning NULL) are counted, and the walk moves past them', async () => {
    await db.pool.query(`CREATE TABLE app.notes (id int PRIMARY KEY, on_day date NOT NULL, archived boolean NOT NULL DEFAULT false);
      CREATE INDEX ON app.notes (on_day);
      CREATE FUNCTION app.soft_delete() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF OLD.id <= 10 THEN UPDATE app.notes SET archived = true WHERE id = OLD.id; RETURN NULL; END IF;
        RETURN OLD;
      END $$;
      CREATE TRIGGER soft_delete BEFORE DELETE ON app.notes FOR EACH ROW EXECUTE FUNCTION app.soft_delete();
      INSERT INTO app.notes (id, on_day) SELECT g, current_date - 40 FROM generate_series(1, 20) AS g;`)
    // Twenty rows on one day, batches of five: the first two batches are all kept.
    const { report, name } = await cleanOnce({
      name: 'notes',
      table: 'app.notes',
      column: 'on_day',
      timeZone: 'UTC',
      olderThan: '30 days',
      every: '1 hour',
      batchSize: 5,
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 10, rowsSkipped: 10 })
    expect(report.reason).toMatch(/left in place by the delete itself/)
    expect((await batchesOf(name)).length).toBe(4)
    expect(await count('app.notes WHERE id > 10')).toBe(0)
  })
})

describe('the index walk', () => {
  it.each(['t', 'v', 'row_tid', 'row_value'])(
    'follows the values of a column named %s, also where more rows share one value than a batch takes',
    async (column) => {
      const table = `app.walk_${column}`
      // The index comes first: no statistics, so no estimate of the share, and the run
      // walks the index. Physical order is not value order: the oldest rows, all of one
      // value and more than a batch, come after younger outdated ones.
      await db.pool.query(`CREATE TABLE ${table} (id serial PRIMARY KEY, "${column}" timestamptz NOT NULL);
        CREATE INDEX ON ${table} ("${column}");
        INSERT INTO ${table} ("${column}") SELECT now() - interval '10 days' - g * interval '1 minute' FROM generate_series(1, 10) AS g;
        INSERT INTO ${table} ("${column}") SELECT now() - interval '30 days' FROM generate_series(1, 11);
        INSERT INTO ${table} ("${column}") SELECT now() - interval '5 days' - g * interval '1 minute' FROM generate_series(1, 9) AS g;
        INSERT INTO ${table} ("${column}") SELECT now() - g * interval '1 minute' FROM generate_series(1, 5) AS g;`)
      const { report, name } = await cleanOnce({
        name: 'walk',
        table,
        column,
        olderThan: '1 day',
        every: '1 hour',
        batchSize: 10,
      })
      expect(report).toMatchObject({ status: 'done', rowsDeleted: 30, rowsSkipped: 0 })
      expect(await count(table)).toBe(5)
      expect(Math.max(...(await batchesOf(name)).map((b) => b.rows_deleted))).toBeLessThanOrEqual(
        10,
      )
    },
  )
  it('reads about its own rows where far more rows than a batch share one value: a date column, a bulk insert’s now()', async () => {
    // One outdated row in twenty, all of one day: a small share, so the run walks the index.
    await db.pool.query(`CREATE TABLE app.daily (id serial PRIMARY KEY, on_day date NOT NULL, payload text);
      CREATE INDEX ON app.daily (on_day);
      INSERT INTO app.daily (on_day, payload)
        SELECT CASE WHEN g % 20 = 0 THEN current_date - 30 ELSE current_date END, md5(g::text)
          FROM generate_series(1, 100000) g;
      ANALYZE app.daily;`)
    const { report, name } = await cleanOnce({
      name: 'daily',
      table: 'app.daily',
      column: 'on_day',
      timeZone: 'UTC',
      olderThan: '7 days',
      every: '1 hour',
      batchSize: 200,
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 5000, rowsSkipped: 0 })
    expect(Math.max(...(await batchesOf(name)).map((b) => b.rows_deleted))).toBeLessThanOrEqual(200)
    // The rows the server read for it, by its own statistics, which the node's backends
    // report at the latest when they end (with its stop).
    const read = await waitFor('the statistics to count every delete', async () => {
      const { rows } = await db.pool.query(
        `SELECT n_tup_del::int AS deleted, coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0) AS read
           FROM pg_stat_user_tables WHERE relid = 'app.daily'::regclass`,
      )
      return rows[0].deleted >= 5000 ? Number(rows[0].read) : undefined
    })
    // About twice a row: once by the batch that finds its bound, once by the one that
    // deletes it. Taken in ctid order, each batch read every row left of the value: about
    // 5,000² / 200 / 2 = 62,500 rows.
    expect(read).toBeLessThan(4 * 5000)
    expect(await count('app.daily')).toBe(95_000)
  })

  it('among many rows of one value, a row the app moves to an earlier day while the batch waits for it is not left behind by a run that says it left nothing', async () => {
    await db.pool.query(`CREATE TABLE app.moved (id int PRIMARY KEY, on_day date NOT NULL);
      CREATE INDEX ON app.moved (on_day);
      INSERT INTO app.moved SELECT g, current_date - 30 FROM generate_series(1, 300) g;
      INSERT INTO app.moved SELECT g, current_date FROM generate_series(301, 20000) g;
      ANALYZE app.moved;`)
    // The first batch picks row 1 (lowest in the index among equals) and waits for its lock.
    const { report, left } = await cleanWhileAppMoves(
      'moved',
      'app.moved',
      'UPDATE app.moved SET on_day = on_day - 1 WHERE id = 1',
    )
    // A run that reports nothing skipped left nothing outdated; and this one takes it.
    if (report.rowsSkipped === 0) expect(left).toBe(0)
    expect(left).toBe(0)
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 300 })
  })

  it.each([
    ['more rows than a batch takes', 300],
    ['fewer rows than a batch takes', 60],
  ])(
    'rows the app moves all to an earlier day while the batch waits for them (%s share that day) are counted as skipped, or deleted',
    async (_, onDay) => {
      await db.pool.query(`DROP TABLE IF EXISTS app.moved_day; CREATE TABLE app.moved_day (id int PRIMARY KEY, on_day date NOT NULL);
      CREATE INDEX ON app.moved_day (on_day);
      INSERT INTO app.moved_day SELECT g, current_date - 40 FROM generate_series(1, 50) g;
      INSERT INTO app.moved_day SELECT g, current_date - 30 FROM generate_series(51, 50 + ${onDay}) g;
      INSERT INTO app.moved_day SELECT g, current_date - 20 FROM generate_series(51 + ${onDay}, 350 + ${onDay}) g;
      INSERT INTO app.moved_day SELECT g, current_date FROM generate_series(351 + ${onDay}, 30000) g;
      ANALYZE app.moved_day;`)
      // The second batch picks rows of day -30 and waits for them; the app moves that day.
      const { report, left } = await cleanWhileAppMoves(
        `moved-day-${onDay}`,
        'app.moved_day',
        'UPDATE app.moved_day SET on_day = on_day - 5 WHERE on_day = current_date - 30',
      )
      expect(report.status).toBe('done')
      // The rows moved behind the cursor stay (as any walk would leave them), and a run that
      // left rows it picked says so: it never reports nothing skipped with rows left.
      expect({ left, skipped: report.rowsSkipped > 0 }).toEqual({ left, skipped: left > 0 })
      expect(report.rowsDeleted + left).toBe(350 + onDay)
    },
  )

  it('the next run of a table starts at the batch size the last one grew to, not from the first size again', async () => {
    await db.pool.query(`CREATE TABLE app.steady (id serial PRIMARY KEY, at timestamptz NOT NULL);
      CREATE INDEX ON app.steady (at);
      INSERT INTO app.steady (at)
        SELECT now() - CASE WHEN g % 20 = 0 THEN interval '3 days' ELSE interval '1 minute' END - g * interval '1 ms'
          FROM generate_series(1, 100000) g;
      ANALYZE app.steady;`)
    const node = createSingleton({
      name: 'steady',
      connectionString: db.url,
      // A budget no batch here comes near: every full batch doubles the size, up to batchSize.
      batchTargetMs: 1000,
      policies: [
        {
          name: 'steady',
          table: 'app.steady',
          column: 'at',
          olderThan: '1 day',
          every: '1 second',
          batchSize: 5000,
        },
      ],
    })
    const reports: RunReport[] = []
    node.on('cleanup:done', (report) => reports.push(report))
    await node.start()
    try {
      await waitFor('the first run', async () => reports.some((r) => r.rowsDeleted === 5000))
      await db.pool.query(`UPDATE app.steady SET at = at - interval '3 days' WHERE id % 20 = 10`)
      await waitFor('a run of the next 5,000', async () =>
        reports.some(
          (r) => r.rowsDeleted === 5000 && r !== reports.find((f) => f.rowsDeleted === 5000),
        ),
      )
    } finally {
      await node.stop()
    }
    const [first, second] = reports.filter((r) => r.rowsDeleted === 5000)
    const firstBatch = async (runId: string) =>
      (
        await db.pool.query(
          'SELECT rows_deleted FROM pgsingleton.cleanup_batches WHERE run_id = $1 AND batch = 1',
          [runId],
        )
      ).rows[0].rows_deleted as number
    const [before, after] = [
      await firstBatch(first?.runId as string),
      await firstBatch(second?.runId as string),
    ]
    expect(after).toBeGreaterThanOrEqual(2 * before)
    expect(after).toBeLessThanOrEqual(5000)
  })
})

describe('the walk a run chooses', () => {
  it('a small share of rows outdated but scattered over nearly every page is walked in page order, and cleaned whole; the same share in time order walks the index', async () => {
    // 5 % of 60,000 rows outdated: in random order they lie on nearly every page, and the
    // index walk would visit each page in no order, again and again; in time order they
    // fill the first pages.
    for (const [table, order] of [
      ['app.scattered', 'ORDER BY random()'],
      ['app.in_order', 'ORDER BY g'],
    ]) {
      await db.pool.query(`CREATE TABLE ${table} (id int PRIMARY KEY, at timestamptz NOT NULL, payload text);
        INSERT INTO ${table} SELECT g, now() - CASE WHEN g <= 3000 THEN interval '3 days' ELSE interval '1 minute' END - g * interval '1 ms', repeat('x', 80)
          FROM generate_series(1, 60000) g ${order};
        CREATE INDEX ON ${table} (at);
        ANALYZE ${table};`)
    }
    const policy = (table: string): RetentionPolicy => ({
      name: 'p',
      table,
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      batchSize: 400,
    })
    const walk = async (table: string) => {
      const { definitions } = await validatePolicies(db.pool, resolvePolicies([policy(table)]))
      const { rows } = await db.pool.query(
        `SELECT leaf, strategy, tuples_per_page FROM pgsingleton.cleanup_leaves($1::regclass, 'at')`,
        [table],
      )
      return (
        await chooseWalk(
          db.pool,
          { ...rows[0], leaf: Number(rows[0].leaf) },
          definitions[0] as PolicyDefinition,
        )
      ).strategy
    }
    expect(await walk('app.scattered')).toBe('tidrange')
    expect(await walk('app.in_order')).toBe('index')
    for (const table of ['app.scattered', 'app.in_order']) {
      const { report, name } = await cleanOnce(policy(table))
      expect(report).toMatchObject({ status: 'done', rowsDeleted: 3000, rowsSkipped: 0 })
      expect(await count(`${table} WHERE at < now() - interval '1 day'`)).toBe(0)
      expect(await count(table)).toBe(57_000)
      const batches = await batchesOf(name)
      expect(Math.max(...batches.map((b) => b.rows_deleted))).toBeLessThanOrEqual(400)
    }
  })
})

describe('rows that cannot go never stall the policy', () => {
  it('rows held by foreign keys (immediate and deferred) and a trigger are skipped and counted; the rest go; a minute of every second piles nothing up', async () => {
    await db.pool.query(`
      CREATE TABLE app.accounts (id int PRIMARY KEY, created_at timestamptz NOT NULL, note text);
      CREATE INDEX ON app.accounts (created_at);
      CREATE TABLE app.orders (id serial PRIMARY KEY, account_id int REFERENCES app.accounts);
      CREATE TABLE app.invoices (id serial PRIMARY KEY,
        account_id int REFERENCES app.accounts DEFERRABLE INITIALLY DEFERRED);
      CREATE FUNCTION app.refuse_held() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF OLD.note = 'legal hold' THEN RAISE EXCEPTION 'account % is under legal hold', OLD.id; END IF;
        RETURN OLD;
      END $$;
      CREATE TRIGGER legal_hold BEFORE DELETE ON app.accounts FOR EACH ROW EXECUTE FUNCTION app.refuse_held();
      INSERT INTO app.accounts SELECT g, now() - interval '2 days' - g * interval '1 second', NULL FROM generate_series(1, 3000) g;
      INSERT INTO app.accounts SELECT g, now() - interval '1 hour', NULL FROM generate_series(3001, 3100) g;
      INSERT INTO app.orders (account_id) VALUES (17), (400), (1999), (2000), (2950);
      INSERT INTO app.invoices (account_id) VALUES (5), (2500);
      UPDATE app.accounts SET note = 'legal hold' WHERE id IN (1, 1500, 2999);`)
    const held = [1, 5, 17, 400, 1500, 1999, 2000, 2500, 2950, 2999]
    const node = createSingleton({
      name: 'accounts',
      connectionString: db.url,
      policies: [
        {
          name: 'accounts',
          table: 'app.accounts',
          column: 'created_at',
          olderThan: '1 day',
          every: '1 second',
          batchSize: 500,
        },
      ],
    })
    const errors: Error[] = []
    node.on('error', (error) => errors.push(error))
    const reports: RunReport[] = []
    node.on('cleanup:done', (report) => reports.push(report))
    await node.start()
    const started = Date.now()
    let mostOpen = 0
    while (Date.now() - started < 60_000) {
      const { rows } = await db.pool.query(
        `SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs WHERE singleton = 'accounts' AND status IN ('scheduled', 'running', 'failed')`,
      )
      mostOpen = Math.max(mostOpen, rows[0].n)
      await sleep(200)
    }
    const [status] = await readPolicyStatus(db.pool, 'accounts')
    await node.stop()

    expect(mostOpen).toBe(1)
    const { rows: left } = await db.pool.query<{ id: number }>(
      `SELECT id FROM app.accounts WHERE created_at < now() - interval '1 day' ORDER BY id`,
    )
    expect(left.map((r) => r.id)).toEqual(held)
    expect(await count('app.accounts')).toBe(110)

    const { rows: runs } = await db.pool.query(
      `SELECT status, rows_deleted::int AS deleted, rows_skipped::int AS skipped, error
         FROM pgsingleton.cleanup_runs WHERE singleton = 'accounts' ORDER BY id`,
    )
    // Once a second for a minute, each run done and nothing left open or retried.
    expect(runs.length).toBeGreaterThanOrEqual(30)
    expect(runs.length).toBeLessThanOrEqual(62)
    // Each run done; only the last may have been cut short by the stop (and waits for a
    // retry), or issued by the last tick and not yet taken when the node handed over (it
    // waits for the next holder).
    const last = runs[runs.length - 1]
    if (last?.status === 'failed') {
      expect(last.error).toMatch(/interrupted between batches/)
      runs.pop()
    } else if (last?.status === 'scheduled') {
      runs.pop()
    }
    expect(runs.map((r) => r.status).filter((status) => status !== 'done')).toEqual([])
    expect(runs[0]).toMatchObject({ deleted: 2990, skipped: 10 })
    for (const run of runs.slice(1)) expect(run).toMatchObject({ deleted: 0, skipped: 10 })
    const firstErrors = runs.map((r) => r.error as string)
    expect(
      firstErrors.every((e) => /foreign key constraint|legal hold/.test(e)),
      firstErrors[0],
    ).toBe(true)

    expect(status).toMatchObject({
      agreement: 'agree',
      lastStatus: 'done',
      lastRowsSkipped: 10,
      lastError: expect.stringMatching(/foreign key constraint|legal hold/),
    })
    expect(
      errors.some((e) => (e as { code?: string }).code === 'ROWS_SKIPPED'),
      errors.map((e) => e.message).join('; '),
    ).toBe(true)
    expect(
      reports.some((r) => r.status === 'done' && r.rowsSkipped === 10),
      JSON.stringify(reports.slice(0, 3)),
    ).toBe(true)
  }, 90_000)

  it('rows an app transaction holds locked are stepped around and picked up by a later run', async () => {
    await db.pool.query(`CREATE TABLE app.sessions (id int PRIMARY KEY, seen_at timestamptz NOT NULL);
      CREATE INDEX ON app.sessions (seen_at);
      INSERT INTO app.sessions SELECT g, now() - interval '3 days' FROM generate_series(1, 2000) g;`)
    const app = await openClient(db.url)
    try {
      await app.query('BEGIN')
      await app.query('SELECT * FROM app.sessions WHERE id % 100 = 0 FOR UPDATE')
      const policy = {
        name: 'sessions',
        table: 'app.sessions',
        column: 'seen_at',
        olderThan: '1 day',
        every: '1 hour',
        batchSize: 300,
      }
      const first = await cleanOnce(policy, { batchLockTimeoutMs: 200 })
      expect(first.report).toMatchObject({ status: 'done', rowsDeleted: 1980, rowsSkipped: 20 })
      expect(first.report.reason).toMatch(/locked by other transactions/)
      expect(await count('app.sessions')).toBe(20)
      await app.query('COMMIT')
      const second = await cleanOnce(policy, { batchLockTimeoutMs: 200 })
      expect(second.report).toMatchObject({ status: 'done', rowsDeleted: 20, rowsSkipped: 0 })
      expect(await count('app.sessions')).toBe(0)
    } finally {
      await app.end()
    }
  })

  it('a run that keeps failing is retried with backoff, holds its policy back, and ends exhausted; then the next occurrence runs', async () => {
    await db.pool.query(`CREATE TABLE app.audit (at timestamptz NOT NULL);
      INSERT INTO app.audit SELECT now() - interval '2 days' FROM generate_series(1, 50);
      CREATE FUNCTION app.out_of_room() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN RAISE EXCEPTION USING ERRCODE = 'insufficient_resources', MESSAGE = 'the archive is full'; END $$;
      CREATE TRIGGER archive_full BEFORE DELETE ON app.audit FOR EACH STATEMENT EXECUTE FUNCTION app.out_of_room();`)
    const node = createSingleton({
      name: 'audit',
      connectionString: db.url,
      policies: [
        { name: 'audit', table: 'app.audit', column: 'at', olderThan: '1 day', every: '1 second' },
      ],
    })
    const errors: Error[] = []
    node.on('error', (error) => errors.push(error))
    await node.start()
    try {
      const exhausted = await waitFor(
        'the run to be exhausted',
        async () => {
          const { rows } = await db.pool.query(
            `SELECT id, failures, error FROM pgsingleton.cleanup_runs WHERE singleton = 'audit' AND status = 'exhausted'`,
          )
          return rows[0]
        },
        45_000,
      )
      expect(exhausted).toMatchObject({
        failures: 5,
        error: expect.stringMatching(/the archive is full/),
      })
      const { rows: before } = await db.pool.query(
        `SELECT count(*)::int AS n FROM pgsingleton.cleanup_runs WHERE singleton = 'audit' AND id < $1`,
        [exhausted.id],
      )
      expect(before[0].n).toBe(0) // every second came due, yet only this run existed
      expect(errors.filter((e) => /failed and will be retried/.test(e.message))).toHaveLength(4)
      expect(errors.some((e) => /failed on its last retry/.test(e.message))).toBe(true)

      await db.pool.query('DROP TRIGGER archive_full ON app.audit')
      const after = await waitFor('the next occurrence to be done', async () => {
        const { rows } = await db.pool.query(
          `SELECT status, coalesced FROM pgsingleton.cleanup_runs WHERE singleton = 'audit' AND id > $1 ORDER BY id LIMIT 1`,
          [exhausted.id],
        )
        return rows[0]?.status === 'done' ? rows[0] : undefined
      })
      expect(await count('app.audit')).toBe(0)
      expect(after.coalesced).toBeGreaterThan(10) // the slots it waited out, in one run
    } finally {
      await node.stop()
    }
  }, 60_000)
})
