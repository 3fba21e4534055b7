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
