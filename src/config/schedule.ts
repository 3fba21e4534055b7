import { Cron } from 'croner'
import { parseInterval } from './interval.js'
import type { Problems } from './problems.js'

/**
 * When a policy or task runs: every fixed interval, or on a cron pattern read in an IANA
 * zone. Cron patterns are parsed by croner (a well-kept, dependency-free library) rather
 * than by us; a slot the zone's clocks skip (spring forward) runs once, at the first
 * instant after the gap. A wall time the clocks pass twice (fall back) runs once, at its
 * first instant, for a pattern that names its hours (`30 2 * * *`, `0,30 1-2 * * *`): as
 * in Vixie cron, a slot whose wall time is not after the previous slot's is dropped. A
 * pattern whose hour field is `*` runs on every real hour and minute it names, the
 * repeated hour included.
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

const wallFormats = new Map<string, Intl.DateTimeFormat>()
const DAY_MS = 86_400_000

/** `date` as a wall time in `zone`, "YYYY-MM-DD HH:MM:SS", comparable as a string. */
function wallTime(date: Date, zone: string): string {
  let format = wallFormats.get(zone)
  if (!format) {
    format = new Intl.DateTimeFormat('sv-SE', {
      timeZone: zone,
      year: 'numeric',
      month: '2-digit',
      day: '2-digit',
      hour: '2-digit',
      minute: '2-digit',
      second: '2-digit',
      hourCycle: 'h23',
    })
    wallFormats.set(zone, format)
  }
  return format.format(date)
}

/** The offset from UTC of `zone` at `date`, in minutes east, by this process's time zone data (ICU's). */
export function zoneOffsetMinutes(date: Date, zone: string): number {
  const wall = Date.parse(`${wallTime(date, zone).replace(' ', 'T')}Z`)
  return Math.round((wall - Math.floor(date.getTime() / 1000) * 1000) / 60_000)
}

/** A pattern and its zone, whose slots never repeat a wall time when its hours are named. */
class Slots {
  readonly #cron: Cron
  readonly #wallCron: Cron
  readonly #fixedHours: boolean
  /** A stretch of time over which the zone's offset was found not to change. */
  #steady: { from: number; to: number } | undefined

  constructor(
    readonly pattern: string,
    readonly zone: string,
  ) {
    this.#cron = new Cron(pattern, { timezone: zone, paused: true, mode: '5-or-6-parts' })
    // The same pattern over wall times (held as UTC dates), to ask what a gap skipped.
    this.#wallCron = new Cron(pattern, { timezone: 'UTC', paused: true, mode: '5-or-6-parts' })
    const fields = pattern.split(' ')
    this.#fixedHours = fields[fields.length === 6 ? 2 : 1] !== '*'
  }

  /** The first slot after `after`, or null when the pattern has none. */
  next(after: Date): Date | null {
    const slot = this.#nextByCroner(after)
    // croner moves a lone slot of a skipped hour to the gap's end, and drops a skipped hour
    // that holds several (`0,30 2 * * *` had no slot that day): the gap's end is a slot
    // whenever the pattern names a wall time inside the gap.
    const gap = this.#skippedSlotBetween(after, slot ?? new Date(after.getTime() + 400 * DAY_MS))
    return gap ?? slot
  }

  #nextByCroner(after: Date): Date | null {
    const floor = this.#fixedHours ? wallTime(after, this.zone) : undefined
    let cursor = after
    // A repeated hour holds at most 3600 slots of a six-field pattern.
    for (let i = 0; i < 4000; i++) {
      const slot = this.#cron.nextRun(cursor)
      if (slot === null) return null
      if (floor === undefined || wallTime(slot, this.zone) > floor) return slot
      cursor = slot
    }
    return null
  }

  /**
   * The end of the first gap (clocks moved forward) in (`after`, `until`] whose skipped
   * wall times hold a slot of the pattern, or null. The zone's offset is compared a day
   * apart at most, and a change is found to the millisecond by halving; a stretch found
   * steady is remembered, so a pattern of many slots a day asks the zone twice a day.
   */
  #skippedSlotBetween(after: Date, until: Date): Date | null {
    let from = after.getTime()
    const end = until.getTime()
    const steady = this.#steady
    if (steady && steady.from <= from && end <= steady.to) return null
    let offset = zoneOffsetMinutes(after, this.zone)
    while (from < end) {
      const to = from + DAY_MS
      const later = zoneOffsetMinutes(new Date(to), this.zone)
      if (later === offset) {
        this.#steady = { from, to }
        from = to
        continue
      }
      let lo = from
      let hi = to
      while (hi - lo > 1) {
        const mid = Math.floor((lo + hi) / 2)
        if (zoneOffsetMinutes(new Date(mid), this.zone) === offset) lo = mid
        else hi = mid
      }
      this.#steady = { from, to: lo }
      if (hi > end) return null
      const jumped = zoneOffsetMinutes(new Date(hi), this.zone) - offset
      if (jumped > 0) {
        // The skipped wall times, as UTC dates: [the wall time at the gap's end - jump, it).
        const wallEnd = Date.parse(`${wallTime(new Date(hi), this.zone).replace(' ', 'T')}Z`)
        const first = this.#wallCron.nextRun(new Date(wallEnd - jumped * 60_000 - 1))
        if (first !== null && first.getTime() < wallEnd) return new Date(hi)
      }
      offset += jumped
      from = hi
    }
    return null
  }

  nextOrThrow(after: Date): Date {
    const slot = this.next(after)
    if (slot === null)
      throw new Error(`cron "${this.pattern}" has no slot after ${after.toISOString()}`)
    return slot
  }
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
  const slots = new Slots(pattern, timeZone)
  let missed = 0
  let cursor = from
  for (;;) {
    const slot = slots.nextOrThrow(cursor)
    if (slot.getTime() > until.getTime()) return { missed, next: slot }
    missed += 1
    cursor = slot
    // Far behind: count no further, and move on from `until`.
    if (missed >= MAX_COUNTED_SLOTS) return { missed, next: slots.nextOrThrow(until) }
  }
}

/** The first slot after `after`, and the longest gap between its slots (for "overdue"). */
export function cronNext(
  pattern: string,
  timeZone: string,
  after: Date,
): { next: Date; periodSeconds: number } {
  const next = new Slots(pattern, timeZone).nextOrThrow(after)
  return { next, periodSeconds: cronPeriodSeconds(pattern, timeZone, next) }
}

/**
 * The longest gap between a schedule's slots, which "overdue" counts in (two of them
 * without a success): over a year of slots from `from`, or PERIOD_SLOTS of them, so that
 * `0 3 * * 1-5` has three days (the weekend), not the one day between its next two slots.
 * A pattern of more than PERIOD_SLOTS slots a year gets the longest gap among its first
 * PERIOD_SLOTS (`* 9-17 * * 1-5` still sees a weekend; a six-field pattern of every second
 * in office hours does not). Worked out once per pattern and zone in a process; the
 * holder does it before its first tick, outside the tick's transaction.
 */
export function cronPeriodSeconds(pattern: string, timeZone: string, from = new Date()): number {
  const key = `${timeZone}\n${pattern}`
  let period = longestGaps.get(key)
  if (period === undefined) {
    const slots = new Slots(pattern, timeZone)
    let previous = slots.nextOrThrow(from)
    const horizon = previous.getTime() + 366 * 86_400_000
    period = 0
    for (let i = 0; i < PERIOD_SLOTS; i++) {
      const slot = slots.nextOrThrow(previous)
      period = Math.max(period, slot.getTime() - previous.getTime())
      previous = slot
      if (slot.getTime() > horizon) break
    }
    if (longestGaps.size >= 1000) longestGaps.clear()
    longestGaps.set(key, period)
  }
  return period / 1000
}

const PERIOD_SLOTS = 10_000
const longestGaps = new Map<string, number>()

/** The next `count` slots after `after`, for `plan`. */
export function cronPreview(pattern: string, timeZone: string, after: Date, count: number): Date[] {
  const slots = new Slots(pattern, timeZone)
  const out: Date[] = []
  let cursor = after
  while (out.length < count) {
    const slot = slots.next(cursor)
    if (slot === null) break
    out.push(slot)
    cursor = slot
  }
  return out
}
