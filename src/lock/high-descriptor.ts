import { closeSync, openSync } from 'node:fs'
import { devNull } from 'node:os'

/**
 * How many descriptors are held below the lock session's socket while it connects: the
 * connections a holder opens after it (its pool, pg-boss's pool and listener) and an app's
 * own get the freed numbers, under the lock session's.
 */
const RESERVED = 64

/**
 * Runs `connect` (which opens a socket) with the lowest free descriptors held, so the socket
 * gets a number above the connections the process opens later.
 *
 * Why: when a process is killed (kill -9, the OOM killer), Linux closes its descriptors in
 * reverse order of their numbers, the highest first, and each closed connection's server
 * backend wakes to exit and competes for the CPUs with the rest. Closed first, the lock
 * session's backend frees the lock before the others' exits run; closed last, behind a
 * holder's four other connections, it freed the lock about 5 ms later on a 2-core machine
 * (bench: "the killed node's backend is gone"). Only an ordering: nothing depends on it
 * for correctness, so on other platforms, or when no descriptor can be opened, it does
 * nothing.
 */
export async function withHighDescriptor<T>(connect: () => Promise<T>): Promise<T> {
  const held: number[] = []
  if (process.platform === 'linux') {
    try {
      while (held.length < RESERVED) held.push(openSync(devNull, 'r'))
    } catch {
      // Out of descriptors: the connect gets whatever number is free.
    }
  }
  try {
    return await connect()
  } finally {
    for (const fd of held) {
      try {
        closeSync(fd)
      } catch {
        // Already closed: never let it hide the connect's own outcome.
      }
    }
  }
}
