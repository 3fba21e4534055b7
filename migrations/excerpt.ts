/** A piece of an earlier step's SQL, from `start` through the first `end` after it, for a way back. */
export function excerpt(sql: string, start: string, end: string): string {
  const from = sql.indexOf(start)
  const to = sql.indexOf(end, from)
  if (from < 0 || to < 0) throw new Error(`the earlier step has no ${start}`)
  return sql.slice(from, to + end.length)
}
