import { errorMessage, SingletonError } from '../errors.js'
import type { Lease, LockSession } from './lock-session.js'

export interface HoldTiming {
  readonly heartbeatMs: number
  readonly fenceAfterMs: number
}

/** How often a holder checks again that no other client is handed its session (a transaction pooler). */
const PIN_CHECK_MS = 10_000

/**
 * Keeps the lock session proving itself while the node holds the singleton, and
 * resolves with the reason the holdership ended: `stopped` when `stop` fires, `stepped
 * down: ...` when `stepDown` fires, anything else when the node must fence itself. Rejects
 * when the session turns out not to be a session at all (a transaction pooler).
 *
 * The fence deadline counts from when the last successful heartbeat was *sent*: the
 * server saw that query no earlier, so its idle_session_timeout clock started no earlier,
 * and fencing at sent + fenceAfterMs (< idle_session_timeout) is always first. The
 * watchdog reads a monotonic clock, so a process that wakes from SIGSTOP or a long GC
 * pause fences on its first tick, before it can schedule anything.
 *
 * `onEnd` runs in the tick the holdership ends, before the promise's callers run: the
 * caller learns of it without a microtask in which it would still think itself holding.
 */
export function holdUntilLost(
  session: LockSession,
  lease: Lease,
  timing: HoldTiming,
  stop: AbortSignal,
  stepDown: AbortSignal,
  onEnd: () => void = () => {},
  onUnchecked: (reason: string) => void = () => {},
): Promise<string> {
  return new Promise((resolve, reject) => {
    let lastOkSentAt = performance.now()
    let beatTimer: NodeJS.Timeout | undefined
    let pinTimer: NodeJS.Timeout | undefined
    let finished = false
    const watchdog = setInterval(
      () => {
        const silentFor = performance.now() - lastOkSentAt
        if (silentFor > timing.fenceAfterMs) {
          finish(
            `no heartbeat succeeded for ${Math.round(silentFor)} ms (fenceAfterMs ${timing.fenceAfterMs})`,
          )
        }
      },
      Math.max(10, Math.min(100, timing.heartbeatMs / 4)),
    )
    const onStop = () => finish('stopped')
    const onStepDown = () => finish(`stepped down: ${String(stepDown.reason)}`)
    const finish = (reason: string, fatal?: Error) => {
      if (finished) return
      finished = true
      onEnd()
      clearInterval(watchdog)
      clearTimeout(beatTimer)
      clearTimeout(pinTimer)
      stop.removeEventListener('abort', onStop)
      stepDown.removeEventListener('abort', onStepDown)
      if (fatal) reject(fatal)
      else resolve(reason)
    }
    // A lock session that turned out to be pooled (a statement of it ran in another backend,
    // or another client was handed its backend) is the caller's to stop for good.
    const failed = (what: string, error: unknown) => {
      const pooled = error instanceof SingletonError && error.code === 'SESSION_NOT_KEPT'
      finish(`${what} failed: ${errorMessage(error)}`, pooled ? error : undefined)
    }
    const beat = async () => {
      const sentAt = performance.now()
      try {
        if ((await session.heartbeat(lease.epoch)) === 'current') {
          lastOkSentAt = sentAt
        } else {
          finish(`epoch ${lease.epoch} is no longer current: another node took over`)
        }
      } catch (error) {
        failed('heartbeat', error)
      }
      if (!finished) beatTimer = setTimeout(beat, timing.heartbeatMs)
    }
    // Off the heartbeat's path, on a connection of its own: a check that waits for a new
    // connection (slow to authenticate, refused at max_connections) delays no heartbeat,
    // and one that cannot check ends nothing.
    const checkPinned = async () => {
      try {
        const unchecked = await session.checkStillPinned()
        if (unchecked && !finished) onUnchecked(unchecked)
      } catch (error) {
        failed('session check', error)
      }
      if (!finished) pinTimer = setTimeout(checkPinned, PIN_CHECK_MS)
    }
    session.onLost((error) => finish(`lock session lost: ${errorMessage(error)}`))
    stop.addEventListener('abort', onStop)
    stepDown.addEventListener('abort', onStepDown)
    if (stop.aborted) finish('stopped')
    else {
      beatTimer = setTimeout(beat, timing.heartbeatMs)
      pinTimer = setTimeout(checkPinned, PIN_CHECK_MS)
    }
  })
}
