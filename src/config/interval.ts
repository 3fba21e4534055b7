/**
 * The only interval forms pg-singleton accepts: one or more `<number> <unit>` terms, the
 * unit spelled out. PostgreSQL reads far more, and some of it silently means something
 * else than it seems: `'30'` is 30 seconds, `'6M'` and `'1 m'` are minutes, `'1:30'` is
 * 90 minutes, and mixed signs (`'-1 year 361 days'`) compare as positive yet move a
 * cut-off into the future on some dates. A retention interval that is misread deletes
 * rows, so anything but the plain form is refused before it reaches the database.
 */

const UNITS = ['second', 'minute', 'hour', 'day', 'week', 'month', 'year'] as const
export type IntervalUnit = (typeof UNITS)[number]

export interface IntervalTerm {
  readonly amount: string
  readonly unit: IntervalUnit
}

export type ParsedInterval =
  | { ok: true; terms: readonly IntervalTerm[]; canonical: string }
  | { ok: false; reason: string }

const ABBREVIATIONS = /^(s|secs?|m|mins?|h|hrs?|d|w|mons?|y|yrs?|ms|msecs?|us|usecs?)$/i
const TERM = /^(\d+(?:\.\d+)?)\s+([a-z]+)$/i
const EXAMPLE =
  'write one or more "<number> <unit>" terms with the unit spelled out (seconds, minutes, hours, days, weeks, months or years), e.g. "30 days" or "1 hour 30 minutes"'

export const INTERVAL_FORM_HINT = EXAMPLE

/**
 * Parses `value` by the strict grammar. The canonical form (`"1 day 12 hours"`) is what
 * reaches PostgreSQL, always as a bound parameter, and what definitions are compared by.
 */
export function parseInterval(value: unknown): ParsedInterval {
  if (typeof value !== 'string') return { ok: false, reason: `expected a string; ${EXAMPLE}` }
  const text = value.trim()
  if (text === '') return { ok: false, reason: `it is empty; ${EXAMPLE}` }
  const why = whyRefused(text)
  if (why) return { ok: false, reason: `${why}; ${EXAMPLE}` }
  const words = text.split(/\s+/)
  if (words.length % 2 !== 0) return { ok: false, reason: `every number needs a unit; ${EXAMPLE}` }
  const terms: IntervalTerm[] = []
  for (let i = 0; i < words.length; i += 2) {
    const match = TERM.exec(`${words[i]} ${words[i + 1]}`)
    const unit = match ? toUnit(match[2] as string) : undefined
    if (match && !unit && ABBREVIATIONS.test(match[2] as string)) {
      return {
        ok: false,
        reason: `"${match[2]}" is an abbreviation, and abbreviations are refused (PostgreSQL reads "m" and "M" as minutes, not months); ${EXAMPLE}`,
      }
    }
    if (!match || !unit) {
      return {
        ok: false,
        reason: `"${words[i]} ${words[i + 1]}" is not a "<number> <unit>" term; ${EXAMPLE}`,
      }
    }
    const amount = normalizeNumber(match[1] as string)
    if (Number(amount) <= 0) {
      return { ok: false, reason: `"${words[i]} ${words[i + 1]}" is not positive; ${EXAMPLE}` }
    }
    if (amount.includes('.') && (unit === 'month' || unit === 'year')) {
      return {
        ok: false,
        reason: `"${words[i]} ${words[i + 1]}": months and years must be whole numbers (PostgreSQL rounds a fraction of a year down to whole months, so "0.01 years" is nothing at all); write "18 months" rather than "1.5 years"; ${EXAMPLE}`,
      }
    }
    if ((amount.split('.')[1] ?? '').length > 6) {
      return {
        ok: false,
        reason: `"${words[i]} ${words[i + 1]}" has more than 6 decimals, finer than PostgreSQL's microseconds; ${EXAMPLE}`,
      }
    }
    if (terms.some((t) => t.unit === unit)) {
      return { ok: false, reason: `"${unit}" appears twice; give each unit once; ${EXAMPLE}` }
    }
    terms.push({ amount, unit })
  }
  const canonical = terms
    .map((t) => `${t.amount} ${t.unit}${t.amount === '1' ? '' : 's'}`)
    .join(' ')
  return { ok: true, terms, canonical }
}

/** Names the trap a refused form falls into, where one can be named. */
function whyRefused(text: string): string | undefined {
  if (/^[+-]?\d+(\.\d+)?$/.test(text))
    return `a bare number has no unit (PostgreSQL would read "${text}" as seconds)`
  if (/\d:\d/.test(text)) return 'HH:MM forms are refused (PostgreSQL reads "1:30" as 90 minutes)'
  if (/(^|\s)[-+]/.test(text) || /\d\s*-/.test(text))
    return 'signs are refused: every term must be positive'
  if (/^p/i.test(text) && /\d/.test(text)) return 'ISO 8601 forms such as "P30D" are refused'
  if (/\d[eE][+-]?\d/.test(text)) return 'numbers with exponents are refused'
  if (/(^|\s)@|\bago\b/i.test(text)) return 'PostgreSQL\'s "@" and "ago" forms are refused'
  if (/\d[a-z]/i.test(text))
    return 'a number and its unit need a space between them, and units are spelled out (PostgreSQL reads "6M" as 6 minutes)'
  return undefined
}

function toUnit(word: string): IntervalUnit | undefined {
  const lower = word.toLowerCase()
  const singular = lower.endsWith('s') ? lower.slice(0, -1) : lower
  return (UNITS as readonly string[]).includes(singular) ? (singular as IntervalUnit) : undefined
}

/** "007" → "7", "1.50" → "1.5": equal amounts written differently compare equal. */
function normalizeNumber(text: string): string {
  const [whole = '0', fraction = ''] = text.split('.')
  const w = whole.replace(/^0+(?=\d)/, '')
  const f = fraction.replace(/0+$/, '')
  return f ? `${w}.${f}` : w
}
