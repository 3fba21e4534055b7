import type pg from 'pg'

/**
 * Destroys a pg client's socket at once (pg has no public way): a query in flight fails,
 * and the server ends the session when it sees the socket gone.
 */
export function destroySocket(client: pg.Client | pg.PoolClient): void {
  ;(
    client as unknown as { connection?: { stream?: { destroy(): void } } }
  ).connection?.stream?.destroy()
}

/**
 * Ends a client gracefully when the server answers within `graceMs`, and destroys its
 * socket either way: on a dead path a graceful end would wait out the kernel's
 * retransmissions.
 */
export async function endClient(client: pg.Client, graceMs = 1000): Promise<void> {
  await Promise.race([
    client.end().catch(() => {}),
    new Promise((resolve) => setTimeout(resolve, graceMs).unref()),
  ])
  destroySocket(client)
}
