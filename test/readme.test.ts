import { spawn } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { describe, expect, it } from 'vitest'
import { countRows, createEventsTable, insertRows, statusOf } from './support/app-table.js'
import { createTestDatabase, waitFor } from './support/database.js'

const root = fileURLToPath(new URL('..', import.meta.url))

/** The README's app, exactly as written there (the block after `<!-- readme-app -->`). */
async function readmeApp(): Promise<string> {
  const readme = await readFile(new URL('../README.md', import.meta.url), 'utf8')
  const block = /<!-- readme-app -->\s*```js\n([\s\S]*?)```/.exec(readme)?.[1]
  if (!block) throw new Error('the README has no <!-- readme-app --> block')
  return block.replace(/^ {3}/gm, '')
}

describe("the README's app snippet", () => {
  it.each(['SIGTERM', 'SIGINT'] as const)(
    'cleans, and on %s hands over, ends its pool and exits 0',
    async (signal) => {
      // A database each: the policy runs every minute, and its schedule lives in the database.
      const db = await createTestDatabase()
      await createEventsTable(db.pool)
      await insertRows(db.pool, 40, '40 days')
      // Run in the package's folder, so `import ... from 'pg-singleton'` resolves to this package.
      const child = spawn(process.execPath, ['--input-type=module', '-e', await readmeApp()], {
        cwd: root,
        env: { ...process.env, DATABASE_URL: db.url },
        stdio: ['ignore', 'pipe', 'pipe'],
      })
      let output = ''
      child.stdout.on('data', (chunk) => {
        output += chunk
      })
      child.stderr.on('data', (chunk) => {
        output += chunk
      })
      const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
      try {
        await waitFor('the app to hold and clean', async () =>
          /holding the singleton/.test(output) && (await countRows(db.pool, 'true')) === 0
            ? true
            : undefined,
        )
        child.kill(signal)
        expect(await exited, output).toBe(0)
        expect(output).toMatch(new RegExp(`${signal}: handing the singleton over`))
        // Released on the way out: no backend holds it.
        expect((await statusOf(db.pool, 'db-cleaner'))?.nodeId).toBeNull()
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL')
        await db.drop()
      }
    },
  )
})
