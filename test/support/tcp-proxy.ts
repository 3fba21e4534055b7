import net from 'node:net'

/**
 * A TCP relay that can partition: while partitioned, nothing crosses in either direction
 * and nothing is closed, as when a network silently drops packets. The server then sees
 * a silent client, and the client sees a silent server.
 */
export class PartitionableProxy {
  readonly #server: net.Server
  readonly #pairs = new Set<{
    client: net.Socket
    upstream: net.Socket | undefined
    held: (() => void)[]
  }>()
  #partitioned = false
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

  partition(): void {
    this.#partitioned = true
    for (const pair of this.#pairs) {
      pair.client.pause()
      pair.upstream?.pause()
    }
  }

  heal(): void {
    this.#partitioned = false
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
      client.on('data', (chunk) => upstream.write(chunk))
      upstream.on('data', (chunk) => client.write(chunk))
      // A close on one side reaches the other only across a healed network.
      const relayEnd = (to: net.Socket) => () => {
        if (this.#partitioned) pair.held.push(() => to.end())
        else to.end()
      }
      client.on('close', relayEnd(upstream))
      upstream.on('close', relayEnd(client))
      client.on('close', () => this.#pairs.delete(pair))
      if (this.#partitioned) {
        client.pause()
        upstream.pause()
      }
    }
    // A connection attempted during a partition hangs until it heals (or the client gives up).
    if (this.#partitioned) {
      client.pause()
      this.#waiting.push(start)
    } else start()
  }
}
