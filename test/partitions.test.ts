import { once } from 'node:events'
import { afterEach, describe, expect, it } from 'vitest'
import {
  createSingleton,
  type RetentionPolicy,
  type RunReport,
  type SingletonWarning,
} from '../src/index.js'
import * as runs from '../src/runs/runs.js'
import { useTestDatabase } from './support/database.js'
import { definitionsOf, Holder, issueNow, LIMITS, openClient } from './support/run-harness.js'

const db = useTestDatabase({ setup: ({ pool }) => pool.query('CREATE SCHEMA app').then(() => {}) })

let seq = 0
async function cleanOnce(
  policy: RetentionPolicy,
): Promise<{ report: RunReport; warnings: SingletonWarning[]; name: string }> {
  const name = `pt-${++seq}`
  const node = createSingleton({ name, connectionString: db.url, policies: [policy] })
  const warnings: SingletonWarning[] = []
  node.on('warning', (warning) => warnings.push(warning))
  node.on('error', () => {})
  const done = once(node, 'cleanup:done') as Promise<[RunReport]>
  await node.start()
  const [report] = await done
  await node.stop()
  return { report, warnings, name }
}

async function batchesOf(singleton: string) {
  const { rows } = await db.pool.query<{ relation: string; rows_deleted: number; action: string }>(
    `SELECT b.relation, b.rows_deleted, b.action FROM pgsingleton.cleanup_batches b
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

async function exists(relation: string): Promise<{ exists: boolean; partition: boolean }> {
  const { rows } = await db.pool.query(
    `SELECT c.oid IS NOT NULL AS exists, coalesce(c.relispartition, false) AS partition
       FROM (SELECT to_regclass($1) AS r) x LEFT JOIN pg_class c ON c.oid = x.r`,
    [relation],
  )
  return rows[0]
}

/** Daily partitions: three wholly outdated, one straddling the cut-off, one ahead, a default. */
async function dailyTable(table: string): Promise<void> {
  await db.pool.query(`CREATE TABLE app.${table} (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz NOT NULL, v int)
      PARTITION BY RANGE (at);
    CREATE INDEX ON app.${table} (at);
    DO $$
    DECLARE day0 timestamptz := date_trunc('day', now() - interval '1 day');
    BEGIN
      FOR d IN 1..3 LOOP
        EXECUTE format('CREATE TABLE app.%s_old%s PARTITION OF app.%s FOR VALUES FROM (%L) TO (%L)',
          '${table}', d, '${table}', day0 - d * interval '1 day', day0 - (d - 1) * interval '1 day');
      END LOOP;
      EXECUTE format('CREATE TABLE app.%s_now PARTITION OF app.%s FOR VALUES FROM (%L) TO (%L)',
          '${table}', '${table}', day0, day0 + interval '1 day');
      EXECUTE format('CREATE TABLE app.%s_next PARTITION OF app.%s FOR VALUES FROM (%L) TO (%L)',
          '${table}', '${table}', day0 + interval '1 day', day0 + interval '3 days');
      EXECUTE format('CREATE TABLE app.%s_default PARTITION OF app.%s DEFAULT', '${table}', '${table}');
    END $$;
    -- 1000 rows a day in the outdated partitions; in the straddling one, 200 before the
    -- cut-off and 100 after; 50 in the next; 10 far in the past, in the default.
    INSERT INTO app.${table} (at, v)
      SELECT date_trunc('day', now() - interval '1 day') - d * interval '1 day' + g * interval '80 seconds', g
        FROM generate_series(1, 3) d, generate_series(1, 1000) g;
    INSERT INTO app.${table} (at, v) SELECT now() - interval '1 day' - interval '1 minute' - g * interval '1 second', g
      FROM generate_series(1, 200) g
     WHERE now() - interval '1 day' - interval '1 minute' - g * interval '1 second' >= date_trunc('day', now() - interval '1 day');
    INSERT INTO app.${table} (at, v) SELECT now() - interval '1 day' + interval '1 minute', g FROM generate_series(1, 100) g;
    INSERT INTO app.${table} (at, v) SELECT now(), g FROM generate_series(1, 50) g;
    INSERT INTO app.${table} (at, v) SELECT '1999-01-01', g FROM generate_series(1, 10) g;
    ANALYZE app.${table};`)
}

describe('"partitions": "drop" and "detach" remove wholly outdated partitions, never one that holds a row to keep', () => {
  it('drops each partition whose upper bound is at or below the cut-off, cleans the straddling one row by row, and records the rows it removed', async () => {
    await dailyTable('metrics')
    const young = await count(
      `app.metrics WHERE at >= now() - interval '1 day' + interval '30 seconds'`,
    )
    const straddlingOld = await count(`app.metrics_now WHERE at < now() - interval '1 day'`)
    const { report, name } = await cleanOnce({
      name: 'metrics',
      table: 'app.metrics',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      partitions: 'drop',
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 3000 + straddlingOld + 10 })
    for (const d of [1, 2, 3])
      expect(await exists(`app.metrics_old${d}`)).toMatchObject({ exists: false })
    for (const kept of ['now', 'next', 'default']) {
      expect(await exists(`app.metrics_${kept}`)).toEqual({ exists: true, partition: true })
    }
    const batches = await batchesOf(name)
    const drops = batches.filter((b) => b.action === 'drop')
    expect(drops.map((b) => b.relation).sort()).toEqual([
      'app.metrics_old1',
      'app.metrics_old2',
      'app.metrics_old3',
    ])
    expect(drops.map((b) => b.rows_deleted)).toEqual([1000, 1000, 1000])
    // The straddling partition and the default (no upper bound) are cleaned row by row.
    const deletes = batches.filter((b) => b.action === 'delete')
    expect(new Set(deletes.map((b) => b.relation))).toEqual(
      new Set(['app.metrics_now', 'app.metrics_default']),
    )
    expect(await count(`app.metrics WHERE at < now() - interval '1 day'`)).toBe(0)
    expect(
      await count(`app.metrics WHERE at >= now() - interval '1 day' + interval '30 seconds'`),
    ).toBe(young)
  })

  it('detaches instead when told: the partition lives on as a table of its own, out of the policy table', async () => {
    await dailyTable('archive')
    const { report, name } = await cleanOnce({
      name: 'archive',
      table: 'app.archive',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      partitions: 'detach',
    })
    expect(report.status).toBe('done')
    for (const d of [1, 2, 3]) {
      expect(await exists(`app.archive_old${d}`)).toEqual({ exists: true, partition: false })
      expect(await count(`app.archive_old${d}`)).toBe(1000)
    }
    expect((await batchesOf(name)).filter((b) => b.action === 'detach')).toHaveLength(3)
    expect(await count(`app.archive WHERE at < now() - interval '1 day'`)).toBe(0)
  })

  it("reads a timestamp partition bound in the policy's zone: a bound that is past in UTC but not in New York keeps its partition", async () => {
    // The column holds New York wall times. visits_p2's upper bound is the cut-off minus an
    // hour as a UTC wall time: read as UTC it is past, and a cleaner that read it so would
    // drop the partition; read in New York (five hours behind) it is four hours ahead of
    // the cut-off, and the partition holds rows to keep.
    await db.pool.query(`CREATE TABLE app.visits (at timestamp NOT NULL, v int) PARTITION BY RANGE (at);
      DO $$
      DECLARE cut timestamptz := now() - interval '1 day';
      BEGIN
        EXECUTE format('CREATE TABLE app.visits_p1 PARTITION OF app.visits FOR VALUES FROM (MINVALUE) TO (%L)',
          (cut - interval '1 hour') AT TIME ZONE 'America/New_York');
        EXECUTE format('CREATE TABLE app.visits_p2 PARTITION OF app.visits FOR VALUES FROM (%L) TO (%L)',
          (cut - interval '1 hour') AT TIME ZONE 'America/New_York', (cut - interval '1 hour') AT TIME ZONE 'UTC');
        CREATE TABLE app.visits_rest PARTITION OF app.visits DEFAULT;
      END $$;
      INSERT INTO app.visits SELECT (now() - interval '1 day' - interval '2 hours' - g * interval '1 second') AT TIME ZONE 'America/New_York', g FROM generate_series(1, 500) g;
      INSERT INTO app.visits SELECT (now() - interval '1 day' - interval '30 minutes') AT TIME ZONE 'America/New_York', g FROM generate_series(1, 100) g;
      INSERT INTO app.visits SELECT (now() - interval '1 day' + interval '1 hour') AT TIME ZONE 'America/New_York', g FROM generate_series(1, 100) g;
      INSERT INTO app.visits SELECT (now() - interval '1 day' + interval '3 hours') AT TIME ZONE 'America/New_York', g FROM generate_series(1, 50) g;
      INSERT INTO app.visits SELECT now() AT TIME ZONE 'America/New_York', g FROM generate_series(1, 100) g;`)
    expect(await count('app.visits_p2')).toBe(250)
    const { report, name } = await cleanOnce({
      name: 'visits',
      table: 'app.visits',
      column: 'at',
      timeZone: 'America/New_York',
      olderThan: '1 day',
      every: '1 hour',
      partitions: 'drop',
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 600 })
    expect(await exists('app.visits_p1')).toMatchObject({ exists: false })
    expect(await exists('app.visits_p2')).toEqual({ exists: true, partition: true })
    expect(await count('app.visits_p2')).toBe(150)
    expect(await count('app.visits_rest')).toBe(100)
    expect(
      (await batchesOf(name)).filter((b) => b.action === 'drop').map((b) => b.relation),
    ).toEqual(['app.visits_p1'])
  })

  it('a partition that a foreign key references is cleaned row by row: the referenced row stays', async () => {
    await db.pool.query(`CREATE TABLE app.orders (id bigint NOT NULL, at timestamptz NOT NULL, PRIMARY KEY (id, at))
        PARTITION BY RANGE (at);
      CREATE TABLE app.orders_old PARTITION OF app.orders FOR VALUES FROM (MINVALUE) TO (now() - interval '2 days');
      CREATE TABLE app.orders_rest PARTITION OF app.orders DEFAULT;
      CREATE TABLE app.order_lines (order_id bigint, order_at timestamptz, FOREIGN KEY (order_id, order_at) REFERENCES app.orders);
      INSERT INTO app.orders SELECT g, now() - interval '3 days' FROM generate_series(1, 10) g;
      INSERT INTO app.order_lines VALUES (7, (SELECT at FROM app.orders WHERE id = 7));`)
    const { report, warnings, name } = await cleanOnce({
      name: 'orders',
      table: 'app.orders',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      partitions: 'drop',
    })
    expect(warnings).toContainEqual({
      code: 'PARTITIONS_DELETED_BY_ROW',
      message: expect.stringMatching(/foreign key .* of app\.order_lines/),
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 9, rowsSkipped: 1 })
    expect(await exists('app.orders_old')).toEqual({ exists: true, partition: true })
    expect(await count('app.orders')).toBe(1)
    expect((await batchesOf(name)).every((b) => b.action === 'delete')).toBe(true)
  })

  it('a partition with a DELETE trigger is cleaned row by row, so the trigger fires for every row', async () => {
    await db.pool.query(`CREATE TABLE app.audited (at timestamptz NOT NULL) PARTITION BY RANGE (at);
      CREATE TABLE app.audited_old PARTITION OF app.audited FOR VALUES FROM (MINVALUE) TO (now() - interval '2 days');
      CREATE TABLE app.audited_rest PARTITION OF app.audited DEFAULT;
      CREATE TABLE app.audit_log (at timestamptz);
      CREATE FUNCTION app.log_delete() RETURNS trigger LANGUAGE plpgsql AS
        'BEGIN INSERT INTO app.audit_log VALUES (OLD.at); RETURN OLD; END';
      CREATE TRIGGER log_delete AFTER DELETE ON app.audited FOR EACH ROW EXECUTE FUNCTION app.log_delete();
      INSERT INTO app.audited SELECT now() - interval '3 days' FROM generate_series(1, 40);`)
    const { report, warnings } = await cleanOnce({
      name: 'audited',
      table: 'app.audited',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      partitions: 'drop',
    })
    expect(warnings.map((w) => w.code)).toContain('PARTITIONS_DELETED_BY_ROW')
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 40 })
    expect(await exists('app.audited_old')).toEqual({ exists: true, partition: true })
    expect(await count('app.audit_log')).toBe(40)
  })

  it('a partition the app is using is not waited for long: the app keeps its transaction, the rows go one by one', async () => {
    await db.pool.query(`CREATE TABLE app.busy (at timestamptz NOT NULL) PARTITION BY RANGE (at);
      CREATE TABLE app.busy_old PARTITION OF app.busy FOR VALUES FROM (MINVALUE) TO (now() - interval '2 days');
      CREATE TABLE app.busy_rest PARTITION OF app.busy DEFAULT;
      INSERT INTO app.busy SELECT now() - interval '3 days' FROM generate_series(1, 30);`)
    const app = await openClient(db.url)
    try {
      await app.query('BEGIN ISOLATION LEVEL REPEATABLE READ')
      await app.query('SELECT count(*) FROM app.busy')
      const { report, name } = await cleanOnce({
        name: 'busy',
        table: 'app.busy',
        column: 'at',
        olderThan: '1 day',
        every: '1 hour',
        partitions: 'drop',
      })
      expect(report).toMatchObject({ status: 'done', rowsDeleted: 30 })
      expect((await batchesOf(name)).every((b) => b.action === 'delete')).toBe(true)
      // The app's transaction was neither cancelled nor blocked for good (its snapshot
      // still shows the rows).
      expect((await app.query('SELECT count(*)::int AS n FROM app.busy')).rows[0].n).toBe(30)
      await app.query('COMMIT')
      expect(await exists('app.busy_old')).toEqual({ exists: true, partition: true })
      expect(await count('app.busy')).toBe(0)
    } finally {
      await app.end()
    }
  })

  it('is refused at start-up, naming the field, on a table that is not range-partitioned by the column, and an unknown mode', async () => {
    await db.pool.query(`CREATE TABLE app.flat (at timestamptz NOT NULL);
      CREATE TABLE app.hashed (id int, at timestamptz NOT NULL) PARTITION BY HASH (id);
      CREATE TABLE app.hashed_0 PARTITION OF app.hashed FOR VALUES WITH (MODULUS 1, REMAINDER 0);
      CREATE TABLE app.by_other (at timestamptz NOT NULL, made timestamptz NOT NULL) PARTITION BY RANGE (made);
      INSERT INTO app.flat SELECT now() - interval '3 days' FROM generate_series(1, 5);`)
    const attempts: [Partial<RetentionPolicy>, RegExp][] = [
      [
        { table: 'app.flat' },
        /field partitions: "drop" needs a table partitioned by range on "at"; "app.flat" is not/,
      ],
      [
        { table: 'app.hashed' },
        /field partitions: "drop" needs a table partitioned by range on "at"/,
      ],
      [
        { table: 'app.by_other' },
        /field partitions: "drop" needs a table partitioned by range on "at"/,
      ],
    ]
    for (const [change, message] of attempts) {
      const node = createSingleton({
        name: `pt-refused-${++seq}`,
        connectionString: db.url,
        policies: [
          {
            name: 'p',
            table: 'app.flat',
            column: 'at',
            olderThan: '1 day',
            every: '1 hour',
            partitions: 'drop',
            ...change,
          },
        ],
      })
      await expect(node.start()).rejects.toMatchObject({
        code: 'INVALID_POLICY',
        message: expect.stringMatching(message),
      })
      await node.stop()
    }
    // A mode it does not know is refused before anything connects.
    expect(() =>
      createSingleton({
        name: 'pt-typo',
        connectionString: db.url,
        policies: [
          {
            name: 'p',
            table: 'app.flat',
            column: 'at',
            olderThan: '1 day',
            every: '1 hour',
            partitions: 'Drop' as 'drop',
          },
        ],
      }),
    ).toThrow(/field partitions: "Drop" is not "delete", "drop" or "detach"/)
    expect(await count('app.flat')).toBe(5)
  })
})

describe('remove_partition is fenced like a batch', () => {
  const open: Holder[] = []
  afterEach(async () => {
    for (const holder of open.splice(0)) await holder.close().catch(() => {})
  })

  it('a removal under an epoch that is no longer current removes nothing', async () => {
    await db.pool.query(`CREATE TABLE app.fenced (at timestamptz NOT NULL) PARTITION BY RANGE (at);
      CREATE TABLE app.fenced_old PARTITION OF app.fenced FOR VALUES FROM (MINVALUE) TO (now() - interval '2 days');
      INSERT INTO app.fenced SELECT now() - interval '3 days' FROM generate_series(1, 20);`)
    const [definition] = await definitionsOf(db.pool, [
      {
        name: 'fenced',
        table: 'app.fenced',
        column: 'at',
        olderThan: '1 day',
        every: '1 hour',
        partitions: 'drop',
      },
    ])
    if (!definition) throw new Error('no definition')
    const a = await new Holder(db.url, 'pt-fence', 'a').join([definition])
    open.push(a)
    await a.hold()
    const [run] = await issueNow(db.pool, a, definition)
    const claim = await runs.claim(db.pool, run?.runId ?? '', 'a')
    if (typeof claim === 'string') throw new Error(claim)
    await a.close()
    const b = await new Holder(db.url, 'pt-fence', 'b').join([definition])
    open.push(b)
    await b.hold()
    const leaf = Number(
      (await db.pool.query(`SELECT 'app.fenced_old'::regclass::oid AS o`)).rows[0].o,
    )
    const removal = await runs.removePartition(db.pool, LIMITS, claim, leaf)
    expect(removal).toMatchObject({ outcome: 'fenced', removed: 0 })
    expect(await exists('app.fenced_old')).toEqual({ exists: true, partition: true })
    expect(await count('app.fenced')).toBe(20)
  })
})
