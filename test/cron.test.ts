import { describe, expect, it } from 'vitest'
import { Problems } from '../src/config/problems.js'
import { cronNext, cronSlots, resolveSchedule } from '../src/config/schedule.js'

const utc = (iso: string) => new Date(`${iso}Z`)
const iso = (dates: Date[]) => dates.map((d) => d.toISOString())

/** The slots of a pattern after `from` up to `until`, by walking cronSlots one slot at a time. */
function slotsBetween(pattern: string, zone: string, from: Date, until: Date): Date[] {
  const out: Date[] = []
  let cursor = from
  for (;;) {
    const { next } = cronSlots(pattern, zone, cursor, cursor)
    if (next.getTime() > until.getTime()) return out
    out.push(next)
    cursor = next
  }
}

describe('cron schedules in a time zone, across daylight-saving changes', () => {
  it('03:00 every day in Europe/Berlin is 02:00 UTC in winter and 01:00 UTC in summer', () => {
    expect(
      iso(
        slotsBetween(
          '0 3 * * *',
          'Europe/Berlin',
          utc('2026-03-27T12:00:00'),
          utc('2026-03-31T00:00:00'),
        ),
      ),
    ).toEqual([
      '2026-03-28T02:00:00.000Z',
      '2026-03-29T01:00:00.000Z', // clocks went forward at 02:00 that night
      '2026-03-30T01:00:00.000Z',
    ])
  })

  it('a slot in the hour the clocks skip runs once that day, at the first instant after the gap', () => {
    // Europe/Berlin skips 02:00-03:00 on 2026-03-29; America/New_York 02:00-03:00 on 2026-03-08.
    const berlin = slotsBetween(
      '30 2 * * *',
      'Europe/Berlin',
      utc('2026-03-28T12:00:00'),
      utc('2026-03-30T12:00:00'),
    )
    expect(iso(berlin)).toEqual(['2026-03-29T01:00:00.000Z', '2026-03-30T00:30:00.000Z'])
    const newYork = slotsBetween(
      '0 2 * * *',
      'America/New_York',
      utc('2026-03-07T12:00:00'),
      utc('2026-03-09T12:00:00'),
    )
    expect(iso(newYork)).toEqual(['2026-03-08T07:00:00.000Z', '2026-03-09T06:00:00.000Z'])
  })

  it('a skipped hour that holds several slots of the pattern runs once, at the gap end, and the rest of the day as usual', () => {
    // croner alone gave no slot that day for these: a lost run.
    for (const pattern of ['0,30 2 * * *', '15,45 2 * * *', '*/20 2 * * *']) {
      expect(
        iso(
          slotsBetween(
            pattern,
            'Europe/Berlin',
            utc('2026-03-29T00:00:00'),
            utc('2026-03-29T23:59:00'),
          ),
        ),
        pattern,
      ).toEqual(['2026-03-29T01:00:00.000Z'])
    }
    expect(
      iso(
        slotsBetween(
          '30 2,4 * * *',
          'Europe/Berlin',
          utc('2026-03-29T00:00:00'),
          utc('2026-03-29T23:59:00'),
        ),
      ),
    ).toEqual(['2026-03-29T01:00:00.000Z', '2026-03-29T02:30:00.000Z'])
    expect(
      iso(
        slotsBetween(
          '0,30 2 * * *',
          'America/New_York',
          utc('2026-03-07T12:00:00'),
          utc('2026-03-09T12:00:00'),
        ),
      ),
    ).toEqual(['2026-03-08T07:00:00.000Z', '2026-03-09T06:00:00.000Z', '2026-03-09T06:30:00.000Z'])
    // Counted too, when a holder was away across the day.
    expect(
      cronSlots(
        '0,30 2 * * *',
        'Europe/Berlin',
        utc('2026-03-28T01:30:00'),
        utc('2026-03-30T00:10:00'),
      ),
    ).toEqual({ missed: 2, next: utc('2026-03-30T00:30:00') })
    // A skipped hour the pattern names no time in adds no slot.
    expect(
      iso(
        slotsBetween(
          '0 5 * * *',
          'Europe/Berlin',
          utc('2026-03-28T12:00:00'),
          utc('2026-03-30T12:00:00'),
        ),
      ),
    ).toEqual(['2026-03-29T03:00:00.000Z', '2026-03-30T03:00:00.000Z'])
  })

  it('a wall time the clocks pass twice runs once, at its first instant', () => {
    // Europe/Berlin passes 02:00-03:00 twice on 2026-10-25; America/New_York 01:00-02:00 on 2026-11-01.
    const berlin = slotsBetween(
      '30 2 * * *',
      'Europe/Berlin',
      utc('2026-10-24T12:00:00'),
      utc('2026-10-26T12:00:00'),
    )
    expect(iso(berlin)).toEqual(['2026-10-25T00:30:00.000Z', '2026-10-26T01:30:00.000Z'])
    const newYork = slotsBetween(
      '0 1 * * *',
      'America/New_York',
      utc('2026-10-31T12:00:00'),
      utc('2026-11-02T12:00:00'),
    )
    expect(iso(newYork)).toEqual(['2026-11-01T05:00:00.000Z', '2026-11-02T06:00:00.000Z'])
  })

  it('a pattern naming several times in the doubled hour runs each wall time once', () => {
    // croner alone gives 02:00 and 02:30 twice in Berlin, and 01:00 twice in New York.
    const berlin = slotsBetween(
      '0,30 2 * * *',
      'Europe/Berlin',
      utc('2026-10-24T12:00:00'),
      utc('2026-10-25T12:00:00'),
    )
    expect(iso(berlin)).toEqual(['2026-10-25T00:00:00.000Z', '2026-10-25T00:30:00.000Z'])
    const newYork = slotsBetween(
      '0 1-2 * * *',
      'America/New_York',
      utc('2026-10-31T12:00:00'),
      utc('2026-11-01T12:00:00'),
    )
    expect(iso(newYork)).toEqual(['2026-11-01T05:00:00.000Z', '2026-11-01T07:00:00.000Z'])
    // Counted the same way when a holder catches up over the night.
    expect(
      cronSlots(
        '0,30 2 * * *',
        'Europe/Berlin',
        utc('2026-10-24T12:00:00'),
        utc('2026-10-25T12:00:00'),
      ).missed,
    ).toBe(2)
  })

  it('an hourly pattern runs every real hour through the doubled hour (each is a distinct instant)', () => {
    const slots = slotsBetween(
      '0 * * * *',
      'Europe/Berlin',
      utc('2026-10-24T23:30:00'),
      utc('2026-10-25T02:30:00'),
    )
    expect(iso(slots)).toEqual([
      '2026-10-25T00:00:00.000Z',
      '2026-10-25T01:00:00.000Z',
      '2026-10-25T02:00:00.000Z',
    ])
  })

  it('counts the slots missed while nobody held, and gives the first one after now', () => {
    // Due at 03:00 UTC on the 1st; the holder comes back on the 5th at 12:00.
    expect(
      cronSlots('0 3 * * *', 'UTC', utc('2026-06-01T03:00:00'), utc('2026-06-05T12:00:00')),
    ).toEqual({
      missed: 4,
      next: utc('2026-06-06T03:00:00'),
    })
    // Six fields: seconds first.
    expect(
      cronSlots('*/10 * * * * *', 'UTC', utc('2026-06-01T00:00:00'), utc('2026-06-01T00:00:35')),
    ).toEqual({
      missed: 3,
      next: utc('2026-06-01T00:00:40'),
    })
  })

  it('gives the next slot and the longest gap between slots, which overdue counts in', () => {
    expect(cronNext('0 3 * * 1', 'UTC', utc('2026-06-01T12:00:00'))).toEqual({
      next: utc('2026-06-08T03:00:00'),
      periodSeconds: 7 * 86_400,
    })
    // Weekdays: the weekend's gap, from a Tuesday too, where the next two slots are a day apart.
    expect(cronNext('0 3 * * 1-5', 'UTC', utc('2026-06-02T12:00:00'))).toEqual({
      next: utc('2026-06-03T03:00:00'),
      periodSeconds: 3 * 86_400,
    })
    // Twice a day at uneven hours, and the first of each month.
    expect(cronNext('0 3,9 * * *', 'UTC', utc('2026-06-02T12:00:00')).periodSeconds).toBe(18 * 3600)
    expect(cronNext('0 0 1 * *', 'UTC', utc('2026-06-02T12:00:00')).periodSeconds).toBe(31 * 86_400)
  })

  it('refuses, naming the field, a pattern of the wrong shape, a value out of range, both every and cron, or neither', () => {
    const problems = (record: Record<string, unknown>) => {
      const p = new Problems()
      resolveSchedule(record, 'timeZone', undefined, 'task "t"', p)
      try {
        p.throwIfAny('INVALID_OPTION')
        return ''
      } catch (error) {
        return (error as Error).message
      }
    }
    expect(problems({ cron: '* * * *' })).toMatch(
      /task "t", field cron: "\* \* \* \*" has 4 fields/,
    )
    expect(problems({ cron: '61 * * * *' })).toMatch(
      /task "t", field cron: "61 \* \* \* \*" in zone "UTC" is refused: .*minute/,
    )
    expect(problems({ cron: '0 3 * * *', timeZone: 'Mars/Olympus' })).toMatch(
      /task "t", field cron: .*"Mars\/Olympus".* is refused/,
    )
    expect(problems({ cron: '0 3 * * *', every: '1 hour' })).toMatch(
      /either "every" .* or "cron" .*, not both/,
    )
    expect(problems({})).toMatch(/not neither/)
    expect(problems({ every: '30' })).toMatch(/field every: "30" is refused/)
    expect(problems({ cron: '0 3 * * *', timeZone: 'Europe/Berlin' })).toBe('')
  })
})
