import { SingletonError, type SingletonErrorCode } from '../errors.js'

/**
 * Collects every problem of a configuration before saying anything, so that a user fixes
 * them all in one go instead of finding the next one at each restart.
 */
export class Problems {
  readonly #messages: string[] = []

  add(message: string): void {
    this.#messages.push(message)
  }

  get count(): number {
    return this.#messages.length
  }

  /** Throws one error that lists every problem, if there is any. */
  throwIfAny(code: SingletonErrorCode): void {
    const [first, ...rest] = this.#messages
    if (first === undefined) return
    if (rest.length === 0) throw new SingletonError(code, first)
    throw new SingletonError(
      code,
      `${this.#messages.length} problems in the configuration:\n${this.#messages.map((m) => `  - ${m}`).join('\n')}`,
    )
  }
}
