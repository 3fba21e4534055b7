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
