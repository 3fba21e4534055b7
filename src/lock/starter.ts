import type pg from 'pg'
import type { RunDefinition } from '../config/definition.js'
import { isConnectionLoss } from '../db/sqlstate.js'
import { errorMessage, SingletonError } from '../errors.js'
import { sleep } from '../wait.js'
import { holdUntilLost } from './hold.js'
import {
  type Lease,
  LockSession,
  type LockSessionSettings,
  type SessionWarning,
} from './lock-session.js'

export interface StarterHooks {
  /** The node is live and its definitions are recorded (after every reconnect). */
  onRegistered(): void
  onWaiting(): void
  /** The node holds the singleton; `fence` aborts when it must stop acting as holder. */
  onAcquired(lease: Lease, fence: AbortSignal): void
  onLost(lease: Lease, reason: string): void
  onError(error: unknown): void
  /** What the lock session goes on without (once per distinct message). */
  onWarning(warning: SessionWarning): void
  /** The node cannot run safely here (a transaction pooler): it stops queueing for good. */
  onFatal(error: SingletonError): void
  /**
   * A stop's hand-over failed (the server refused it, or it did not answer): the session
   * was closed instead, which frees the lock, and the term is still open. The stop waits
   * for what this returns (the term's end recorded another way) before it resolves.
   */
  onHandOverFailed?(lease: Lease, error: unknown): Promise<void>
}

export interface StarterSettings extends LockSessionSettings {
  /** Registered on every lock session before it queues. */
  readonly definitions: readonly RunDefinition[]
  readonly heartbeatMs: number
  readonly fenceAfterMs: number
  readonly reconnectDelayMs: number
  /** After stepping down, how long to wait before queueing again, so another node can hold. */
  readonly stepDownCoolOffMs: number
}

const MAX_RECONNECT_DELAY_MS = 5000

/**
 * Every node runs one: connect, wait in PostgreSQL's lock queue, hold with heartbeats,
 * and after any loss (fence, terminated backend, database restart) reconnect with
 * backoff and queue again. Losing the session never ends the process.
 */
export class Starter {
  readonly #connection: pg.ClientConfig
  readonly #settings: StarterSettings
  readonly #hooks: StarterHooks
  readonly #stop = new AbortController()
  #stepDown: AbortController | undefined
  readonly #warned = new Set<string>()
  #loop: Promise<void> | undefined
  #firstAttempt: Promise<void> | undefined
  #firstAttemptDone: (() => void) | undefined
  #held: LockSession | undefined
  #lease: Lease | undefined
  /** The lease while its hold lasts: cleared in the tick the hold ends, whatever ends it. */
  #holding: Lease | undefined
  /** The stop's hand-over: whether the server unlocked. */
  #handedOver: Promise<boolean> | undefined
  /** Why the stop's hand-over failed, when it did. */
  #handOverError: unknown

  constructor(connection: pg.ClientConfig, settings: StarterSettings, hooks: StarterHooks) {
    this.#connection = connection
    this.#settings = settings
    this.#hooks = hooks
  }

  get lease(): Lease | undefined {
    return this.#lease
  }

  /** Each distinct warning once in the process's life: a condition that lasts is not news every 10 s. */
  #warnOnce(warning: SessionWarning): void {
    if (this.#warned.has(warning.message)) return
    this.#warned.add(warning.message)
    this.#hooks.onWarning(warning)
  }

  /** Starts the loop; resolves once its first connection has registered the node, or failed to. */
  start(): Promise<void> {
    this.#firstAttempt ??= new Promise((resolve) => {
      this.#firstAttemptDone = resolve
    })
    this.#loop ??= this.#run()
    return this.#firstAttempt
  }

  /**
   * The holder gives the lock up (it cannot do its job: say its ticks keep failing) so that a
   * healthier node can hold; it queues again after the cool-off. No-op when not holding.
   */
  stepDown(reason: string, epoch?: number): void {
    if (epoch !== undefined && this.#holding?.epoch !== epoch) return
    this.#stepDown?.abort(reason)
  }

  /**
   * Whether another node waits to take over from the holdership of `epoch`; rejects when
   * that holdership is over, or the lock session did not answer.
   */
  othersWaiting(epoch: number): Promise<boolean> {
    const held = this.#held
    if (!held || this.#holding?.epoch !== epoch)
      return Promise.reject(new Error(`epoch ${epoch} is not held`))
    return held.othersWaiting()
  }

  /**
   * The first step of stop(), in this tick, for a caller with work of its own before the
   * rest of it: a holder's hold ends and the statement that unlocks is sent, without
   * waiting for the hold loop to wind down or any of this node's work to end (the next
   * node's epoch bump waits for a batch in flight and fences the ones after it). A stop's
   * code runs for the first time, and is compiled on the way: sent first, the statement went
   * out 0.5 to 1 ms after the signal instead of 1 to 2 ms, on a 2-core machine. No-op when
   * not holding.
   */
  handOverNow(): void {
    // Not #lease: in the microtasks after a hold ended another way (superseded, lost, stepped
    // down), #lease still names it, and that ending's own account must stand.
    const lease = this.#holding
    if (!lease || this.#handedOver) return
    this.#handedOver = (
      this.#held?.handOver(lease.epoch, 'stopped') ??
      Promise.reject(new Error('the lock session was gone'))
    ).then(
      () => true,
      (error) => {
        this.#handOverError = error
        return false
      },
    )
    this.#stop.abort()
  }

  /**
   * Stops waiting, or stops holding: the holder's fence signal aborts at once and the
   * singleton's lock is unlocked, so the next node takes over at once (its epoch bump
   * waits for a batch still in flight, and fences the ones after it); then
   * `beforeRelease` runs (the caller lets in-flight work end) with the node still live,
   * and the session closes.
   */
  async stop(beforeRelease: () => Promise<void>): Promise<Lease | undefined> {
    this.handOverNow()
    this.#stop.abort()
    this.#firstAttemptDone?.()
    await this.#loop
    const handedOver = await this.#handedOver
    // Undefined when the holdership ended otherwise before the stop (its loss is reported as such).
    const lease = this.#lease
    const held = this.#held
    // Handed over already, or not: closing the session frees the lock all the same. A
    // session the server ended meanwhile cannot unlock, and needs no unlocking.
    const release = async () => {
      this.#lease = undefined
      this.#held = undefined
      if (held) await held.release().catch(() => held.destroy())
    }
    // A hand-over that failed (the server refused it, or it did not answer) may have left
    // the lock held: the session goes now, before the work ends, so the next node is not
    // kept waiting for it.
    let recorded: Promise<void> | undefined
    if (held && handedOver === false) {
      await release()
      // Alongside the work's end: the term's end recorded another way.
      if (lease) recorded = this.#hooks.onHandOverFailed?.(lease, this.#handOverError)
    }
    // After a hand-over the session stays while the work ends (up to a batch's statement
    // timeout): a query now and then keeps the server's idle_session_timeout from ending
    // it, and with it the node's membership, before the node is done. It holds no lock.
    const keepAlive =
      held && handedOver
        ? setInterval(() => held.ping().catch(() => {}), this.#settings.heartbeatMs)
        : undefined
    try {
      await beforeRelease()
    } finally {
      clearInterval(keepAlive)
      await release()
      await recorded?.catch(() => {})
    }
    return lease
  }

  async #run(): Promise<void> {
    const stop = this.#stop.signal
    let delay = this.#settings.reconnectDelayMs
    while (!stop.aborted) {
      const session = new LockSession(this.#connection, this.#settings)
      // Breaks a wait inside pg_advisory_lock at once; the server drops the queued
      // waiter when client_connection_check_interval sees the socket gone.
      const abortWait = () => session.destroy()
      stop.addEventListener('abort', abortWait)
      try {
        await session.connect()
        await session.register(this.#settings.definitions)
        for (const warning of session.warnings) this.#warnOnce(warning)
        this.#hooks.onRegistered()
        this.#firstAttemptDone?.()
        this.#hooks.onWaiting()
        const lease = await session.acquire(stop)
        stop.removeEventListener('abort', abortWait)
        if (!lease || stop.aborted) {
          await session.close()
          break
        }
        delay = this.#settings.reconnectDelayMs
        this.#lease = lease
        this.#held = session
        // Before onAcquired: a stop from inside it hands over too.
        this.#holding = lease
        const fence = new AbortController()
        const stepDown = new AbortController()
        this.#stepDown = stepDown
        this.#hooks.onAcquired(lease, fence.signal)
        // Not when a stop (from inside onAcquired) is already handing over.
        if (!stop.aborted) void session.readyHandOver().catch(() => {})
        let reason: string
        try {
          reason = await holdUntilLost(
            session,
            lease,
            this.#settings,
            stop,
            stepDown.signal,
            () => {
              this.#holding = undefined
            },
            (reason) => this.#warnOnce({ code: 'SESSION_CHECK_SKIPPED', message: reason }),
          )
        } catch (error) {
          fence.abort(errorMessage(error))
          throw error
        } finally {
          this.#holding = undefined
          this.#stepDown = undefined
        }
        fence.abort(reason)
        if (reason === 'stopped') break // stop() releases after the caller's work has ended
        this.#held = undefined
        this.#lease = undefined
        if (stepDown.signal.aborted) {
          // Handed over at once: unlocked and closed, the next waiter holds. A session that
          // cannot answer (no server's reply, or the server ending the session: a restart,
          // a crash of another backend) was lost meanwhile: a database restart fails what
          // made the node step down and its session alike.
          // That is a loss, after which the node queues again at once, as after any; the
          // cool-off is for a node worse off than its peers, and would leave a single node's
          // singleton without a holder for all of it.
          const answered = await session.handOver(lease.epoch, reason).then(
            () => true,
            (error) => !isConnectionLoss(error),
          )
          await session.release().catch(() => session.destroy())
          if (answered) {
            this.#hooks.onLost(lease, reason)
            await sleep(this.#settings.stepDownCoolOffMs, stop)
            continue
          }
          this.#hooks.onLost(lease, `${reason} (and the lock session was lost meanwhile)`)
          await sleep(delay, stop)
          delay = Math.min(delay * 2, MAX_RECONNECT_DELAY_MS)
          continue
        }
        session.destroy()
        this.#hooks.onLost(lease, reason)
      } catch (error) {
        stop.removeEventListener('abort', abortWait)
        session.destroy()
        const lost = this.#held === session ? this.#lease : undefined
        if (this.#held === session) {
          this.#held = undefined
          this.#lease = undefined
        }
        // A holder whose session failed has lost the lock like any other way.
        if (lost) this.#hooks.onLost(lost, `lock session failed: ${errorMessage(error)}`)
        this.#firstAttemptDone?.()
        if (stop.aborted) break
        if (error instanceof SingletonError && error.code === 'SESSION_NOT_KEPT') {
          this.#hooks.onFatal(error)
          break
        }
        this.#hooks.onError(
          new Error(`lock session failed, reconnecting in ${delay} ms: ${errorMessage(error)}`, {
            cause: error,
          }),
        )
        await sleep(delay, stop)
        delay = Math.min(delay * 2, MAX_RECONNECT_DELAY_MS)
      }
    }
  }
}
