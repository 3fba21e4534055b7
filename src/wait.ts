/** Resolves after `ms`, or at once when `signal` aborts (never rejects). */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve()
    const timer = setTimeout(done, ms)
    function done() {
      clearTimeout(timer)
      signal?.removeEventListener('abort', done)
      resolve()
    }
    signal?.addEventListener('abort', done)
  })
}

/**
 * Waits for `work` to settle, `ms` at most, and no longer than `signal` stays unaborted;
 * never rejects, and leaves no timer behind once it returns.
 */
export async function settleWithin(
  work: Promise<unknown>,
  ms: number,
  signal?: AbortSignal,
): Promise<void> {
  const done = new AbortController()
  const end = () => done.abort()
  if (signal?.aborted) end()
  signal?.addEventListener('abort', end)
  try {
    await Promise.race([work.then(end, end), sleep(ms, done.signal)])
  } finally {
    signal?.removeEventListener('abort', end)
    end()
  }
}

/** Polls `probe` until it gives a value, or throws after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined>,
  timeoutMs: number,
  everyMs = 20,
): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await probe()
    if (value !== undefined) return value
    if (Date.now() > deadline) throw new Error(`waited ${timeoutMs} ms for ${what}`)
    await sleep(everyMs)
  }
}

/**
 * A sleep that can be cut short. `ring()` ends the sleep under way; rung while no one
 * sleeps, it ends the next one at once, so a ring between a look and the sleep after it
 * is not lost.
 */
export class Alarm {
  #rung = false
  #wake: (() => void) | undefined

  ring(): void {
    if (this.#wake) this.#wake()
    else this.#rung = true
  }

  /**
   * Resolves after `ms`, when rung, or when `signal` aborts (never rejects): true when a
   * ring ended it.
   */
  async sleep(ms: number, signal?: AbortSignal): Promise<boolean> {
    if (signal?.aborted) return false
    if (this.#rung) {
      this.#rung = false
      return true
    }
    let rung = false
    const cut = new AbortController()
    const end = () => cut.abort()
    const wake = () => {
      rung = true
      end()
    }
    signal?.addEventListener('abort', end)
    this.#wake = wake
    try {
      await sleep(ms, cut.signal)
    } finally {
      if (this.#wake === wake) this.#wake = undefined
      signal?.removeEventListener('abort', end)
    }
    return rung
  }
}
