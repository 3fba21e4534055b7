import type pg from 'pg'
import { INTERVAL_PARSE_ERRORS, sqlState } from '../db/sqlstate.js'
import { SingletonError } from '../errors.js'
import { quoteIdent, quoteQualified } from './identifier.js'
import type { ResolvedPolicy } from './policy.js'

const TIME_TYPES = ['timestamp with time zone', 'timestamp without time zone', 'date']

/**
 * Checks every policy against the database before anything is deleted: the table exists
 * and is a table, the column exists and holds a time, the intervals parse (PostgreSQL
 * parses them, so what is accepted here is exactly what the delete will use) and are
 * positive, and this role may delete. Looks up names as bound values in the catalogs,
 * so a hostile name can only fail to be found.
 */
export async function validatePolicies(
  pool: pg.Pool,
  policies: readonly ResolvedPolicy[],
): Promise<string[]> {
  const warnings: string[] = []
  for (const policy of policies) {
    const where = `policy "${policy.name}"`
    await checkInterval(pool, `${where}, field olderThan`, policy.olderThan, '0 seconds')
    await checkInterval(pool, `${where}, field every`, policy.every, '1 second')

    const { rows: tables } = await pool.query<{
      oid: number
      relkind: string
      can_delete: boolean
    }>(
      `SELECT c.oid, c.relkind, has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'DELETE') AS can_delete
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2`,
      [policy.table.schema, policy.table.name],
    )
    const table = tables[0]
    if (!table) {
      throw new SingletonError(
        'INVALID_POLICY',
        `${where}, field table: "${policy.tableText}" names no table (looked for table "${policy.table.name}" in schema "${policy.table.schema}"; names are case-sensitive and taken literally).`,
      )
    }
    if (table.relkind !== 'r' && table.relkind !== 'p') {
      throw new SingletonError(
        'INVALID_POLICY',
        `${where}, field table: "${policy.tableText}" is not a table (relkind ${table.relkind}); only tables can be cleaned.`,
      )
    }
    if (!table.can_delete) {
      throw new SingletonError(
        'INVALID_POLICY',
        `${where}, field table: the current role may not SELECT and DELETE on "${policy.tableText}"; grant both.`,
      )
    }

    const { rows: columns } = await pool.query<{ type: string; indexed: boolean }>(
      `SELECT format_type(a.atttypid, NULL) AS type,
              EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indkey[0] = a.attnum) AS indexed
         FROM pg_attribute a
        WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped`,
      [table.oid, policy.column],
    )
    const column = columns[0]
    if (!column) {
      throw new SingletonError(
        'INVALID_POLICY',
        `${where}, field column: table "${policy.tableText}" has no column "${policy.column}".`,
      )
    }
    if (!TIME_TYPES.includes(column.type)) {
      throw new SingletonError(
        'INVALID_POLICY',
        `${where}, field column: "${policy.column}" is ${column.type}; it must be timestamptz, timestamp or date to judge which rows are outdated.`,
      )
    }
    // Without an index that starts with the column, every batch scans the table from its
    // first page, past the dead rows of the batches before it: fine for small tables, slow
    // for big ones. Worth saying once, at start-up.
    if (!column.indexed) {
      warnings.push(
        `${where}: no index starts with column "${policy.column}" of "${policy.tableText}"; each batch scans the table. Consider CREATE INDEX ON ${quoteQualified(policy.table)} (${quoteIdent(policy.column)}).`,
      )
    }
  }
  return warnings
}

async function checkInterval(
  pool: pg.Pool,
  where: string,
  value: string,
  minimum: string,
): Promise<void> {
  let atLeast: boolean
  try {
    const { rows } = await pool.query<{ at_least: boolean }>(
      "SELECT $1::interval >= $2::interval AND $1::interval > interval '0' AS at_least",
      [value, minimum],
    )
    atLeast = rows[0]?.at_least === true
  } catch (error) {
    if (INTERVAL_PARSE_ERRORS.includes(sqlState(error) ?? '')) {
      throw new SingletonError(
        'INVALID_POLICY',
        `${where}: "${value}" is not a PostgreSQL interval (${(error as Error).message}); write e.g. '30 days' or '1 minute'.`,
        {
          cause: error,
        },
      )
    }
    throw error
  }
  if (!atLeast) {
    throw new SingletonError(
      'INVALID_POLICY',
      `${where}: "${value}" must be a positive interval of at least ${minimum}.`,
    )
  }
}
