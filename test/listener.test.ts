import net from 'node:net'
import { describe, expect, it } from 'vitest'
import { listen } from '../src/queue/listener.js'
import { useTestDatabase, waitFor } from './support/database.js'

const db = useTestDatabase({ migrate: false })
const settings = { what: 'test', heartbeatMs: 10_000, deadlineMs: 30_000, onError: () => {} }

describe('a LISTEN connection of our own', () => {
  it('ends at once when its signal aborts, a connect to a server that never answers too', async () => {
    // A peer that accepts and then says nothing: a dead path, or a full pool in front.
    const sockets = new Set<net.Socket>()
    const closed = new Set<net.Socket>()
    const silent = net.createServer((socket) => {
      sockets.add(socket)
      socket.on('close', () => closed.add(socket))
      socket.on('error', () => {})
      socket.resume() // reads (and ignores) the start-up message, so that its end is seen
    })
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
    const { port } = silent.address() as net.AddressInfo
    try {
      const ended = new AbortController()
      const began = performance.now()
      const listening = listen(
        { connectionString: `postgres://nobody@127.0.0.1:${port}/nothing` },
        settings,
        'anything',
        () => {},
        () => {},
        ended.signal,
      )
      await waitFor('the connect under way', async () => (sockets.size > 0 ? true : undefined))
      ended.abort()
      await expect(listening).rejects.toThrow()
      // Its own deadline is 30 s: the abort, not the deadline, ended it.
      expect(performance.now() - began).toBeLessThan(5000)
      await waitFor('the socket closed', async () =>
        closed.size === sockets.size ? true : undefined,
      )
    } finally {
      for (const socket of sockets) socket.destroy()
      await new Promise((resolve) => silent.close(resolve))
    }
  })

  it('an error the client emits during its connect, which pg does not turn into a failed connect, fails the first connect at once', async () => {
    // A peer that asks for an MD5 password: the client's hashing throws (here on a password
    // that is no string; in a FIPS build, on md5 itself), and pg emits it as an 'error' of
    // the client without settling the connect, which only its 30 s deadline would end.
    const sockets = new Set<net.Socket>()
    const md5 = net.createServer((socket) => {
      sockets.add(socket)
      socket.on('error', () => {})
      socket.once('data', (startup) => {
        // A plain protocol 3.0 start-up (no SSLRequest, whose refusal pg fails on its own).
        if (startup.length < 8 || startup.readInt32BE(4) !== 196608) {
          socket.destroy()
          return
        }
        const ask = Buffer.alloc(13)
        ask.write('R', 0)
        ask.writeInt32BE(12, 1)
        ask.writeInt32BE(5, 5) // AuthenticationMD5Password, then a 4-byte salt
        socket.write(ask)
      })
    })
    await new Promise<void>((resolve) => md5.listen(0, '127.0.0.1', resolve))
    const { port } = md5.address() as net.AddressInfo
    const errors: Error[] = []
    try {
      const began = performance.now()
      await expect(
        listen(
          {
            host: '127.0.0.1',
            port,
            user: 'nobody',
            database: 'nothing',
            password: Symbol('no string') as unknown as string,
            ssl: false,
          },
          { ...settings, onError: (error) => errors.push(error) },
          'anything',
          () => {},
          () => {},
        ),
      ).rejects.toThrow(/Connection terminated/)
      expect(performance.now() - began).toBeLessThan(5000)
      // A first connect's failure is the caller's to report, not the listener's.
      expect(errors).toEqual([])
    } finally {
      for (const socket of sockets) socket.destroy()
      await new Promise((resolve) => md5.close(resolve))
    }
  })

  it('reports a lost connection by what listens, connects again, and hears again', async () => {
    const ended = new AbortController()
    const heard: string[] = []
    const errors: Error[] = []
    let listens = 0
    const name = 'listener reconnecting'
    const handle = await listen(
      { connectionString: db.url, application_name: name },
      { ...settings, onError: (error) => errors.push(error) },
      'some channel',
      (payload) => heard.push(payload),
      () => listens++,
      ended.signal,
    )
    try {
      const backend = async (other = 0) =>
        (
          await db.pool.query<{ pid: number }>(
            `SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = $1 AND pid <> $2`,
            [name, other],
          )
        ).rows[0]?.pid
      const first = await backend()
      expect(first).toBeDefined()
      await db.pool.query('SELECT pg_terminate_backend($1)', [first])
      await waitFor('the loss reported', async () => (errors.length > 0 ? true : undefined))
      expect(errors[0]?.message).toMatch(/^LISTEN connection lost \(test\): /)
      // Connected again after its backoff (250 ms), and told so: what was announced
      // meanwhile went unheard.
      await waitFor('listening again', async () => (listens === 2 ? true : undefined))
      // A new backend, not the old one still on its way out.
      expect(await backend(first)).toBeDefined()
      await db.pool.query(`SELECT pg_notify('some channel', 'again')`)
      await waitFor('the notification', async () => (heard.length > 0 ? true : undefined))
      expect(heard).toEqual(['again'])
      expect(errors).toHaveLength(1)
    } finally {
      ended.abort()
      await handle.close()
    }
  })

  it('hears its channel, and its backend is gone once its signal aborts', async () => {
    const ended = new AbortController()
    const heard: string[] = []
    let listens = 0
    await listen(
      { connectionString: db.url, application_name: 'listener under test' },
      settings,
      'some channel',
      (payload) => heard.push(payload),
      () => listens++,
      ended.signal,
    )
    expect(listens).toBe(1)
    await db.pool.query(`SELECT pg_notify('some channel', 'hello')`)
    await waitFor('the notification', async () => (heard.length > 0 ? true : undefined))
    expect(heard).toEqual(['hello'])
    const backends = async () =>
      (
        await db.pool.query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_stat_activity
            WHERE datname = current_database() AND application_name = 'listener under test'`,
        )
      ).rows[0]?.n
    expect(await backends()).toBe(1)
    ended.abort()
    await waitFor('its backend gone', async () => ((await backends()) === 0 ? true : undefined))
  })
})
