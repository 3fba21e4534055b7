/**
 * The app of the cleanup benchmark, in a process of its own as a real app would be (so
 * that the cleaner's work in the benchmark's process never delays the app's measurements):
 * 4 connections, each reading one young row and updating another, 100 times a second,
 * recording each operation's latency and when it started (ms since the epoch, this host's
 * clock, which the server on it shares). Driven over IPC: 'mark' answers with the
 * operations since the last mark, 'stop' ends it.
 */
import pg from 'pg'

const [url, table, from, to] = process.argv.slice(2) as [string, string, string, string]
const youngFrom = Number(from)
const youngTo = Number(to)
let running = true
/** [started (ms since the epoch), latency (ms)] of each operation. */
const operations: [number, number][] = []

const loops = Array.from({ length: 4 }, async () => {
  const client = new pg.Client({ connectionString: url })
  await client.connect()
  while (running) {
    const at = Date.now()
    const started = performance.now()
    const id = youngFrom + Math.floor(Math.random() * (youngTo - youngFrom))
    await client.query(`SELECT payload FROM ${table} WHERE id = $1`, [id])
    await client.query(`UPDATE ${table} SET payload = md5(random()::text) WHERE id = $1`, [id + 1])
    const spent = performance.now() - started
    operations.push([at, spent])
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, 10 - spent)))
  }
  await client.end()
})

process.send?.('ready')
process.on('message', (message) => {
  if (message === 'mark') process.send?.(operations.splice(0))
  if (message === 'stop') {
    running = false
    Promise.all(loops).then(() => process.exit(0))
  }
})
