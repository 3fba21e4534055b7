import { describe, expect, it } from 'vitest'
import { LearnedSizes, Pacer } from '../src/cleanup/pacing.js'

describe('batches sized to a time budget', () => {
  it('starts at 1000 rows (or batchSize, when smaller) and never exceeds batchSize', () => {
    expect(new Pacer(100, 30, 50, 0).limit).toBe(100)
    const pacer = new Pacer(5000, 30, 50, 0)
    expect(pacer.limit).toBe(1000)
    // Fast, full batches: the size doubles at most per batch, up to the ceiling.
    const sizes: number[] = []
    for (let i = 0; i < 6; i++) {
      pacer.after({ selected: pacer.limit, elapsedMs: 5 })
      sizes.push(pacer.limit)
    }
    expect(sizes).toEqual([2000, 4000, 5000, 5000, 5000, 5000])
  })

  it('shrinks a batch that overran its budget, at most to a quarter per step and never below 10 rows', () => {
    const pacer = new Pacer(5000, 30, 50, 0)
    pacer.after({ selected: 1000, elapsedMs: 60 })
    expect(pacer.limit).toBe(500)
    pacer.after({ selected: 500, elapsedMs: 3000 })
    expect(pacer.limit).toBe(125)
    for (let i = 0; i < 10; i++) pacer.after({ selected: pacer.limit, elapsedMs: 3000 })
    expect(pacer.limit).toBe(10)
  })

  it('a batch cancelled by its statement_timeout is tried again at a quarter of its size (and in page order its span), down to one row, then no more', () => {
    const pages = new Pacer(5000, 30, 50, 0, 'tidrange')
    expect([pages.limit, pages.span]).toEqual([1000, 20])
    const sizes: number[][] = []
    while (pages.shrink()) sizes.push([pages.limit, pages.span])
    expect(sizes).toEqual([
      [250, 5],
      [62, 1],
      [15, 1],
      [3, 1],
      [1, 1],
    ])
    // Along the index the span means nothing: only the limit shrinks.
    const index = new Pacer(5000, 30, 50, 0)
    const limits: number[] = []
    while (index.shrink()) limits.push(index.limit)
    expect(limits).toEqual([250, 62, 15, 3, 1])
    expect(index.span).toBe(20)
  })

  it('after a cancelled batch the size never grows back to half of what was cancelled', () => {
    const pacer = new Pacer(5000, 30, 50, 0)
    expect(pacer.shrink()).toBe(true)
    expect(pacer.limit).toBe(250)
    for (let i = 0; i < 10; i++) pacer.after({ selected: pacer.limit, elapsedMs: 1 })
    expect(pacer.limit).toBe(500)
  })

  it('a batch that found fewer rows than it asked for says nothing about the size', () => {
    const pacer = new Pacer(5000, 30, 50, 0)
    pacer.after({ selected: 10, elapsedMs: 1 })
    expect(pacer.limit).toBe(1000)
  })

  it('along the index, a batch that left rows behind stopped at its limit, though it took fewer (rows sharing the bounding value wait for the next)', () => {
    const pacer = new Pacer(5000, 30, 50, 0)
    pacer.after({ selected: 991, elapsedMs: 5, leafDone: false })
    expect(pacer.limit).toBe(2000)
    pacer.after({ selected: 1990, elapsedMs: 60, leafDone: false })
    expect(pacer.limit).toBe(1000)
  })

  it('pauses after a batch far over its budget, as long as it took, on top of batchPauseMs', () => {
    const pacer = new Pacer(5000, 30, 50, 7)
    expect(pacer.after({ selected: 1000, elapsedMs: 40 })).toBe(7)
    expect(pacer.after({ selected: 500, elapsedMs: 120 })).toBe(127)
  })

  it('spans enough pages for the rows it may take, and follows the same budget', () => {
    const pacer = new Pacer(5000, 30, 50, 0)
    expect(pacer.span).toBe(20)
    pacer.after({ selected: 0, elapsedMs: 5 })
    expect(pacer.span).toBe(40)
    pacer.after({ selected: 0, elapsedMs: 120 })
    expect(pacer.span).toBe(10)
    expect(new Pacer(5000, 30, 0, 0).span).toBe(32)
  })

  it('in page order, the budget sets the span and the limit; the limit grows only on batches that took at least half of it, and the span stays under it', () => {
    const pacer = new Pacer(5000, 30, 50, 0, 'tidrange')
    expect(pacer.limit).toBe(1000)
    expect(pacer.span).toBe(20)
    // A fast batch of 20 pages that took 900 rows: the limit doubles, and so does the span.
    pacer.after({ selected: 900, elapsedMs: 5, pages: 20 })
    expect(pacer.limit).toBe(2000)
    expect(pacer.span).toBe(40)
    pacer.after({ selected: 1800, elapsedMs: 5, pages: 40 })
    expect(pacer.limit).toBe(4000)
    expect(pacer.span).toBe(80)
    // Doubling again would pass batchSize: the limit stops there, and the span stays where
    // 90 % of it fits at the density seen (3600 rows in 80 pages: 100 pages).
    pacer.after({ selected: 3600, elapsedMs: 5, pages: 80 })
    expect(pacer.limit).toBe(5000)
    expect(pacer.span).toBe(100)
    // The batch shrank its span itself (it was denser than thought): the next follows that.
    pacer.after({ selected: 2600, elapsedMs: 30, pages: 7 })
    expect(pacer.span).toBe(7)
  })

  it('in page order, pages with nothing outdated grow the span but not the limit, so the first dense region is met with the limit the walk had', () => {
    const pacer = new Pacer(100_000, 30, 50, 0, 'tidrange')
    for (let i = 0; i < 8; i++) pacer.after({ selected: 0, elapsedMs: 2 })
    expect(pacer.span).toBe(5120)
    expect(pacer.limit).toBe(1000)
    // A slow batch shrinks the limit too, even one that took few rows.
    pacer.after({ selected: 300, elapsedMs: 120, pages: 5120 })
    expect(pacer.limit).toBe(250)
  })

  it('a batch done again carefully starts from the first size, whatever the plain ones had grown to', () => {
    const pacer = new Pacer(100_000, 30, 50, 0)
    for (let i = 0; i < 10; i++) pacer.after({ selected: pacer.limit, elapsedMs: 5 })
    expect(pacer.limit).toBe(100_000)
    pacer.careful()
    expect(pacer.limit).toBe(1000)
    const small = new Pacer(40, 30, 50, 0, 'tidrange')
    small.careful()
    expect(small.limit).toBe(40)
  })

  it("along an index, the first batch takes the rows expected on 128 heap pages at most: fewer when the column is scattered over a big leaf's pages", () => {
    // 1,000,000 rows on 13,000 pages, shuffled: 1000 rows would touch about 960 pages.
    const scattered = new Pacer(100_000, 30, 77, 0, 'index', { pages: 13_000, correlation: 0.01 })
    expect(scattered.limit).toBeGreaterThanOrEqual(125)
    expect(scattered.limit).toBeLessThanOrEqual(130)
    // The same leaf in time order: 1000 rows sit on 13 pages.
    expect(new Pacer(100_000, 30, 77, 0, 'index', { pages: 13_000, correlation: 0.99 }).limit).toBe(
      1000,
    )
    // Descending order is as good as ascending.
    expect(new Pacer(100_000, 30, 77, 0, 'index', { pages: 13_000, correlation: -1 }).limit).toBe(
      1000,
    )
    // A small leaf: all its pages are fewer than 128, however scattered.
    expect(new Pacer(100_000, 30, 77, 0, 'index', { pages: 100, correlation: 0 }).limit).toBe(1000)
    // Unknown size (never analyzed), or a correlation unknown on a big leaf (taken as none).
    expect(new Pacer(100_000, 30, 77, 0, 'index', { pages: 0, correlation: null }).limit).toBe(1000)
    expect(
      new Pacer(100_000, 30, 77, 0, 'index', { pages: 13_000, correlation: null }).limit,
    ).toBeLessThanOrEqual(130)
    // batchSize stays the ceiling, and page order keeps its own first size.
    expect(new Pacer(50, 30, 77, 0, 'index', { pages: 13_000, correlation: 0 }).limit).toBe(50)
    expect(new Pacer(100_000, 30, 77, 0, 'tidrange', { pages: 13_000, correlation: 0 }).limit).toBe(
      1000,
    )
    // A careful batch starts again from that first size, and the size grows on evidence.
    for (let i = 0; i < 3; i++) scattered.after({ selected: scattered.limit, elapsedMs: 5 })
    expect(scattered.limit).toBeGreaterThan(900)
    scattered.careful()
    expect(scattered.limit).toBeLessThanOrEqual(130)
  })
})

describe('the size a run left', () => {
  it('is where the next run of the leaf starts, within batchSize; careful batches still start small, and a page-order walk starts at its first size', () => {
    const first = new Pacer(5000, 30, 50, 0)
    for (let i = 0; i < 3; i++) first.after({ selected: first.limit, elapsedMs: 5 })
    expect(first.limit).toBe(5000)
    const next = new Pacer(5000, 30, 50, 0, 'index', undefined, first.limit)
    expect(next.limit).toBe(5000)
    next.careful()
    expect(next.limit).toBe(1000)
    // A smaller batchSize since: the ceiling holds.
    expect(new Pacer(2000, 30, 50, 0, 'index', undefined, 5000).limit).toBe(2000)
    // In page order the first size stands.
    const pages = new Pacer(5000, 30, 50, 0, 'tidrange', undefined, 3000)
    expect([pages.limit, pages.span]).toEqual([1000, 20])
  })

  it('is kept for a bounded number of leaves, the least recently used forgotten first', () => {
    const sizes = new LearnedSizes(2)
    sizes.remember('a', 1)
    sizes.remember('b', 2)
    sizes.remember('a', 3)
    sizes.remember('c', 4)
    expect(sizes.recall('b')).toBeUndefined()
    expect(sizes.recall('a')).toBe(3)
    expect(sizes.recall('c')).toBe(4)
    sizes.forget('a')
    expect(sizes.recall('a')).toBeUndefined()
  })
})
