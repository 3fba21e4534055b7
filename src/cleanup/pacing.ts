/**
 * How big the next batch is, and how long to wait before it. Batches are sized to a time
 * budget: `batchSize` is the ceiling, and the size follows the time the last full batch
 * took (its transaction, by the server's clock), so small tables finish in one batch and
 * big ones never hold their locks long. A batch that took far longer than the budget
 * (the app is busy, or I/O is) is followed by a pause as long as it took, so that a
 * cleanup yields to the app instead of competing with it.
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
  ) {
    this.#limit = Math.min(ceiling, FIRST_LIMIT)
    this.#span =
      tuplesPerPage > 0
        ? clamp(Math.ceil(this.#limit / tuplesPerPage), 1, MAX_SPAN_PAGES)
        : DEFAULT_SPAN_PAGES
  }

  get limit(): number {
    return this.#limit
  }

  /** Pages a batch walking the table in page order covers. */
  get span(): number {
    return this.#span
  }

  /** After a batch: the next size, and how long to pause before it. */
  after(batch: { selected: number; elapsedMs: number }): number {
    const factor = clamp(this.targetMs / Math.max(batch.elapsedMs, 1), 0.25, 2)
    if (batch.selected >= this.#limit) {
      this.#limit = clamp(Math.round(this.#limit * factor), MIN_LIMIT, this.ceiling)
    }
    this.#span = clamp(Math.round(this.#span * factor), 1, MAX_SPAN_PAGES)
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
