import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import pg from 'pg'
import { errorMessage } from '../errors.js'
import { readDashboard } from './data.js'
import { renderFragment, renderPage } from './render.js'

export interface DashboardServer {
  readonly url: string
  close(): Promise<void>
}

/** Browsers are told to look again at least this often, besides the pushes. */
const TICK_MS = 2000

/**
 * The read-only status page: `/` (the page, rendered here), `/fragment` (its live part),
 * `/api/status` (the same as JSON) and `/events` (server-sent events: one at every epoch
 * bump and term end, which the database announces on channel pgsingleton, and one every
 * two seconds). It reads through a pool of two connections and listens on a third.
 */
export async function startDashboard(options: {
  connectionString: string
  port: number
  host: string
}): Promise<DashboardServer> {
  const pool = new pg.Pool({
    connectionString: options.connectionString,
    max: 2,
    application_name: 'pg-singleton dashboard',
  })
  pool.on('error', () => {})
  const clients = new Set<ServerResponse>()
  const push = (data: string) => {
    for (const client of clients) client.write(`data: ${data}\n\n`)
  }

  // LISTEN needs a connection of its own; it comes back after a drop.
  let listener: pg.Client | undefined
  let closed = false
  const listen = async (): Promise<void> => {
    while (!closed) {
      const client = new pg.Client({
        connectionString: options.connectionString,
        application_name: 'pg-singleton dashboard listen',
      })
      // Heard from the start: a session that ends as the connection becomes ready emits
      // 'error' before any awaited step returns, and unheard it would end the process.
      const gone = new Promise<void>((resolve) => {
        client.on('error', () => resolve())
        client.once('end', () => resolve())
      })
      try {
        await client.connect()
        client.on('notification', (message) => push(message.payload ?? 'change'))
        await client.query('LISTEN pgsingleton')
        listener = client
        await gone
      } catch {
        // the database is away: try again
      }
      listener = undefined
      await client.end().catch(() => {})
      if (!closed) await new Promise((resolve) => setTimeout(resolve, 1000))
    }
  }
  const listening = listen()
  const tick = setInterval(() => push('tick'), TICK_MS)

  const handle = async (request: IncomingMessage, response: ServerResponse) => {
    const path = new URL(request.url ?? '/', 'http://localhost').pathname
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      response.writeHead(405, { allow: 'GET, HEAD' }).end('read-only\n')
      return
    }
    const headers = { 'cache-control': 'no-store', 'x-content-type-options': 'nosniff' }
    switch (path) {
      case '/':
        response
          .writeHead(200, { ...headers, 'content-type': 'text/html; charset=utf-8' })
          .end(renderPage(await readDashboard(pool)))
        return
      case '/fragment':
        response
          .writeHead(200, { ...headers, 'content-type': 'text/html; charset=utf-8' })
          .end(renderFragment(await readDashboard(pool)))
        return
      case '/api/status':
        response
          .writeHead(200, { ...headers, 'content-type': 'application/json' })
          .end(`${JSON.stringify(await readDashboard(pool), null, 2)}\n`)
        return
      case '/events':
        response.writeHead(200, {
          ...headers,
          'content-type': 'text/event-stream',
          connection: 'keep-alive',
        })
        response.write('retry: 2000\n\n')
        clients.add(response)
        request.on('close', () => clients.delete(response))
        return
      default:
        response.writeHead(404, { ...headers, 'content-type': 'text/plain' }).end('not found\n')
    }
  }
  const server: Server = createServer((request, response) => {
    handle(request, response).catch((error) => {
      if (!response.headersSent) {
        response
          .writeHead(503, { 'content-type': 'text/plain; charset=utf-8' })
          .end(`the database cannot be read: ${errorMessage(error)}\n`)
      } else response.end()
    })
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(options.port, options.host, () => resolve())
  })
  const address = server.address() as AddressInfo
  const shownHost = options.host === '0.0.0.0' ? '127.0.0.1' : options.host
  return {
    url: `http://${shownHost.includes(':') ? `[${shownHost}]` : shownHost}:${address.port}/`,
    async close() {
      closed = true
      clearInterval(tick)
      for (const client of clients) client.end()
      clients.clear()
      await listener?.end().catch(() => {})
      await listening
      await new Promise((resolve) => server.close(resolve))
      await pool.end()
    },
  }
}
