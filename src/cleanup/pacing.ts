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
  #limit: number
  #span: number

  constructor(
    private readonly ceiling: number,
    private readonly targetMs: number,
    /** Rows per page, from the table's statistics; 0 when unknown. */
    tuplesPerPage: number,
    private readonly pauseMs: number,
    private readonly strategy: 'index' | 'tidrange' = 'index',
  ) {
    const first = Math.min(ceiling, FIRST_LIMIT)
    this.#limit = first
    this.#span =
      tuplesPerPage > 0
        ? clamp(Math.ceil(first / tuplesPerPage), 1, MAX_SPAN_PAGES)
        : DEFAULT_SPAN_PAGES
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
    this.#limit = Math.min(this.#limit, FIRST_LIMIT)
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
      this.#limit = clamp(Math.round(this.#limit * factor), MIN_LIMIT, this.ceiling)
    }
    const pages = batch.pages ?? this.#span
    let span = Math.round(pages * factor)
    // A span that would hold more rows than the limit is rolled back and shrunk by the
    // batch: keep under it, by the density the last batch saw.
    if (batch.selected > 0)
      span = Math.min(span, Math.floor((this.#limit * pages * 0.9) / batch.selected))
    this.#span = clamp(span, 1, MAX_SPAN_PAGES)
    const backOff = batch.elapsedMs > SLOW * this.targetMs ? batch.elapsedMs : 0
    return this.pauseMs + backOff
  }
}

/** The first batch: big enough that a small table finishes in one, small enough to be short. */
const FIRST_LIMIT = 1000
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
