import { createRequire } from 'node:module'
import { SingletonError } from './errors.js'

/**
 * The peer dependencies pg-singleton runs with, and the versions it is tested on. An app
 * brings its own `pg` and `pg-boss`; one of another major fails inside pg-boss at run
 * time in ways that leave runs waiting forever, so `start()` checks first.
 */
export const PEERS = {
  'pg-boss': { range: '>=12.38.0 <13', min: [12, 38, 0], major: 12 },
  // pg.escapeLiteral, which batches use, came in 8.11.
  pg: { range: '>=8.11.0 <9', min: [8, 11, 0], major: 8 },
} as const

export type Peer = keyof typeof PEERS

/** The version of `name` this module resolves, and where it was found. */
export function installedVersion(name: Peer): { version: string; path: string } {
  const require = createRequire(import.meta.url)
  const path = require.resolve(`${name}/package.json`)
  return { version: (require(path) as { version: string }).version, path }
}

/** Whether `version` is in the supported range of `name`. */
export function supports(name: Peer, version: string): boolean {
  const { min, major } = PEERS[name]
  const parts = version.split(/[.+-]/).slice(0, 3).map(Number)
  if (parts.length < 3 || parts.some((p) => !Number.isInteger(p))) return false
  const [maj = 0, minor = 0, patch = 0] = parts
  if (maj !== major) return false
  if (minor !== min[1]) return minor > min[1]
  return patch >= min[2]
}

/** Throws a clear error naming what was found and what is supported. */
export function assertPeersSupported(): void {
  for (const name of Object.keys(PEERS) as Peer[]) {
    const { version, path } = installedVersion(name)
    if (!supports(name, version)) {
      throw new SingletonError(
        'UNSUPPORTED_DEPENDENCY',
        `pg-singleton supports ${name} ${PEERS[name].range}, but ${name} ${version} is installed (${path}). ` +
          `Install a supported version in your app (npm install ${name}@${PEERS[name].major}); pg-singleton uses your app's ${name}, not a copy of its own.`,
      )
    }
  }
}
