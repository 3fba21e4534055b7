import { spawn } from 'node:child_process'
import { closeSync, fstatSync, openSync, readdirSync, readlinkSync, unlinkSync } from 'node:fs'
import { createServer, type Server, Socket } from 'node:net'
import { devNull, tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { withHighDescriptor } from '../src/lock/high-descriptor.js'

// The lock session's socket is opened under withHighDescriptor, so that a killed process
// closes it first (see the module). These tests hold it to its promises: the socket gets a
// number above the ones opened after it, it leaves nothing open, it stands aside near the
// descriptor limit, and it never closes a number that another part of the process reused.
describe.runIf(process.platform === 'linux')('withHighDescriptor', () => {
  let server: Server
  let port: number
  beforeAll(async () => {
    server = createServer((socket) => socket.on('error', () => {}))
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    port = (server.address() as { port: number }).port
  })
  afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())))

  const connectSocket = () =>
    new Promise<Socket>((resolve, reject) => {
      const socket = new Socket()
      socket.once('error', reject)
      socket.connect(port, '127.0.0.1', () => resolve(socket))
    })
  const descriptorOf = (socket: Socket) =>
    (socket as unknown as { _handle: { fd: number } })._handle.fd
  const nullCount = () =>
    readdirSync('/proc/self/fd').filter((fd) => {
      try {
        return readlinkSync(`/proc/self/fd/${fd}`) === devNull
      } catch {
        return false // the directory's own descriptor, gone by now
      }
    }).length

  it('gives the socket a number above the descriptors opened after it, and leaves none open', async () => {
    const before = nullCount()
    const socket = await withHighDescriptor(connectSocket)
    const later = openSync(devNull, 'r')
    try {
      expect(descriptorOf(socket)).toBeGreaterThan(later)
      // None of the 64 it held is left open: only `later` is new.
      expect(nullCount()).toBe(before + 1)
    } finally {
      closeSync(later)
      socket.destroy()
    }
  })

  it('leaves a number that someone else closed and reused during the connect to its new owner', async () => {
    // The lowest free number: the first one the reservation takes.
    const lowest = openSync(devNull, 'r')
    closeSync(lowest)
    const file = join(tmpdir(), `high-descriptor-${process.pid}`)
    let reused = -1
    const socket = await withHighDescriptor(async () => {
      closeSync(lowest) // a bug elsewhere closes one of ours...
      reused = openSync(file, 'w') // ...and the number goes to a file
      return connectSocket()
    })
    try {
      expect(reused).toBe(lowest)
      expect(fstatSync(reused).isFile()).toBe(true)
    } finally {
      closeSync(reused)
      unlinkSync(file)
      socket.destroy()
    }
  })

  it('gives them back as soon as the socket has its number, when told', async () => {
    const before = nullCount()
    let duringStartUp = -1
    const socket = await withHighDescriptor(async (opened) => {
      const connected = await connectSocket()
      opened() // what the lock session does on its socket's 'connect'
      duringStartUp = nullCount() // the start-up and authentication that follow
      return connected
    })
    socket.destroy()
    expect(duringStartUp).toBe(before)
  })

  // A process at its limit with this many descriptors free: holding 64 with fewer than two
  // left over would leave the connect none (EMFILE), so it holds none.
  it.each([10, 63, 64, 65, 66, 80, 81])(
    'connects with %i descriptors free below the limit',
    async (free) => {
      // Compiled code (npm test builds first): the child runs plain Node.
      const module = pathToFileURL(
        join(import.meta.dirname, '../dist/src/lock/high-descriptor.js'),
      ).href
      const script = `
        import { openSync, closeSync } from 'node:fs'
        import { Socket } from 'node:net'
        const { withHighDescriptor } = await import(${JSON.stringify(module)})
        const filler = []
        try { for (;;) filler.push(openSync('/dev/null', 'r')) } catch (error) { if (error.code !== 'EMFILE') throw error }
        for (const fd of filler.splice(-${free})) closeSync(fd)
        const socket = await withHighDescriptor(() => new Promise((resolve, reject) => {
          const s = new Socket(); s.once('error', reject); s.connect(${port}, '127.0.0.1', () => resolve(s))
        }))
        console.log('connected', socket._handle.fd)
        socket.destroy()
      `
      const child = spawn('sh', [
        '-c',
        `ulimit -n 300 && exec "$0" --input-type=module -e "$1"`,
        process.execPath,
        script,
      ])
      let output = ''
      child.stdout.on('data', (chunk) => (output += chunk))
      child.stderr.on('data', (chunk) => (output += chunk))
      const code = await new Promise<number | null>((resolve) => child.on('exit', resolve))
      expect(output).toMatch(/^connected \d+/)
      expect(code).toBe(0)
    },
  )
})
