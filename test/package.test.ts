import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { describe, expect, it } from 'vitest'

const root = fileURLToPath(new URL('..', import.meta.url))

/** Runs an ES module in a plain Node process inside the package, as a user's code would. */
async function inNode(source: string): Promise<unknown> {
  const { stdout } = await promisify(execFile)(
    process.execPath,
    ['--input-type=module', '-e', source],
    { cwd: root },
  )
  return JSON.parse(stdout)
}

describe('the built package, imported by its name through package.json "exports"', () => {
  it('exports exactly the public API from its front door', async () => {
    const keys = await inNode(
      `const api = await import('pg-singleton'); console.log(JSON.stringify(Object.keys(api).sort()))`,
    )
    expect(keys).toEqual(
      [
        'DEFAULTS',
        'SCHEMA_REVISION',
        'SCHEMA_VERSION',
        'Singleton',
        'SingletonError',
        'assertSchemaCurrent',
        'consoleLogger',
        'createSingleton',
        'forgetSingleton',
        'pausePolicy',
        'planPolicies',
        'readPolicyStatus',
        'readTerms',
        'requestRun',
        'resumePolicy',
        'loadConfigFile',
        'lockKey',
        'migrateToLatest',
        'migrationFiles',
        'migrationProvider',
        'migrations',
        'withPgSingletonMigrations',
        'readStatus',
        'silentLogger',
      ].sort(),
    )
  })

  it('exports its migrations for an app that runs its own Kysely migrator', async () => {
    const result = await inNode(`
      const { migrations, migrationProvider, SCHEMA_VERSION } = await import('pg-singleton/migrations')
      console.log(JSON.stringify({ names: Object.keys(migrations), provided: Object.keys(await migrationProvider.getMigrations()), SCHEMA_VERSION,
        up: typeof migrations['pgsingleton_0001_initial'].up, down: typeof migrations['pgsingleton_0001_initial'].down }))`)
    expect(result).toEqual({
      names: [
        'pgsingleton_0001_initial',
        'pgsingleton_0002_safe_deletes',
        'pgsingleton_0003_tasks',
        'pgsingleton_0004_faster_batches',
        'pgsingleton_0005_hand_over',
        'pgsingleton_0006_equal_values',
        'pgsingleton_0007_plain_bounds',
        'pgsingleton_0008_run_requests',
        'pgsingleton_0009_locked_leaves',
        'pgsingleton_pgboss_schema',
      ],
      provided: [
        'pgsingleton_0001_initial',
        'pgsingleton_0002_safe_deletes',
        'pgsingleton_0003_tasks',
        'pgsingleton_0004_faster_batches',
        'pgsingleton_0005_hand_over',
        'pgsingleton_0006_equal_values',
        'pgsingleton_0007_plain_bounds',
        'pgsingleton_0008_run_requests',
        'pgsingleton_0009_locked_leaves',
        'pgsingleton_pgboss_schema',
      ],
      SCHEMA_VERSION: 3,
      up: 'function',
      down: 'function',
    })
  })

  it('keeps its internals internal', async () => {
    const code = await inNode(
      `import('pg-singleton/dist/src/singleton.js').then(() => console.log('"imported"'), (e) => console.log(JSON.stringify(e.code)))`,
    )
    expect(code).toBe('ERR_PACKAGE_PATH_NOT_EXPORTED')
  })
})
