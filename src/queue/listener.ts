import pg from 'pg'
import type { PgBoss } from 'pg-boss'
import { quoteIdent } from '../config/identifier.js'
import { destroySocket, endClient } from '../db/client.js'
import { sqlState } from '../db/sqlstate.js'
import { SERVER_KEEPALIVE } from '../lock/lock-session.js'

interface ListenHandle {
  close(): Promise<void>
}

type Listen = (
  channel: string,
  onNotification: (payload: string) => void,
  onReconnect: () => void,
) => Promise<ListenHandle>

export interface ListenerSettings {
  /** What listens, for its errors: "pg-boss", "run requests". */
  what: string
  /** How often the connection proves it still listens (a query with a deadline). */
  heartbeatMs: number
  /** A query or connect that has not answered in this time means the path is dead. */
  deadlineMs: number
  onError(error: Error): void
}

/**
 * Gives a pg-boss instance this node owns a LISTEN connection of ours, through pg-boss's
 * own adapter contract (`IDatabase.listen`). pg-boss 12's listener takes every listener
 * off its client before ending it: when the server ends the session in that moment (a
 * restart, `pg_terminate_backend`, the holder's connections cut together), the client
 * emits an 'error' nobody hears, and Node ends the process. Seen in CI on a database
 * restart and reproduced by terminating a holder's backends in a loop. Here the client
 * keeps its error listener for its whole life, ends without one ever going missing, and
 * is replaced (with backoff) when it dies; pg-boss's polling stays the floor meanwhile.
 */
export function useOwnListener(
  boss: PgBoss,
  connection: pg.ClientConfig,
  settings: ListenerSettings,
): void {
  const db = boss.getDb() as { listen?: Listen }
  if (typeof db.listen !== 'function') return // an adapter without LISTEN: pg-boss polls
  db.listen = (channel, onNotification, onReconnect) =>
    listen(connection, settings, channel, onNotification, onReconnect)
}

/** How long to wait before the attempt after `attempt` failed ones: 250 ms, doubling to 5 s. */
export function listenBackoffMs(attempt: number): number {
  return Math.min(5000, 250 * 2 ** Math.min(attempt, 5))
}

/**
 * A LISTEN on a connection of its own, which proves every `heartbeatMs` that it still
 * listens and is replaced (with backoff) when it dies; `onReconnect` after each LISTEN
 * that took, the first included (what was announced meanwhile went unheard). Rejects when
 * the first connect or LISTEN fails. `signal` ends it at once, a connect under way too
 * (its socket destroyed): the returned promise then settles without waiting for it.
 *
 * The server's end gets the lock session's TCP keepalive and user timeout (where the
 * server takes them): a frozen client stops reading, and its backend, blocked writing
 * notifications to it, is not ended by idle_session_timeout; while blocked it holds back
 * the server's notification queue, which every database's NOTIFY shares.
 */
export async function listen(
  connection: pg.ClientConfig,
  settings: ListenerSettings,
  channel: string,
  onNotification: (payload: string) => void,
  onReconnect: () => void,
  signal?: AbortSignal,
): Promise<ListenHandle> {
  if (signal?.aborted) throw new Error(`the ${settings.what} LISTEN was stopped before it began`)
  let closed = false
  let current: pg.Client | undefined
  let heartbeat: NodeJS.Timeout | undefined
  let reconnect: NodeJS.Timeout | undefined
  let attempt = 0
  // The connection that listens now. Only its loss is reported and reconnected here: one
  // still connecting is its connect's to report (the first to pg-boss, which then polls;
  // a reconnect's to the retry that made it).
  let listening: pg.Client | undefined

  const lost = (client: pg.Client, error: Error) => {
    if (current !== client) return // an earlier connection, already given up
    current = undefined
    clearTimeout(heartbeat)
    // One still connecting is destroyed, not ended: pg's end() during a connect leaves the
    // connect unsettled for ever (pg emits 'error' during a connect without failing it
    // when, say, its password hashing throws).
    if (listening === client) client.end().catch(() => {})
    else destroySocket(client)
    if (closed || listening !== client) return
    listening = undefined
    settings.onError(
      new Error(`LISTEN connection lost (${settings.what}): ${error.message}`, { cause: error }),
    )
    scheduleReconnect()
  }
  const scheduleReconnect = () => {
    if (closed || reconnect) return
    const backoff = listenBackoffMs(attempt)
    attempt++
    reconnect = setTimeout(() => {
      reconnect = undefined
      connect().catch(() => scheduleReconnect())
    }, backoff)
  }
  const beat = (client: pg.Client) => {
    heartbeat = setTimeout(() => {
      client
        .query('SELECT $1 = ANY (ARRAY(SELECT pg_listening_channels())) AS listening', [channel])
        .then(({ rows }) => {
          if (rows[0]?.listening !== true) throw new Error('the LISTEN registration was lost')
          if (current === client) beat(client)
        })
        .catch((error: Error) => lost(client, error))
    }, settings.heartbeatMs)
  }
  const connect = async () => {
    if (closed) return
    const client = new pg.Client({
      ...connection,
      keepAlive: true,
      keepAliveInitialDelayMillis: 5000,
      connectionTimeoutMillis: settings.deadlineMs,
      query_timeout: settings.deadlineMs,
    })
    // Never removed: whatever the client emits after this, up to and past end(), is heard.
    client.on('error', (error) => lost(client, error))
    client.on('end', () => lost(client, new Error('the connection ended')))
    client.on('notification', (message) => {
      if (message.payload !== undefined) onNotification(message.payload)
    })
    current = client
    try {
      await client.connect()
      // In one statement, so that a stalled connection costs one deadline here, not four. A
      // server that refuses one of them (a platform without it) refuses them all, and the
      // connection goes on without; a timeout or a lost connection fails the connect.
      await client
        .query(
          `SELECT ${Object.keys(SERVER_KEEPALIVE)
            .map((_, i) => `set_config($${2 * i + 1}, $${2 * i + 2}, false)`)
            .join(', ')}`,
          Object.entries(SERVER_KEEPALIVE).flat(),
        )
        .catch((error) => {
          if (!sqlState(error)) throw error
        })
      await client.query(`LISTEN ${quoteIdent(channel)}`)
    } catch (error) {
      if (current === client) current = undefined
      await client.end().catch(() => {})
      throw error
    }
    if (closed) {
      await client.end().catch(() => {})
      return
    }
    if (current !== client) {
      // It died between its LISTEN and here: the caller tries again (or pg-boss polls).
      await client.end().catch(() => {})
      throw new Error('the LISTEN connection ended as it started')
    }
    listening = client
    attempt = 0
    beat(client)
    onReconnect() // pg-boss fetches what it may have missed while not listening
  }

  // Once: the abort's close and the caller's both wait for the same end.
  let closing: Promise<void> | undefined
  const close = () => {
    closing ??= closeOnce()
    return closing
  }
  const closeOnce = async () => {
    closed = true
    signal?.removeEventListener('abort', abort)
    clearTimeout(reconnect)
    clearTimeout(heartbeat)
    const client = current
    const ready = client !== undefined && client === listening
    current = undefined
    listening = undefined
    if (!client) return
    // Bounded: on a dead path pg-boss's stop would otherwise wait with it.
    if (ready) await endClient(client)
    // One still connecting or not yet listening: its socket destroyed, its connect or query
    // fails at once. (pg's end() during a connect leaves the connect unsettled for ever.)
    else destroySocket(client)
  }
  function abort() {
    void close()
  }
  signal?.addEventListener('abort', abort)
  try {
    await connect()
  } catch (error) {
    signal?.removeEventListener('abort', abort)
    throw error
  }
  return { close }
}
