import net from 'node:net'

/**
 * A TCP relay that can partition: while partitioned, nothing crosses in either direction
 * and nothing is closed, as when a network silently drops packets. The server then sees
 * a silent client, and the client sees a silent server. By default what is sent meanwhile
 * waits and crosses once healed (a short outage); with `drop`, it is lost for good, as when
 * a path dies and the connections on it are dead for ever after.
 */
export class PartitionableProxy {
  readonly #server: net.Server
  readonly #pairs = new Set<{
    client: net.Socket
    upstream: net.Socket | undefined
    held: (() => void)[]
  }>()
  #partitioned = false
  #dropping = false
  #waiting: (() => void)[] = []

  constructor(
    private readonly targetHost: string,
    private readonly targetPort: number,
  ) {
    this.#server = net.createServer((client) => this.#accept(client))
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve))
    return (this.#server.address() as net.AddressInfo).port
  }

  partition({ drop = false }: { drop?: boolean } = {}): void {
    this.#partitioned = true
    this.#dropping = drop
    if (drop) return
    for (const pair of this.#pairs) {
      pair.client.pause()
      pair.upstream?.pause()
    }
  }

  heal(): void {
    this.#partitioned = false
    this.#dropping = false
    for (const pair of this.#pairs) {
      pair.client.resume()
      pair.upstream?.resume()
      for (const release of pair.held.splice(0)) release()
    }
    for (const start of this.#waiting.splice(0)) start()
  }

  async close(): Promise<void> {
    for (const pair of this.#pairs) {
      pair.client.destroy()
      pair.upstream?.destroy()
    }
    await new Promise((resolve) => this.#server.close(resolve))
  }

  #accept(client: net.Socket): void {
    const pair: { client: net.Socket; upstream: net.Socket | undefined; held: (() => void)[] } = {
      client,
      upstream: undefined,
      held: [],
    }
    this.#pairs.add(pair)
    client.on('error', () => {})
    const start = () => {
      const upstream = net.connect(this.targetPort, this.targetHost)
      pair.upstream = upstream
      upstream.on('error', () => {})
      client.on('data', (chunk) => {
        if (!this.#dropping) upstream.write(chunk)
      })
      upstream.on('data', (chunk) => {
        if (!this.#dropping) client.write(chunk)
      })
      // A close on one side reaches the other only across a healed network.
      const relayEnd = (to: net.Socket) => () => {
        if (this.#partitioned) pair.held.push(() => to.end())
        else to.end()
      }
      client.on('close', relayEnd(upstream))
      upstream.on('close', relayEnd(client))
      client.on('close', () => this.#pairs.delete(pair))
      if (this.#partitioned && !this.#dropping) {
        client.pause()
        upstream.pause()
      }
    }
    // A connection attempted during a partition hangs until it heals (or the client gives up).
    if (this.#partitioned && !this.#dropping) {
      client.pause()
      this.#waiting.push(start)
    } else start()
  }
}

/**
 * A TCP relay that passes what the client sends at once, and what the server sends up to
 * its AuthenticationOk (so a password exchange goes through); from there on it holds what
 * the server sends until the server closes the connection, then delivers it in one write,
 * and closes. A client so reads the server's last messages (say, the ReadyForQuery that
 * makes a new connection ready and the FATAL that ends its session) in one chunk, as it
 * can on a busy machine.
 */
export class CoalescingRelay {
  readonly #server: net.Server
  readonly #sockets = new Set<net.Socket>()

  constructor(
    private readonly targetHost: string,
    private readonly targetPort: number,
  ) {
    this.#server = net.createServer((client) => {
      const upstream = net.connect(this.targetPort, this.targetHost)
      this.#sockets.add(client).add(upstream)
      let pending = Buffer.alloc(0)
      let holding = false
      const held: Buffer[] = []
      client.on('error', () => {})
      upstream.on('error', () => {})
      client.on('data', (chunk) => upstream.write(chunk))
      upstream.on('data', (chunk) => {
        if (holding) {
          held.push(chunk)
          return
        }
        // Whole messages (a type byte, then a length that counts itself) pass until an
        // AuthenticationOk ('R', code 0), which is held with all that follows.
        pending = Buffer.concat([pending, chunk])
        let at = 0
        while (!holding && pending.length - at >= 5) {
          const length = pending.readInt32BE(at + 1)
          if (pending.length - at < 1 + length) break
          if (pending[at] === 0x52 && length === 8 && pending.readInt32BE(at + 5) === 0) {
            holding = true
            break
          }
          at += 1 + length
        }
        client.write(pending.subarray(0, at))
        if (holding) held.push(pending.subarray(at))
        pending = holding ? Buffer.alloc(0) : pending.subarray(at)
      })
      upstream.on('close', () => client.end(Buffer.concat(held)))
      client.on('close', () => upstream.destroy())
    })
  }
  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.#server.listen(0, '127.0.0.1', resolve))
    return (this.#server.address() as net.AddressInfo).port
  }

  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy()
    await new Promise((resolve) => this.#server.close(resolve))
  }
}
