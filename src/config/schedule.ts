import { Cron } from 'croner'
import { parseInterval } from './interval.js'
import type { Problems } from './problems.js'

/**
 * When a policy or task runs: every fixed interval, or on a cron pattern read in an IANA
 * zone. Cron patterns are parsed by croner (a well-kept, dependency-free library) rather
 * than by us; a slot the zone's clocks skip (spring forward) runs once, at the first
 * instant after the gap, and a wall time the clocks pass twice (fall back) runs once, at
 * its first instant.
 */
export type Schedule =
  | { readonly every: string; readonly cron: null; readonly cronTimeZone: null }
  | { readonly every: null; readonly cron: string; readonly cronTimeZone: string }

/** How many slots a schedule may have missed before the count stops (the run still coalesces them). */
export const MAX_COUNTED_SLOTS = 10_000

/**
 * Reads `every` or `cron` (+ a zone) from a policy's or task's fields, reporting problems
 * in the caller's words. Exactly one of the two.
 */
export function resolveSchedule(
  record: Record<string, unknown>,
  zoneKey: 'timeZone' | 'cronTimeZone',
  defaultZone: string | undefined,
  where: string,
  problems: Problems,
): Schedule | undefined {
  const { every, cron } = record
  if ((every === undefined) === (cron === undefined)) {
    problems.add(
      `${where}: give either "every" (an interval such as "1 hour") or "cron" (such as "0 3 * * *"), not ${every === undefined ? 'neither' : 'both'}.`,
    )
    return undefined
  }
  if (every !== undefined) {
    if (typeof every !== 'string' || every.trim() === '') {
      problems.add(
        `${where}, field every: expected a non-empty string, got ${JSON.stringify(every)}.`,
      )
      return undefined
    }
    const parsed = parseInterval(every)
    if (!parsed.ok) {
      problems.add(`${where}, field every: "${every}" is refused: ${parsed.reason}.`)
      return undefined
    }
    return { every: parsed.canonical, cron: null, cronTimeZone: null }
  }
  if (typeof cron !== 'string' || cron.trim() === '') {
    problems.add(`${where}, field cron: expected a cron pattern, got ${JSON.stringify(cron)}.`)
    return undefined
  }
  const rawZone = record[zoneKey] ?? defaultZone ?? 'UTC'
  if (typeof rawZone !== 'string' || !/^[A-Za-z0-9_+\-/]{1,64}$/.test(rawZone)) {
    problems.add(
      `${where}, field ${zoneKey}: ${JSON.stringify(rawZone)} is not an IANA time zone name such as "UTC" or "Europe/Berlin".`,
    )
    return undefined
  }
  const fields = cron.trim().split(/\s+/)
  if (fields.length !== 5 && fields.length !== 6) {
    problems.add(
      `${where}, field cron: "${cron}" has ${fields.length} fields; a pattern has five (minute hour day month weekday) or six (with seconds first).`,
    )
    return undefined
  }
  try {
    const pattern = new Cron(fields.join(' '), {
      timezone: rawZone,
      paused: true,
      mode: '5-or-6-parts',
    })
    if (pattern.nextRun(new Date()) === null) throw new Error('it never comes due')
  } catch (error) {
    problems.add(
      `${where}, field cron: "${cron}" in zone "${rawZone}" is refused: ${cleanCronError(error)}.`,
    )
    return undefined
  }
  return { every: null, cron: fields.join(' '), cronTimeZone: rawZone }
}

function cleanCronError(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error)
  // croner's messages start with its class name and can quote a whole inner error.
  return (
    message
      .replace(/^(CronPattern|CronDate|CronOptions|Cron|toTZ):\s*/, '')
      .split('. Original error')[0]
      ?.replace(/\.$/, '') ?? message
  )
}

/**
 * The slots of a cron schedule after `from` (exclusive) up to `until` (inclusive), at most
 * MAX_COUNTED_SLOTS, and the first slot after `until`: what a holder needs to issue a due
 * run (how many slots it stands for) and to move the schedule on. Instants, so the
 * database's clock decides what is due.
 */
export function cronSlots(
  pattern: string,
  timeZone: string,
  from: Date,
  until: Date,
): { missed: number; next: Date } {
  const cron = new Cron(pattern, { timezone: timeZone, paused: true, mode: '5-or-6-parts' })
  let missed = 0
  let cursor = from
  for (;;) {
    const slot = cron.nextRun(cursor)
    if (slot === null)
      throw new Error(`cron "${pattern}" has no slot after ${cursor.toISOString()}`)
    if (slot.getTime() > until.getTime()) return { missed, next: slot }
    missed += 1
    cursor = slot
    if (missed >= MAX_COUNTED_SLOTS) {
      // Far behind: count no further, and move on from `until`.
      const next = cron.nextRun(until)
      if (next === null)
        throw new Error(`cron "${pattern}" has no slot after ${until.toISOString()}`)
      return { missed, next }
    }
  }
}

/** The first slot after `after`, and about how far apart its slots are (for "overdue"). */
export function cronNext(
  pattern: string,
  timeZone: string,
  after: Date,
): { next: Date; periodSeconds: number } {
  const cron = new Cron(pattern, { timezone: timeZone, paused: true, mode: '5-or-6-parts' })
  const [first, second] = cron.nextRuns(2, after)
  if (!first || !second)
    throw new Error(`cron "${pattern}" has no slots after ${after.toISOString()}`)
  return { next: first, periodSeconds: (second.getTime() - first.getTime()) / 1000 }
}

/** The next `count` slots after `after`, for `plan`. */
export function cronPreview(pattern: string, timeZone: string, after: Date, count: number): Date[] {
  return new Cron(pattern, { timezone: timeZone, paused: true, mode: '5-or-6-parts' }).nextRuns(
    count,
    after,
  )
}
