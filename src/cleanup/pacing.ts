/**
 * How big the next batch is, and how long to wait before it. Batches are sized to a time
 * budget: `batchSize` is the ceiling, and the size follows the time the last batch took
 * (its transaction, by the server's clock), so small tables finish in one batch and big
 * ones never hold their locks long. Along an index the budget sets the row limit; in page
 * order it sets both the span of pages and the row limit, which the batch itself enforces
 * (a plain page-range delete that took more rows is rolled back and its span shrunk; any
 * other takes at most the limit). The limit grows only on evidence: a fast batch that
 * took at least half of it (along the index: one that stopped at it). So a walk that sped over pages
 * with nothing outdated meets the first dense region with the limit it had, not the
 * ceiling. A batch that took far longer than the budget (the app is busy, or I/O is) is
 * followed by a pause as long as it took, so that a cleanup yields to the app instead of
 * competing with it.
 */
export class Pacer {
  readonly #first: number
  #limit: number
  #span: number
  /** Below the size of the last batch its statement_timeout cancelled: the limit never grows back to it. */
  #cap: number
  #spanCap = MAX_SPAN_PAGES

  constructor(
    private readonly ceiling: number,
    private readonly targetMs: number,
    /** Rows per page, from the table's statistics; 0 when unknown. */
    tuplesPerPage: number,
    private readonly pauseMs: number,
    private readonly strategy: 'index' | 'tidrange' = 'index',
    /** The leaf's size and the column's physical order, from its statistics (index walks). */
    layout: Layout = { pages: 0, correlation: null },
    /** The row limit the last run of this leaf, on this node, left: an index walk's first batch starts there. */
    learned?: number,
  ) {
    const limit = Math.min(ceiling, FIRST_LIMIT)
    const first = strategy === 'index' ? firstIndexLimit(limit, tuplesPerPage, layout) : limit
    this.#first = first
    this.#limit = first
    this.#cap = ceiling
    this.#span =
      tuplesPerPage > 0
        ? clamp(Math.ceil(first / tuplesPerPage), 1, MAX_SPAN_PAGES)
        : DEFAULT_SPAN_PAGES
    // Along the index only: in page order the limit sets the span by the leaf's average
    // rows a page, and a span that meets denser pages is rolled back and shrunk, at a cost
    // that grows with the size it starts at.
    if (learned !== undefined && strategy === 'index')
      this.#limit = clamp(Math.round(learned), Math.min(MIN_LIMIT, ceiling), ceiling)
  }

  get limit(): number {
    return this.#limit
  }

  /** Pages a batch walking the table in page order covers. */
  get span(): number {
    return this.#span
  }

  /**
   * Before a batch done again carefully (rows that failed it are found one by one): it
   * starts from the first batch's size, whatever the plain batches had grown to.
   */
  careful(): void {
    this.#limit = Math.min(this.#limit, this.#first)
  }

  /**
   * After a batch the server cancelled (its statement_timeout ran out, so it rolled back
   * and deleted nothing): the same batch is tried again at a quarter of the size (the
   * limit, and in page order the span), down to one row and one page, and the size never
   * grows back to half of what was cancelled. A batch's first size is a guess, and the time
   * a row costs has no bound the pacer can know beforehand (rows deleted with it by ON
   * DELETE CASCADE, a trigger's work, a cold disk). False when it is at the smallest
   * already: the batch cannot be made to fit.
   */
  shrink(): boolean {
    const limit = Math.max(1, Math.floor(this.#limit / 4))
    const span = this.strategy === 'tidrange' ? Math.max(1, Math.floor(this.#span / 4)) : this.#span
    if (limit === this.#limit && span === this.#span) return false
    this.#cap = Math.max(1, Math.min(this.#cap, Math.floor(this.#limit / 2)))
    this.#spanCap = Math.max(1, Math.min(this.#spanCap, Math.floor(this.#span / 2)))
    this.#limit = limit
    this.#span = span
    return true
  }

  /** After a batch: the next size, and how long to pause before it. */
  after(batch: {
    selected: number
    elapsedMs: number
    pages?: number | null
    leafDone?: boolean
  }): number {
    const factor = clamp(this.targetMs / Math.max(batch.elapsedMs, 1), 0.25, 2)
    // Along the index, a batch that left rows of its table stopped at its limit, even with
    // fewer rows than the limit (a batch that deletes a range of values stops below the
    // value the rows one past the limit share). A run calls this only after such batches,
    // so there every index batch counts; one that finished its table, or says nothing of
    // it, counts only when full.
    const evidence =
      this.strategy === 'index'
        ? batch.selected >= this.#limit || batch.leafDone === false
        : batch.selected >= this.#limit / 2 || (factor < 1 && batch.selected > 0)
    if (evidence) {
      this.#limit = clamp(
        Math.round(this.#limit * factor),
        Math.min(MIN_LIMIT, this.#cap),
        Math.min(this.ceiling, this.#cap),
      )
    }
    const pages = batch.pages ?? this.#span
    let span = Math.round(pages * factor)
    // A span that would hold more rows than the limit is rolled back and shrunk by the
    // batch: keep under it, by the density the last batch saw.
    if (batch.selected > 0)
      span = Math.min(span, Math.floor((this.#limit * pages * 0.9) / batch.selected))
    this.#span = clamp(span, 1, this.#spanCap)
    const backOff = batch.elapsedMs > SLOW * this.targetMs ? batch.elapsedMs : 0
    return this.pauseMs + backOff
  }
}

/**
 * The row limits the runs this node worked left, by policy, leaf and walk: a policy that
 * runs often would otherwise grow from the first size again every run (1,000 rows, then
 * 2,000, 4,000, ...), paying each small batch's fixed cost. Kept in memory, by each node
 * that works the queue: a node started since learns again. Bounded: past `max` entries it
 * forgets the least recently used.
 */
export class LearnedSizes {
  readonly #sizes = new Map<string, number>()

  constructor(private readonly max = 10_000) {}

  recall(key: string): number | undefined {
    return this.#sizes.get(key)
  }

  forget(key: string): void {
    this.#sizes.delete(key)
  }

  remember(key: string, limit: number): void {
    this.#sizes.delete(key)
    this.#sizes.set(key, limit)
    if (this.#sizes.size > this.max) {
      const oldest = this.#sizes.keys().next().value
      if (oldest !== undefined) this.#sizes.delete(oldest)
    }
  }
}

/** The first batch: big enough that a small table finishes in one, small enough to be short. */
const FIRST_LIMIT = 1000
/**
 * And along an index, at most as many rows as are expected on this many heap pages. What a
 * batch costs is the pages it touches (each one's first change after a checkpoint writes
 * the whole page to the WAL), not its rows: 1000 rows on 1000 scattered pages took 65 to
 * 105 ms where 1000 rows on 13 pages took 10 ms (2-core machines, bench "steady state").
 * Later batches are sized by the time the last one took.
 */
const FIRST_PAGES = 128

/** What a leaf's statistics say of its layout. */
export interface Layout {
  /** Heap pages (pg_class.relpages); 0 when unknown. */
  readonly pages: number
  /** pg_stats.correlation of the column (-1 to 1); null when unknown. */
  readonly correlation: number | null
}

/**
 * The most rows, up to `limit`, that an index walk is expected to find on at most
 * FIRST_PAGES heap pages: the planner's own model, between a column in physical order
 * (rows / rows per page) and one in none (rows scattered at random over the leaf's pages),
 * weighted by the correlation squared. Without a size, `limit`: nothing says the rows are
 * scattered, and a leaf never analyzed is most often a new, small one.
 */
export function firstIndexLimit(limit: number, tuplesPerPage: number, layout: Layout): number {
  const { pages } = layout
  if (!(pages > 0)) return limit
  const touched = (rows: number) => pagesTouched(rows, tuplesPerPage, layout)
  if (touched(limit) <= FIRST_PAGES) return limit
  let low = Math.min(MIN_LIMIT, limit)
  let high = limit
  while (high - low > 1) {
    const mid = Math.floor((low + high) / 2)
    if (touched(mid) <= FIRST_PAGES) low = mid
    else high = mid
  }
  return low
}

/**
 * The heap pages `rows` rows of a leaf are expected on, taken along the column's index:
 * the planner's own model, between a column in physical order (rows / rows per page) and
 * one in none (rows scattered at random over the leaf's pages), weighted by the
 * correlation squared (unknown: none).
 */
export function pagesTouched(rows: number, tuplesPerPage: number, layout: Layout): number {
  const { pages } = layout
  if (!(pages > 0)) return 0
  const c2 = (layout.correlation ?? 0) ** 2
  return (
    c2 * (tuplesPerPage > 0 ? rows / tuplesPerPage : 0) +
    (1 - c2) * pages * (1 - Math.exp(-rows / pages))
  )
}

const MIN_LIMIT = 10
/** Pages a page-order batch spans when the table has no statistics yet. */
const DEFAULT_SPAN_PAGES = 32
/** And at most: a table left nearly empty could otherwise ask for billions of pages. */
const MAX_SPAN_PAGES = 131_072
/** A batch this many times over its budget is followed by a pause as long as it took. */
const SLOW = 3

function clamp(value: number, min: number, max: number): number {
  return Math.min(max, Math.max(min, value))
}
