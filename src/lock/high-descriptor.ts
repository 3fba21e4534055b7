import { closeSync, fstatSync, openSync } from 'node:fs'
import { devNull } from 'node:os'

/**
 * How many descriptors are held below the lock session's socket while it connects: the
 * connections a holder opens after it (its pool, pg-boss's pool and listener) and an app's
 * own get the freed numbers, under the lock session's.
 */
const RESERVED = 64

/** Opened on top of them and closed at once: the connect's own socket needs free numbers too. */
const HEADROOM = 16

/**
 * Runs `connect` (which opens a socket) with the lowest free descriptors held, so the socket
 * gets a number above the connections the process opens later. `connect` calls `opened`
 * once its socket has its number (the TCP connection is up), to give them back before the
 * rest of the start-up; otherwise they go back when it settles.
 *
 * Why: when a process is killed (kill -9, the OOM killer), Linux closes its descriptors in
 * reverse order of their numbers, the highest first, and each closed connection's server
 * backend wakes to exit and competes for the CPUs with the rest. Closed first, the lock
 * session's backend frees the lock before the others' exits run; closed last, behind a
 * holder's four other connections, it freed the lock about 5 ms later on a 2-core machine
 * (bench: "the killed node's backend is gone"). Only an ordering: nothing depends on it
 * for correctness. So it stands aside wherever it could get in the way: on other
 * platforms; when the process cannot open 16 more than it holds (near its descriptor
 * limit, holding them would make the connect itself fail with EMFILE); when /dev/null is
 * not the null device. At the end it closes only numbers that are still the null device:
 * one that another part of the process closed and reused meanwhile (by a double close, a
 * bug of its own) is left to it, unless that part opened /dev/null too, which cannot be
 * told apart.
 */
export async function withHighDescriptor<T>(
  connect: (opened: () => void) => Promise<T>,
): Promise<T> {
  let held = process.platform === 'linux' ? reserve() : NONE
  const opened = () => {
    release(held)
    held = NONE
  }
  try {
    return await connect(opened)
  } finally {
    opened()
  }
}

/** The descriptors held, and the device number that marks them as ours (/dev/null's). */
interface Held {
  fds: number[]
  device: number
}

const NONE: Held = { fds: [], device: -1 }

function reserve(): Held {
  const fds: number[] = []
  try {
    while (fds.length < RESERVED + HEADROOM) fds.push(openSync(devNull, 'r'))
    const stat = fstatSync(fds[0] as number)
    if (!stat.isCharacterDevice()) throw new Error(`${devNull} is not a device here`)
    for (const fd of fds.splice(RESERVED)) closeSync(fd)
    return { fds, device: stat.rdev }
  } catch {
    // Near the limit, or no null device: give every one back.
    for (const fd of fds) closeQuietly(fd)
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
