import type pg from 'pg'
import { INTERVAL_PARSE_ERRORS, SQLSTATE, sqlState } from '../db/sqlstate.js'
import type { SingletonWarning } from '../events.js'
import {
  COLUMN_TYPES,
  type ColumnType,
  isTask,
  type PolicyDefinition,
  type RunDefinition,
  type TaskDefinition,
} from './definition.js'
import { quoteIdent, quoteQualified } from './identifier.js'
import type { ResolvedPolicy } from './policy.js'
import { Problems } from './problems.js'
import { type Schedule, zoneOffsetMinutes } from './schedule.js'
import type { ResolvedTask } from './task.js'

export interface ValidatedPolicies {
  readonly definitions: readonly PolicyDefinition[]
  /** The tasks' definitions (their schedules, checked against the database). */
  readonly tasks: readonly TaskDefinition[]
  /** Worth saying, not worth refusing (a column no index starts with, a legacy zone name). */
  readonly warnings: readonly SingletonWarning[]
  /** One line per policy: the definition as this node understood it, and its cut-off now. */
  readonly understood: readonly string[]
}

interface Leaf {
  leaf: number
  relation: string
  relkind: string
  strategy: string
  can_delete: boolean
}

/**
 * Checks every policy against the database before anything is deleted, and reports every
 * problem of every policy at once: the table exists and is a table; it and each of its
 * partitions or children may be read and deleted from; the column exists and holds a
 * time; a `timestamp` or `date` column says which zone its values are in, and the zone is
 * one PostgreSQL knows; the intervals are positive by PostgreSQL's own reading. Names are
 * looked up as bound values in the catalogs, so a hostile name can only fail to be found.
 */
export async function validatePolicies(
  pool: pg.Pool | pg.Client,
  policies: readonly ResolvedPolicy[],
  resolvedTasks: readonly ResolvedTask[] = [],
): Promise<ValidatedPolicies> {
  const problems = new Problems()
  const definitions: PolicyDefinition[] = []
  const warnings: SingletonWarning[] = []
  const understood: string[] = []
  for (const policy of policies) {
    const before = problems.count
    const where = `policy "${policy.name}"`
    await checkInterval(pool, problems, `${where}, field olderThan`, policy.olderThan, '0 seconds')
    const schedule = await checkSchedule(pool, problems, where, policy.schedule, 'cronTimeZone')

    const { rows: tables } = await pool.query<{ oid: number; relkind: string }>(
      `SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2`,
      [policy.table.schema, policy.table.name],
    )
    const table = tables[0]
    if (!table) {
      problems.add(
        `${where}, field table: "${policy.tableText}" names no table (looked for table "${policy.table.name}" in schema "${policy.table.schema}"; names are case-sensitive and taken literally).`,
      )
      continue
    }
    if (table.relkind !== 'r' && table.relkind !== 'p') {
      problems.add(
        `${where}, field table: "${policy.tableText}" is not a table (relkind ${table.relkind}); only tables can be cleaned.`,
      )
      continue
    }

    const { rows: columns } = await pool.query<{ type: string }>(
      `SELECT format_type(a.atttypid, NULL) AS type FROM pg_attribute a
        WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped`,
      [table.oid, policy.column],
    )
    const columnType = columns[0]?.type
    if (columnType === undefined) {
      problems.add(
        `${where}, field column: table "${policy.tableText}" has no column "${policy.column}".`,
      )
      continue
    }
    if (!(COLUMN_TYPES as readonly string[]).includes(columnType)) {
      problems.add(
        `${where}, field column: "${policy.column}" is ${columnType}; it must be timestamptz, timestamp or date to judge which rows are outdated.`,
      )
      continue
    }
    const timeZone = await checkZone(pool, problems, where, policy, columnType as ColumnType)

    const { rows: leaves } = await pool.query<Leaf>(
      'SELECT leaf, relation, relkind, strategy, can_delete FROM pgsingleton.cleanup_leaves($1, $2)',
      [table.oid, policy.column],
    )
    const foreign = leaves.filter((leaf) => leaf.relkind === 'f')
    if (foreign.length > 0) {
      problems.add(
        `${where}, field table: "${policy.tableText}" has foreign-table partitions (${foreign.map((l) => l.relation).join(', ')}); pg-singleton deletes only from tables in this database.`,
      )
    }
    const denied = leaves.filter((leaf) => !leaf.can_delete)
    if (denied.length > 0) {
      problems.add(
        `${where}, field table: the current role may not SELECT and DELETE on ${denied.map((l) => `"${l.relation}"`).join(', ')}; grant both${leaves.length > 1 ? ' (on every partition or child too: pg-singleton deletes from each of them directly)' : ''}.`,
      )
    }
    // Every table of the tree, the partitioned ones between the table and its leaves too (a
    // foreign key declared on a sub-partition that is itself partitioned is theirs), and the
    // tables above it when it is itself a partition or a child.
    // (A key declared on a table above is cloned onto this one, and acts when its rows go;
    // the rules of the tables above do not fire on a delete from it. Row security: every
    // table above a leaf, on any path, whose policies a delete from the leaf skips.)
    const { rows: tree } = await pool.query<{
      oid: number
      name: string
      above: boolean
      shielded: boolean
    }>(
      `WITH RECURSIVE tree(relid) AS (
         SELECT $1::oid
         UNION
         SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.relid WHERE NOT i.inhdetachpending),
       up(relid) AS (
         SELECT i.inhparent FROM pg_inherits i WHERE i.inhrelid = ANY ($2::oid[])
         UNION
         SELECT i.inhparent FROM pg_inherits i JOIN up u ON i.inhrelid = u.relid),
       every_table(relid, above) AS (
         SELECT relid, false FROM tree
         UNION ALL
         SELECT relid, true FROM up WHERE relid NOT IN (SELECT relid FROM tree))
       SELECT relid AS oid, relid::regclass::text AS name, above,
              relid IN (SELECT relid FROM up) AND row_security_active(relid) AS shielded
         FROM every_table`,
      [table.oid, leaves.map((l) => l.leaf)],
    )
    const own = [...new Set([table.oid, ...tree.filter((t) => !t.above).map((t) => t.oid)])]
    await checkSideEffects(
      pool,
      problems,
      where,
      policy,
      [...new Set([...own, ...tree.map((t) => t.oid), ...leaves.map((l) => l.leaf)])],
      [...new Set([...own, ...leaves.map((l) => l.leaf)])],
    )
    const shielded = tree.filter((t) => t.shielded)
    if (shielded.length > 0) {
      problems.add(
        `${where}, field table: row-level security on ${shielded.map((t) => `"${t.name}"`).join(', ')} applies to this role, and pg-singleton deletes from the partitions or children directly, where those policies would not apply. Clean with a role they do not apply to (the owner, or one with BYPASSRLS), or put the policies on the partitions themselves.`,
      )
    }
    if (policy.partitions !== 'delete') {
      await checkPartitioning(pool, problems, warnings, where, policy, table)
    }
    if (problems.count > before || timeZone === undefined || !schedule) continue
    const inverted = timeZone ? /^(?:posix\/)?Etc\/GMT([+-])(\d{1,2})$/i.exec(timeZone) : null
    if (inverted) {
      const east = inverted[1] === '-'
      warnings.push({
        code: 'LEGACY_ZONE_NAME',
        message: `${where}: timeZone "${timeZone}" is UTC${east ? '+' : '-'}${inverted[2]}, ${inverted[2]} hours ${east ? 'east' : 'west'} of UTC: in the Etc/GMT names the sign is inverted (POSIX style). A row written at local time in a zone at UTC${inverted[1]}${inverted[2]} would be judged ${2 * Number(inverted[2])} hours ${east ? 'older' : 'younger'} than it is. If the app writes the local time of a region, name the region, e.g. "America/Sao_Paulo".`,
      })
    } else if (
      timeZone &&
      !timeZone.includes('/') &&
      !['UTC', 'GMT', 'UCT', 'Zulu'].includes(timeZone)
    ) {
      warnings.push({
        code: 'LEGACY_ZONE_NAME',
        message: `${where}: timeZone "${timeZone}" is a legacy zone name, read from the zone database (never as an abbreviation); if the app writes the local time of a region, name the region, e.g. "America/New_York" or "Europe/Berlin".`,
      })
    }

    if (timeZone) {
      const warning = await columnZoneWarning(pool, where, timeZone, policy.olderThan)
      if (warning) warnings.push(warning)
    }

    // Without an index that starts with the column, each run reads the whole table, page
    // range by page range: fine for small tables, slow for big ones. Worth saying once.
    const unindexed = leaves.filter((leaf) => leaf.strategy !== 'index')
    if (unindexed.length > 0) {
      warnings.push({
        code: 'UNINDEXED_COLUMN',
        message: `${where}: no index starts with column "${policy.column}" of ${unindexed.map((l) => `"${l.relation}"`).join(', ')}; each run reads the whole table. Consider CREATE INDEX ON ${quoteQualified(policy.table)} (${quoteIdent(policy.column)}).`,
      })
    }
    const definition: PolicyDefinition = Object.freeze({
      name: policy.name,
      schema: policy.table.schema,
      table: policy.table.name,
      column: policy.column,
      columnType: columnType as ColumnType,
      timeZone,
      olderThan: policy.olderThan,
      ...schedule,
      batchSize: policy.batchSize,
      allowCascade: policy.allowCascade,
      partitions: policy.partitions,
    })
    definitions.push(definition)
    understood.push(await describe(pool, definition, leaves.length))
  }
  const tasks: TaskDefinition[] = []
  for (const task of resolvedTasks) {
    const schedule = await checkSchedule(
      pool,
      problems,
      `task "${task.name}"`,
      task.schedule,
      'timeZone',
    )
    if (!schedule) continue
    tasks.push(
      Object.freeze({
        kind: 'task' as const,
        name: task.name,
        ...schedule,
        ...(task.timeoutSeconds === null ? {} : { timeoutSeconds: task.timeoutSeconds }),
      }),
    )
    understood.push(
      `task "${task.name}": ${describeSchedule(schedule)}${task.timeoutSeconds === null ? '' : `, a run may take ${task.timeoutSeconds} s`}`,
    )
  }
  problems.throwIfAny('INVALID_POLICY')
  warnings.push(...(await checkCronZones(pool, [...definitions, ...tasks])))
  return { definitions, tasks, warnings, understood }
}

/**
 * The holder computes cron slots with this process's time zone rules (ICU's, which come
 * with Node); the database has its own. A cron zone whose rules the two read otherwise in
 * the coming year gets a warning (ZONE_RULES_DIFFER), once per zone: nodes that each agree
 * with the database agree with one another, and a node that does not says so at start.
 */
async function checkCronZones(
  pool: pg.Pool | pg.Client,
  scheduled: readonly RunDefinition[],
): Promise<SingletonWarning[]> {
  const users = new Map<string, string[]>()
  for (const item of scheduled) {
    if (item.cronTimeZone === null) continue
    const what = isTask(item) ? `task "${item.name}"` : `policy "${item.name}"`
    users.set(item.cronTimeZone, [...(users.get(item.cronTimeZone) ?? []), what])
  }
  const warnings: SingletonWarning[] = []
  for (const [zone, names] of users) {
    const warning = await cronZoneWarning(pool, zone, names)
    if (warning) warnings.push(warning)
  }
  return warnings
}

/**
 * Deleting a row can delete or change others: foreign keys that reference the table with
 * ON DELETE CASCADE, SET NULL or SET DEFAULT reach rows however young they are, and a
 * DELETE rule can do anything. A policy on such a table is refused unless it says
 * `allowCascade` (foreign keys only; rules are always refused).
 */
async function checkSideEffects(
  pool: pg.Pool | pg.Client,
  problems: Problems,
  where: string,
  policy: ResolvedPolicy,
  relations: number[],
  ruled: number[] = relations,
): Promise<void> {
  const { rows: keys } = await pool.query<{ key: string }>(
    `SELECT DISTINCT format('%s (%s) ON DELETE %s', c.conrelid::regclass, c.conname,
              CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' ELSE 'SET DEFAULT' END) AS key
       FROM pg_constraint c
      WHERE c.contype = 'f' AND c.confrelid = ANY ($1::oid[]) AND c.confdeltype IN ('c', 'n', 'd')
        AND c.conparentid = 0
      ORDER BY 1`,
    [relations],
  )
  if (keys.length > 0 && !policy.allowCascade) {
    problems.add(
      `${where}, field table: deleting outdated rows of "${policy.tableText}" would also delete or change the rows that reference them, however young: ${keys.map((k) => k.key).join(', ')}. Set "allowCascade": true to accept that, or change the foreign key.`,
    )
  }
  const { rows: rules } = await pool.query<{ rule: string }>(
    `SELECT format('%s on %s', r.rulename, r.ev_class::regclass) AS rule FROM pg_rewrite r
      WHERE r.ev_class = ANY ($1::oid[]) AND r.ev_type = '4' ORDER BY 1`,
    [ruled],
  )
  if (rules.length > 0) {
    problems.add(
      `${where}, field table: "${policy.tableText}" has DELETE rules (${rules.map((r) => r.rule).join(', ')}); a rule can make a delete do anything, so pg-singleton does not clean such tables.`,
    )
  }
}

/**
 * Removing partitions whole needs a range-partitioned table keyed by the column, and a
 * role that owns the partitions (and the table, to detach).
 */
async function checkPartitioning(
  pool: pg.Pool | pg.Client,
  problems: Problems,
  warnings: SingletonWarning[],
  where: string,
  policy: ResolvedPolicy,
  table: { oid: number; relkind: string },
): Promise<void> {
  const { rows } = await pool.query<{ keyed: boolean; owns: boolean; owns_parts: boolean }>(
    `SELECT pt.partstrat = 'r' AND pt.partnatts = 1
            AND pt.partattrs[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = $1 AND attname = $2) AS keyed,
            pg_has_role((SELECT relowner FROM pg_class WHERE oid = $1), 'USAGE') AS owns,
            coalesce(bool_and(pg_has_role(c.relowner, 'USAGE')), true) AS owns_parts
       FROM pg_partitioned_table pt
       LEFT JOIN pg_inherits i ON i.inhparent = pt.partrelid
       LEFT JOIN pg_class c ON c.oid = i.inhrelid
      WHERE pt.partrelid = $1
      GROUP BY pt.partstrat, pt.partnatts, pt.partattrs`,
    [table.oid, policy.column],
  )
  const info = rows[0]
  if (table.relkind !== 'p' || !info?.keyed) {
    problems.add(
      `${where}, field partitions: "${policy.partitions}" needs a table partitioned by range on "${policy.column}"; "${policy.tableText}" is not. Use "delete" (rows only).`,
    )
    return
  }
  if (!info.owns_parts || (policy.partitions === 'detach' && !info.owns)) {
    problems.add(
      `${where}, field partitions: to ${policy.partitions} partitions the role must own ${policy.partitions === 'detach' ? 'the table and ' : ''}its partitions; it does not.`,
    )
    return
  }
  // Removing a partition fires no DELETE trigger and would take rows a foreign key holds:
  // such partitions are cleaned row by row (remove_partition checks again at each run).
  const { rows: blockers } = await pool.query<{ what: string }>(
    `SELECT format('DELETE trigger %s on %s', t.tgname, t.tgrelid::regclass) AS what
       FROM pg_trigger t
       JOIN pg_inherits i ON i.inhparent = $1 AND t.tgrelid IN (i.inhrelid, i.inhparent)
      WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND (t.tgtype & 8) <> 0 AND t.tgparentid = 0
     UNION
     SELECT format('foreign key %s of %s', k.conname, k.conrelid::regclass)
       FROM pg_constraint k
      WHERE k.contype = 'f' AND k.conparentid = 0
        AND k.confrelid IN (SELECT $1 UNION SELECT inhrelid FROM pg_inherits WHERE inhparent = $1)
     ORDER BY 1`,
    [table.oid],
  )
  if (blockers.length > 0) {
    warnings.push({
      code: 'PARTITIONS_DELETED_BY_ROW',
      message: `${where}: partitions of "${policy.tableText}" are deleted row by row, not ${policy.partitions === 'drop' ? 'dropped' : 'detached'}, because of ${blockers.map((b) => b.what).join(', ')}.`,
    })
  }
}

/**
 * A `timestamp` or `date` value does not say which zone it was written in; read in the
 * session's TimeZone, UTC wall times in a database set to Asia/Tokyo look nine hours
 * older than they are. Such a column needs the policy to say its zone.
 */
async function checkZone(
  pool: pg.Pool | pg.Client,
  problems: Problems,
  where: string,
  policy: ResolvedPolicy,
  columnType: ColumnType,
): Promise<string | null | undefined> {
  if (columnType === 'timestamp with time zone') return null
  if (policy.timeZone === undefined) {
    const kind = columnType === 'date' ? 'a date' : 'a timestamp without time zone'
    problems.add(
      `${where}, field timeZone: column "${policy.column}" is ${kind}, which does not say which zone its values are in, so pg-singleton will not guess (the database session's TimeZone would decide, and rows could be judged hours older than they are). Add the zone the app writes them in, e.g. "timeZone": "UTC".`,
    )
    return undefined
  }
  const { rows } = await pool.query<{ name: string }>(
    'SELECT name FROM pg_timezone_names WHERE lower(name) = lower($1) ORDER BY name = $1 DESC LIMIT 1',
    [policy.timeZone],
  )
  const name = rows[0]?.name
  if (!name) {
    problems.add(
      `${where}, field timeZone: "${policy.timeZone}" is not a time zone PostgreSQL knows (see pg_timezone_names); use an IANA name such as "UTC" or "Europe/Berlin".`,
    )
    return undefined
  }
  return name
}

/**
 * A schedule by PostgreSQL's reading: an `every` of at least a second, or a cron zone
 * PostgreSQL knows (spelled as its catalog spells it). Undefined after a problem.
 */
export async function checkSchedule(
  pool: pg.Pool | pg.Client,
  problems: Problems,
  where: string,
  schedule: Schedule,
  zoneField: 'timeZone' | 'cronTimeZone',
): Promise<Schedule | undefined> {
  if (schedule.every !== null) {
    const before = problems.count
    await checkInterval(pool, problems, `${where}, field every`, schedule.every, '1 second')
    return problems.count > before ? undefined : schedule
  }
  const { rows } = await pool.query<{ name: string }>(
    'SELECT name FROM pg_timezone_names WHERE lower(name) = lower($1) ORDER BY name = $1 DESC LIMIT 1',
    [schedule.cronTimeZone],
  )
  const name = rows[0]?.name
  if (!name) {
    problems.add(
      `${where}, field ${zoneField}: "${schedule.cronTimeZone}" is not a time zone PostgreSQL knows (see pg_timezone_names); use an IANA name such as "UTC" or "Europe/Berlin".`,
    )
    return undefined
  }
  return { every: null, cron: schedule.cron, cronTimeZone: name }
}

/**
 * The warning for cron zone `zone` (used by `names`) when this process reads it otherwise
 * than the database in the coming year; `nodeZone` is the zone this process reads (the
 * same, but for a test that needs two zones to disagree).
 */
export async function cronZoneWarning(
  pool: pg.Pool | pg.Client,
  zone: string,
  names: readonly string[],
  nodeZone = zone,
): Promise<SingletonWarning | null> {
  const differs = await zoneRulesDiffer(pool, zone, nodeZone)
  if (!differs) return null
  return {
    code: 'ZONE_RULES_DIFFER',
    message: `${names.join(', ')}: ${rulesPart(`cron zone "${zone}"`, differs)} The holder computes cron slots with its own rules, so nodes whose rules differ can put a slot at different instants (a run an hour off, or, across a takeover, a slot run twice or not at all). Update Node or the server's time zone data so that they agree.`,
  }
}

/**
 * The warning for the zone of a `timestamp` or `date` column when this process reads it
 * otherwise than the database, over the past and the coming 400 days: the database judges
 * which rows are outdated with its rules, and an app that writes local times with other
 * rules (this Node's, say) writes rows that look older or younger than they are.
 */
export async function columnZoneWarning(
  pool: pg.Pool | pg.Client,
  where: string,
  zone: string,
  olderThan: string,
  nodeZone = zone,
): Promise<SingletonWarning | null> {
  const differs = await zoneRulesDiffer(pool, zone, nodeZone, 400)
  if (!differs) return null
  return {
    code: 'ZONE_RULES_DIFFER',
    message: `${where}, field timeZone: ${rulesPart(`zone "${zone}"`, differs)} Which rows are outdated is judged with the database's rules; if the app writes the column's local times with other rules (this Node's, say), a row written then is judged ${Math.abs(differs.database - differs.node)} minutes ${differs.database > differs.node ? 'older' : 'younger'} than it is (olderThan is ${olderThan}). Update Node or the server's time zone data so that they agree.`,
  }
}

function rulesPart(
  what: string,
  differs: { at: Date; now: boolean; node: number; database: number },
): string {
  const utc = (minutes: number) =>
    `UTC${minutes < 0 ? '-' : '+'}${String(Math.floor(Math.abs(minutes) / 60)).padStart(2, '0')}:${String(Math.abs(minutes) % 60).padStart(2, '0')}`
  return `this node's rules for ${what} (Node ${process.version}, time zone data ${process.versions.tz ?? 'unknown'}) and the database's disagree ${differs.now ? 'now' : `at ${differs.at.toISOString()}`}: ${utc(differs.node)} here, ${utc(differs.database)} in PostgreSQL.`
}

/**
 * The first hour at which the offset from UTC of `nodeZone` by this process's rules (ICU's)
 * differs from that of `databaseZone` by the database's, or null: over the coming 400
 * days, and the `pastDays` before now. `now` when they differ in the current hour.
 */
export async function zoneRulesDiffer(
  pool: pg.Pool | pg.Client,
  databaseZone: string,
  nodeZone: string,
  pastDays = 0,
): Promise<{ at: Date; now: boolean; node: number; database: number } | null> {
  // The database's offsets at every hour, sent as the hours where they change (and the
  // first and the current one): a step function, exact to the hour.
  const { rows } = await pool.query<{ at: Date; offset: number; current: boolean; last: Date }>(
    `WITH hours AS (
       SELECT t, (extract(epoch FROM (t AT TIME ZONE $1) - (t AT TIME ZONE 'UTC')) / 60)::int AS o
         FROM generate_series(date_trunc('hour', now()) - make_interval(days => $2),
                              date_trunc('hour', now()) + interval '400 days', interval '1 hour') AS t)
     SELECT t AS at, o AS offset, t = date_trunc('hour', now()) AS current,
            date_trunc('hour', now()) + interval '400 days' AS last
       FROM (SELECT t, o, lag(o) OVER (ORDER BY t) AS before FROM hours) AS h
      WHERE before IS DISTINCT FROM o OR t = date_trunc('hour', now())
      ORDER BY t`,
    [databaseZone, pastDays],
  )
  const first = rows[0]
  if (!first) return null
  const HOUR = 3_600_000
  const database = (at: number) => {
    let offset = first.offset
    for (const row of rows) if (row.at.getTime() <= at) offset = row.offset
    return offset
  }
  const node = (at: number) => zoneOffsetMinutes(new Date(at), nodeZone)
  // This process's step function, found day by day and, where a day ends at another offset
  // than it began, hour by hour within it.
  const start = first.at.getTime()
  const end = first.last.getTime()
  const points = new Set<number>(rows.map((row) => row.at.getTime()))
  let day = start
  let offset = node(day)
  while (day < end) {
    const next = Math.min(day + 24 * HOUR, end)
    const after = node(next)
    if (after !== offset) for (let hour = day + HOUR; hour <= next; hour += HOUR) points.add(hour)
    offset = after
    day = next
  }
  const current = rows.find((row) => row.current)?.at.getTime()
  for (const at of [...points].sort((a, b) => a - b)) {
    const here = node(at)
    const there = database(at)
    if (here !== there)
      return { at: new Date(at), now: at === current, node: here, database: there }
  }
  return null
}

/** How a schedule reads in a log line. */
export function describeSchedule(schedule: {
  every: string | null
  cron: string | null
  cronTimeZone: string | null
}): string {
  return schedule.every !== null
    ? `every ${schedule.every}`
    : `on cron "${schedule.cron}" in ${schedule.cronTimeZone}`
}

async function checkInterval(
  pool: pg.Pool | pg.Client,
  problems: Problems,
  where: string,
  value: string,
  minimum: string,
): Promise<void> {
  try {
    const { rows } = await pool.query<{ at_least: boolean }>(
      "SELECT $1::interval >= $2::interval AND $1::interval > interval '0' AS at_least",
      [value, minimum],
    )
    if (rows[0]?.at_least !== true) {
      problems.add(`${where}: "${value}" must be a positive interval of at least ${minimum}.`)
      return
    }
    // Readable, but so long that now() minus it (the cut-off) or plus it (the next slot) is
    // past the range of a timestamp.
    await pool.query(
      'SELECT now() - $1::interval, now() + $1::interval, now() + 2 * $1::interval',
      [value],
    )
  } catch (error) {
    if (sqlState(error) === SQLSTATE.DATETIME_FIELD_OVERFLOW) {
      problems.add(
        `${where}: "${value}" is too long: now() minus or plus it is outside the range of a PostgreSQL timestamp.`,
      )
      return
    }
    if (!INTERVAL_PARSE_ERRORS.includes(sqlState(error) ?? '')) throw error
    problems.add(`${where}: PostgreSQL cannot read "${value}" (${(error as Error).message}).`)
  }
}

async function describe(
  pool: pg.Pool | pg.Client,
  definition: PolicyDefinition,
  leaves: number,
): Promise<string> {
  const { rows } = await pool.query<{ older: string; every: string | null; cutoff: Date }>(
    'SELECT $1::interval::text AS older, $2::interval::text AS every, pgsingleton.cutoff($1::interval) AS cutoff',
    [definition.olderThan, definition.every],
  )
  const row = rows[0]
  const zone = definition.timeZone
    ? `, read in zone ${definition.timeZone}`
    : ' (timestamptz: needs no zone)'
  const parts = leaves > 1 ? `, ${leaves} partitions or children` : ''
  return (
    `policy "${definition.name}": delete rows of ${quoteQualified({ schema: definition.schema, name: definition.table })}${parts} ` +
    `whose ${quoteIdent(definition.column)} (${definition.columnType}${zone}) is older than ${definition.olderThan} ` +
    `(PostgreSQL: '${row?.older}'); cut-off now ${row?.cutoff.toISOString()}; ${describeSchedule(definition)}${row?.every ? ` ('${row.every}')` : ''}; at most ${definition.batchSize} rows a batch`
  )
}
