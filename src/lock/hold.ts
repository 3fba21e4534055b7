import { errorMessage } from '../errors.js'
import type { Lease, LockSession } from './lock-session.js'

export interface HoldTiming {
  readonly heartbeatMs: number
  readonly fenceAfterMs: number
}

/**
 * Keeps the lock session proving itself while the node holds the singleton, and
 * resolves with the reason the holdership ended: `stopped` when `stop` fires, anything
 * else when the node must fence itself.
 *
 * The fence deadline counts from when the last successful heartbeat was *sent*: the
 * server saw that query no earlier, so its idle_session_timeout clock started no earlier,
 * and fencing at sent + fenceAfterMs (< idle_session_timeout) is always first. The
 * watchdog reads a monotonic clock, so a process that wakes from SIGSTOP or a long GC
 * pause fences on its first tick, before it can schedule anything.
 */
export function holdUntilLost(
  session: LockSession,
  lease: Lease,
  timing: HoldTiming,
  stop: AbortSignal,
): Promise<string> {
  return new Promise((resolve) => {
    let lastOkSentAt = performance.now()
    let beatTimer: NodeJS.Timeout | undefined
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
    const finish = (reason: string) => {
      if (finished) return
      finished = true
      clearInterval(watchdog)
      clearTimeout(beatTimer)
      stop.removeEventListener('abort', onStop)
      resolve(reason)
    }
    const beat = async () => {
      const sentAt = performance.now()
      try {
        if (await session.heartbeat(lease.epoch)) {
          lastOkSentAt = sentAt
        } else {
          finish(`epoch ${lease.epoch} is no longer current: another node took over`)
        }
      } catch (error) {
        finish(`heartbeat failed: ${errorMessage(error)}`)
      }
      if (!finished) beatTimer = setTimeout(beat, timing.heartbeatMs)
    }
    session.onLost((error) => finish(`lock session lost: ${errorMessage(error)}`))
    stop.addEventListener('abort', onStop)
    if (stop.aborted) finish('stopped')
    else beatTimer = setTimeout(beat, timing.heartbeatMs)
  })
}
