import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import pg from 'pg'
import { afterEach, describe, expect, it } from 'vitest'
import { createSingleton, type RunReport } from '../src/index.js'
import * as runs from '../src/runs/runs.js'
import { useTestDatabase, waitFor } from './support/database.js'
import { definitionsOf, Holder, issueNow, LIMITS, openClient } from './support/run-harness.js'

// What a batch checks under the lock it takes on its table (a leaf): that the leaf still
// belongs to the policy's table, and that deleting from it reaches no young row elsewhere
// and bypasses no row-level security; each of these can change after start-up.
const db = useTestDatabase({ setup: ({ pool }) => pool.query('CREATE SCHEMA app').then(() => {}) })

const open: { close(): Promise<unknown> }[] = []
afterEach(async () => {
  for (const item of open.splice(0).reverse()) await item.close().catch(() => {})
})

async function count(sql: string): Promise<number> {
  const { rows } = await db.pool.query(`SELECT count(*)::int AS n FROM ${sql}`)
  return rows[0].n
}

async function oid(relation: string): Promise<number> {
  return Number((await db.pool.query('SELECT $1::regclass::oid AS o', [relation])).rows[0].o)
}

/** A holder with a claimed run of `policy`, driven by hand. */
async function claimed(singleton: string, policy: Parameters<typeof definitionsOf>[1][number]) {
  const [definition] = await definitionsOf(db.pool, [policy])
  if (!definition) throw new Error('no definition')
  const holder = await new Holder(db.url, singleton, 'a').join([definition])
  open.push(holder)
  await holder.hold()
  const [run] = await issueNow(db.pool, holder, definition)
  const claim = await runs.claim(db.pool, run?.runId ?? '', 'a')
  if (typeof claim === 'string') throw new Error(claim)
  return claim
}

/** Waits until a session other than `except` waits for a lock on `relation`. */
async function waitingOn(relation: string): Promise<void> {
  await waitFor(`a batch waiting for ${relation}`, async () => {
    const { rows } = await db.pool.query(
      `SELECT 1 FROM pg_locks l WHERE NOT l.granted AND l.relation = $1::regclass`,
      [relation],
    )
    return rows.length > 0 ? true : undefined
  })
}

async function partitioned(table: string): Promise<void> {
  await db.pool.query(`CREATE TABLE app.${table} (at timestamptz NOT NULL, v int) PARTITION BY RANGE (at);
    CREATE TABLE app.${table}_old PARTITION OF app.${table} FOR VALUES FROM (MINVALUE) TO (now() - interval '2 days');
    CREATE TABLE app.${table}_new PARTITION OF app.${table} FOR VALUES FROM (now() - interval '2 days') TO (MAXVALUE);
    INSERT INTO app.${table} SELECT now() - interval '3 days', g FROM generate_series(1, 100) g;
    INSERT INTO app.${table} SELECT now(), g FROM generate_series(1, 10) g;`)
}

describe('a partition detached by a transaction still open when the batch came', () => {
  it('is not deleted from once the detach commits: the batch waits for it, then finds it is no longer the policy table', async () => {
    await partitioned('ev')
    const claim = await claimed('lc-detach', {
      name: 'ev',
      table: 'app.ev',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
    })
    const archiver = await openClient(db.url)
    open.push({ close: () => archiver.end() })
    await archiver.query('BEGIN; ALTER TABLE app.ev DETACH PARTITION app.ev_old')
    const batch = runs.recordBatch(db.pool, { ...LIMITS, lockTimeoutMs: 20_000 }, claim, {
      leaf: await oid('app.ev_old'),
      strategy: 'index',
      cursor: null,
      limit: 1000,
      span: 4,
      careful: false,
    })
    batch.catch(() => {})
    await waitingOn('app.ev_old')
    await archiver.query('COMMIT')
    await expect(batch).rejects.toThrow(/app\.ev_old is not a table of app\.ev/)
    // The archived table keeps every row.
    expect(await count('app.ev_old')).toBe(100)
  })

  it('is not dropped by a run that removes whole partitions', async () => {
    await partitioned('dr')
    const claim = await claimed('lc-detach-drop', {
      name: 'dr',
      table: 'app.dr',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      partitions: 'drop',
    })
    const archiver = await openClient(db.url)
    open.push({ close: () => archiver.end() })
    await archiver.query('BEGIN; ALTER TABLE app.dr DETACH PARTITION app.dr_old')
    const removal = runs.removePartition(
      db.pool,
      { ...LIMITS, lockTimeoutMs: 20_000 },
      claim,
      await oid('app.dr_old'),
    )
    await waitingOn('app.dr_old')
    await archiver.query('COMMIT')
    expect(await removal).toMatchObject({
      outcome: 'kept',
      removed: 0,
      reason: 'it was detached, moved or renamed while the run waited for it',
    })
    expect(await count('app.dr_old')).toBe(100)
  })
})

describe('side effects that appear after start-up', () => {
  it('a foreign key with ON DELETE CASCADE added while the node runs stops the next batch: no parent and no young child goes', async () => {
    await db.pool.query(`CREATE TABLE app.parent (id int PRIMARY KEY, at timestamptz NOT NULL);
      CREATE INDEX ON app.parent (at);
      CREATE TABLE app.child (id serial PRIMARY KEY, parent_id int, at timestamptz NOT NULL DEFAULT now());
      INSERT INTO app.parent SELECT g, now() - interval '3 days' FROM generate_series(1, 50) g;`)
    const claim = await claimed('lc-cascade', {
      name: 'parent',
      table: 'app.parent',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
    })
    // The app's migration, after the node started and was checked.
    await db.pool.query(`ALTER TABLE app.child ADD CONSTRAINT child_parent FOREIGN KEY (parent_id) REFERENCES app.parent (id) ON DELETE CASCADE;
      INSERT INTO app.child (parent_id) SELECT g FROM generate_series(1, 50) g;`)
    const request: runs.BatchRequest = {
      leaf: await oid('app.parent'),
      strategy: 'index',
      cursor: null,
      limit: 1000,
      span: 4,
      careful: false,
    }
    await expect(runs.recordBatch(db.pool, LIMITS, claim, request)).rejects.toThrow(
      /foreign keys that reference app\.parent delete or change rows of other tables when its rows go \(child_parent \(app\.child\)\); nothing was deleted/,
    )
    expect({ parents: await count('app.parent'), children: await count('app.child') }).toEqual({
      parents: 50,
      children: 50,
    })
    // A DELETE rule, the same.
    await db.pool.query(`ALTER TABLE app.child DROP CONSTRAINT child_parent;
      CREATE RULE keep_log AS ON DELETE TO app.parent DO ALSO DELETE FROM app.child;`)
    await expect(runs.recordBatch(db.pool, LIMITS, claim, request)).rejects.toThrow(
      /DELETE rules on app\.parent or the tables above it \(keep_log \(app\.parent\)\) could do anything; nothing was deleted/,
    )
    expect({ parents: await count('app.parent'), children: await count('app.child') }).toEqual({
      parents: 50,
      children: 50,
    })
  })

  it('a DELETE rule added on an inheritance parent while the node runs stops the batches of its children', async () => {
    await db.pool.query(`CREATE TABLE app.ih (at timestamptz NOT NULL);
      CREATE TABLE app.ih_child () INHERITS (app.ih);
      CREATE TABLE app.ih_archive (at timestamptz);
      INSERT INTO app.ih_child SELECT now() - interval '3 days' FROM generate_series(1, 10);`)
    const claim = await claimed('lc-parent-rule', {
      name: 'ih',
      table: 'app.ih',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
    })
    await db.pool.query(
      'CREATE RULE archive AS ON DELETE TO app.ih DO ALSO INSERT INTO app.ih_archive VALUES (OLD.at)',
    )
    await expect(
      runs.recordBatch(db.pool, LIMITS, claim, {
        leaf: await oid('app.ih_child'),
        strategy: 'tidrange',
        cursor: null,
        limit: 1000,
        span: 4,
        careful: false,
      }),
    ).rejects.toThrow(
      /DELETE rules on app\.ih_child or the tables above it \(archive \(app\.ih\)\)/,
    )
    expect(await count('app.ih_child')).toBe(10)
  })

  it('a foreign key declared on a sub-partition that is itself partitioned is refused at start-up, naming it', async () => {
    await db.pool.query(`CREATE TABLE app.sp (id int NOT NULL, kind text NOT NULL, at timestamptz NOT NULL) PARTITION BY RANGE (at);
      CREATE TABLE app.sp_2020 PARTITION OF app.sp FOR VALUES FROM ('2020-01-01') TO ('2021-01-01') PARTITION BY LIST (kind);
      CREATE TABLE app.sp_2020_a PARTITION OF app.sp_2020 FOR VALUES IN ('a');
      CREATE TABLE app.sp_rest PARTITION OF app.sp FOR VALUES FROM ('2021-01-01') TO (MAXVALUE);
      ALTER TABLE app.sp_2020 ADD UNIQUE (id, kind);
      CREATE TABLE app.note (id serial, sp_id int, sp_kind text, FOREIGN KEY (sp_id, sp_kind) REFERENCES app.sp_2020 (id, kind) ON DELETE CASCADE);
      INSERT INTO app.sp SELECT g, 'a', '2020-06-01' FROM generate_series(1, 50) g;
      INSERT INTO app.note (sp_id, sp_kind) SELECT g, 'a' FROM generate_series(1, 50) g;`)
    const node = createSingleton({
      name: 'lc-subpartition',
      connectionString: db.url,
      policies: [
        { name: 'sp', table: 'app.sp', column: 'at', olderThan: '1 day', every: '1 hour' },
      ],
    })
    node.on('error', () => {})
    await expect(node.start()).rejects.toThrow(
      /would also delete or change the rows that reference them, however young: app\.note \(note_sp_id_sp_kind_fkey\) ON DELETE CASCADE/,
    )
    await node.stop()
    expect({ sp: await count('app.sp'), notes: await count('app.note') }).toEqual({
      sp: 50,
      notes: 50,
    })
  })
})

describe('row-level security', () => {
  const password = randomBytes(8).toString('hex')
  const role = `lc_cleaner_${randomBytes(3).toString('hex')}`

  async function asRole(setup: string): Promise<string> {
    // The README's least-privilege grants, and CREATE on the app's schema.
    await db.pool.query(`CREATE ROLE ${role} LOGIN PASSWORD '${password}';
      GRANT USAGE, CREATE ON SCHEMA app TO ${role};
      GRANT USAGE ON SCHEMA pgsingleton TO ${role};
      GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgsingleton TO ${role};
      GRANT EXECUTE ON FUNCTION pgsingleton.lock_key(text) TO ${role};
      GRANT USAGE ON SCHEMA pgboss TO ${role};
      GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgboss TO ${role};
      GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgboss TO ${role};
      ${setup}`)
    open.push({
      close: async () => {
        await db.pool.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`)
      },
    })
    const url = new URL(db.url)
    url.username = role
    url.password = password
    return url.toString()
  }

  async function cleanOnce(url: string, name: string, policy: object): Promise<RunReport> {
    const node = createSingleton({ name, connectionString: url, policies: [policy as never] })
    node.on('error', () => {})
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    const [report] = await done
    await node.stop()
    return report
  }

  it('a partition whose DELETE policy keeps rows (legal hold) is not dropped whole: its rows go one by one and the held ones stay', async () => {
    const url = await asRole(`
      SET ROLE ${role};
      CREATE TABLE app.held (at timestamptz NOT NULL, legal_hold boolean NOT NULL DEFAULT false) PARTITION BY RANGE (at);
      CREATE TABLE app.held_old PARTITION OF app.held FOR VALUES FROM (MINVALUE) TO (now() - interval '2 days');
      CREATE TABLE app.held_new PARTITION OF app.held FOR VALUES FROM (now() - interval '2 days') TO (MAXVALUE);
      ALTER TABLE app.held_old ENABLE ROW LEVEL SECURITY; ALTER TABLE app.held_old FORCE ROW LEVEL SECURITY;
      CREATE POLICY sel ON app.held_old FOR SELECT USING (true);
      CREATE POLICY del ON app.held_old FOR DELETE USING (NOT legal_hold);
      INSERT INTO app.held SELECT now() - interval '3 days', g <= 10 FROM generate_series(1, 100) g;
      RESET ROLE;`)
    const report = await cleanOnce(url, 'lc-rls-drop', {
      name: 'held',
      table: 'app.held',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
      partitions: 'drop',
    })
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 90 })
    expect(await count('app.held_old WHERE legal_hold')).toBe(10)
    expect(await count('app.held_old')).toBe(10)
  })

  it('row security on the partitioned table, which deletes from its partitions would bypass, refuses the policy at start-up and every batch', async () => {
    await db.pool.query(`CREATE TABLE app.ledger (at timestamptz NOT NULL, legal_hold boolean NOT NULL DEFAULT false) PARTITION BY RANGE (at);
      CREATE TABLE app.ledger_old PARTITION OF app.ledger FOR VALUES FROM (MINVALUE) TO (now() - interval '2 days');
      CREATE TABLE app.ledger_new PARTITION OF app.ledger FOR VALUES FROM (now() - interval '2 days') TO (MAXVALUE);
      CREATE INDEX ON app.ledger (at);
      INSERT INTO app.ledger SELECT now() - interval '3 days', g <= 10 FROM generate_series(1, 100) g;`)
    const url = await asRole(
      `GRANT SELECT, DELETE ON app.ledger, app.ledger_old, app.ledger_new TO ${role};`,
    )
    const policy = {
      name: 'ledger',
      table: 'app.ledger',
      column: 'at',
      olderThan: '1 day',
      every: '1 hour',
    }
    const roleClient = new pg.Pool({ connectionString: url, max: 2 })
    open.push({ close: () => roleClient.end() })
    // Checked before the security is on (a node that started earlier)...
    const [definition] = await definitionsOf(roleClient, [policy])
    if (!definition) throw new Error('no definition')
    await db.pool.query(`ALTER TABLE app.ledger ENABLE ROW LEVEL SECURITY;
      CREATE POLICY sel ON app.ledger FOR SELECT USING (true);
      CREATE POLICY del ON app.ledger FOR DELETE USING (NOT legal_hold);`)
    // ...a node starting now is refused,
    const node = createSingleton({
      name: 'lc-rls-parent',
      connectionString: url,
      policies: [policy],
    })
    node.on('error', () => {})
    await expect(node.start()).rejects.toThrow(
      /row-level security on "app\.ledger" applies to this role, and pg-singleton deletes from the partitions or children directly/,
    )
    await node.stop()
    // ...as is a policy on one of its partitions, whose rows the security above covers,
    await expect(
      createSingleton({
        name: 'lc-rls-partition',
        connectionString: url,
        policies: [{ ...policy, name: 'ledger-old', table: 'app.ledger_old' }],
      }).start(),
    ).rejects.toThrow(/row-level security on "app\.ledger" applies to this role/)
    // ...and a batch of the one that started earlier deletes nothing.
    const holder = await new Holder(url, 'lc-rls-parent-2', 'a').join([definition])
    open.push(holder)
    await holder.hold()
    const [run] = await issueNow(roleClient, holder, definition)
    const claim = await runs.claim(roleClient, run?.runId ?? '', 'a')
    if (typeof claim === 'string') throw new Error(claim)
    await expect(
      runs.recordBatch(roleClient, LIMITS, claim, {
        leaf: await oid('app.ledger_old'),
        strategy: 'index',
        cursor: null,
        limit: 1000,
        span: 4,
        careful: false,
      }),
    ).rejects.toThrow(/row-level security on app\.ledger applies to this role/)
    expect(await count('app.ledger_old WHERE legal_hold')).toBe(10)
    expect(await count('app.ledger_old')).toBe(100)
  })
})

describe('a partition removed whole only when every row is outdated by the rule rows are deleted by', () => {
  // New York skipped 02:00-03:00 on 2018-03-11: 03:10 EDT is 07:10 UTC, while 02:45, which
  // never happened, reads as 07:45 UTC. Rome skipped 23:49:56-00:00 on 1893-10-31 (local
  // mean time to CET), a gap that starts inside a minute: 23:49:58 reads as 23:00:02 UTC,
  // after 00:00:01's 23:00:01. With the cut-off between the two, the partition's newest
  // value is outdated, and the gap value is not.
  it.each([
    [
      'America/New_York',
      '2018-03-11 00:00',
      '2018-03-11 03:30',
      '2018-03-11 03:10',
      '2018-03-11 02:45',
      '2018-03-11 07:37:30+00',
      'an index',
    ],
    [
      'America/New_York',
      '2018-03-11 00:00',
      '2018-03-11 03:30',
      '2018-03-11 03:10',
      '2018-03-11 02:45',
      '2018-03-11 07:37:30+00',
      'no index',
    ],
    [
      'Europe/Rome',
      '1893-10-31 00:00',
      '1893-11-01 00:00:01.5',
      '1893-11-01 00:00:01',
      '1893-10-31 23:49:58',
      '1893-10-31 23:00:01.5+00',
      'an index',
    ],
    [
      'Europe/Rome',
      '1893-10-31 00:00',
      '1893-11-01 00:00:01.5',
      '1893-11-01 00:00:01',
      '1893-10-31 23:49:58',
      '1893-10-31 23:00:01.5+00',
      'no index',
    ],
  ])(
    '%s: a wall time from a gap the clocks skipped, read as a later instant than the newest value, keeps the partition (from %s to %s; newest %s, in the gap %s; cut-off %s; with %s)',
    async (zone, from, to, newest, inGap, cutoff, index) => {
      const indexed = index === 'an index'
      const table = `gap_${Math.random().toString(36).slice(2, 8)}`
      await db.pool.query(`CREATE TABLE app.${table} (taken_at timestamp NOT NULL, label text) PARTITION BY RANGE (taken_at);
      CREATE TABLE app.${table}_gap PARTITION OF app.${table} FOR VALUES FROM ('${from}') TO ('${to}');
      CREATE TABLE app.${table}_rest PARTITION OF app.${table} FOR VALUES FROM ('${to}') TO (MAXVALUE);
      ${indexed ? `CREATE INDEX ON app.${table} (taken_at);` : ''}
      INSERT INTO app.${table} VALUES ('${newest}', 'newest'), ('${inGap}', 'in the gap'), ('${from}', 'oldest');`)
      const { rows } = await db.pool.query(
        `SELECT extract(epoch FROM now() - timestamptz '${cutoff}')::numeric(20,3)::text AS s`,
      )
      const node = createSingleton({
        name: `lc-gap-${table}`,
        connectionString: db.url,
        policies: [
          {
            name: 'readings',
            table: `app.${table}`,
            column: 'taken_at',
            timeZone: zone,
            olderThan: `${rows[0].s} seconds`,
            every: '1 hour',
            partitions: 'drop',
          },
        ],
      })
      node.on('error', () => {})
      node.on('warning', () => {})
      const done = once(node, 'cleanup:done') as Promise<[RunReport]>
      await node.start()
      const [report] = await done
      await node.stop()
      expect(report).toMatchObject({ status: 'done', rowsDeleted: 2 })
      const { rows: left } = await db.pool.query(`SELECT label FROM app.${table} ORDER BY label`)
      expect(left.map((r) => r.label)).toEqual(['in the gap'])
    },
  )

  it('a partition whose newest value is -infinity is removed, not probed for gaps forever', async () => {
    await db.pool.query(`CREATE TABLE app.inf (at timestamp NOT NULL) PARTITION BY RANGE (at);
      CREATE TABLE app.inf_old PARTITION OF app.inf FOR VALUES FROM (MINVALUE) TO ('2020-01-01');
      CREATE TABLE app.inf_new PARTITION OF app.inf FOR VALUES FROM ('2020-01-01') TO (MAXVALUE);
      CREATE INDEX ON app.inf (at);
      INSERT INTO app.inf VALUES ('-infinity'), ('-infinity');`)
    const node = createSingleton({
      name: 'lc-infinity',
      connectionString: db.url,
      policies: [
        {
          name: 'inf',
          table: 'app.inf',
          column: 'at',
          timeZone: 'America/New_York',
          olderThan: '1 day',
          every: '1 hour',
          partitions: 'drop',
        },
      ],
    })
    node.on('error', () => {})
    const done = once(node, 'cleanup:done') as Promise<[RunReport]>
    await node.start()
    const [report] = await done
    await node.stop()
    expect(report).toMatchObject({ status: 'done', rowsDeleted: 2 })
    expect(
      (await db.pool.query(`SELECT to_regclass('app.inf_old') IS NULL AS gone`)).rows[0].gone,
    ).toBe(true)
  })
})
