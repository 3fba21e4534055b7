import { SingletonError } from '../errors.js'

/** PostgreSQL truncates longer identifiers, which could silently aim at another table. */
const MAX_IDENTIFIER_BYTES = 63

export interface QualifiedName {
  schema: string
  name: string
}

/**
 * `schema.table` is split at the first dot; a bare name lives in `public`. Names are
 * taken literally: case, spaces and punctuation are kept, and the parts are only ever
 * used quoted (`quoteIdent`) or as bound parameters, never pasted into SQL.
 */
export function parseTableName(value: string, where: string): QualifiedName {
  const dot = value.indexOf('.')
  const qualified =
    dot === -1
      ? { schema: 'public', name: value }
      : { schema: value.slice(0, dot), name: value.slice(dot + 1) }
  checkIdentifier(qualified.schema, `${where} (schema part of "${value}")`)
  checkIdentifier(qualified.name, `${where} (table part of "${value}")`)
  return qualified
}

export function checkIdentifier(value: string, where: string): void {
  if (value.length === 0) {
    throw new SingletonError('INVALID_OPTION', `${where}: the name is empty.`)
  }
  if (value.includes('\0')) {
    throw new SingletonError(
      'INVALID_OPTION',
      `${where}: the name contains a NUL character, which PostgreSQL identifiers cannot hold.`,
    )
  }
  if (Buffer.byteLength(value, 'utf8') > MAX_IDENTIFIER_BYTES) {
    throw new SingletonError(
      'INVALID_OPTION',
      `${where}: "${value}" is longer than PostgreSQL's ${MAX_IDENTIFIER_BYTES}-byte identifier limit; PostgreSQL would truncate it and could name another object.`,
    )
  }
}

/** Quotes an identifier the way PostgreSQL's quote_ident() does: always, doubling quotes. */
export function quoteIdent(value: string): string {
  return `"${value.replaceAll('"', '""')}"`
}

export function quoteQualified({ schema, name }: QualifiedName): string {
  return `${quoteIdent(schema)}.${quoteIdent(name)}`
}
