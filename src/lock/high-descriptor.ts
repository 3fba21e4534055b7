import { closeSync, fstatSync, openSync } from 'node:fs'
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
 * for correctness. So it stands aside whenever it could get in the way: on other
 * platforms; when the process cannot open all of them (near its descriptor limit, where
 * holding them would make the connect itself fail with EMFILE); and at the end, where it
 * closes only numbers that still are its /dev/null (a number another part of the process
 * closed and reused during the connect belongs to that part now).
 */
export async function withHighDescriptor<T>(connect: () => Promise<T>): Promise<T> {
  const held = process.platform === 'linux' ? reserve() : NONE
  try {
    return await connect()
  } finally {
    release(held)
  }
}

/** The descriptors held, and the device number that marks them as ours (/dev/null's). */
interface Held {
  fds: number[]
  device: number
}

const NONE: Held = { fds: [], device: -1 }

function reserve(): Held {
  const held: Held = { fds: [], device: -1 }
  try {
    while (held.fds.length < RESERVED) held.fds.push(openSync(devNull, 'r'))
    held.device = fstatSync(held.fds[0] as number).rdev
    return held
  } catch {
    // Near the limit: give every one back, so the connect can have a descriptor.
    for (const fd of held.fds) closeQuietly(fd)
    return NONE
  }
}

function release(held: Held): void {
  for (const fd of held.fds) {
    try {
      const stat = fstatSync(fd)
      if (stat.isCharacterDevice() && stat.rdev === held.device) closeSync(fd)
    } catch {
      // Closed by someone else (EBADF): nothing of ours to close, and never let it hide
      // the connect's own outcome.
    }
  }
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd)
  } catch {
    // Already closed.
  }
}
