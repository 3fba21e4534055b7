import { readFile } from 'node:fs/promises'
import { SingletonError } from '../errors.js'
import { DEFAULTS, type SingletonOptions } from './options.js'
import type { RetentionPolicy } from './policy.js'

/** The JSON config file: the singleton's name, its policies, and optional timing knobs. */
export type ConfigFile = Pick<SingletonOptions, 'name' | 'policies' | 'workQueue'> &
  Partial<Record<keyof typeof DEFAULTS, number>>

const FILE_KEYS = new Set<string>(['name', 'policies', 'workQueue', ...Object.keys(DEFAULTS)])

/**
 * Reads and shape-checks a config file. Values are validated in full by
 * `createSingleton` (options) and `start()` (against the database); here an unknown key
 * is refused, so a typo such as `olderthan` cannot silently fall back to a default.
 */
export async function loadConfigFile(path: string): Promise<ConfigFile> {
  let text: string
  try {
    text = await readFile(path, 'utf8')
  } catch (error) {
    throw new SingletonError(
      'INVALID_OPTION',
      `config file ${path}: cannot be read (${(error as Error).message}). Pass --config FILE or create ./pg-singleton.config.json.`,
      {
        cause: error,
      },
    )
  }
  let parsed: unknown
  try {
    parsed = JSON.parse(text)
  } catch (error) {
    throw new SingletonError(
      'INVALID_OPTION',
      `config file ${path}: not valid JSON (${(error as Error).message}).`,
      { cause: error },
    )
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new SingletonError(
      'INVALID_OPTION',
      `config file ${path}: expected a JSON object with "name" and "policies".`,
    )
  }
  for (const key of Object.keys(parsed)) {
    if (!FILE_KEYS.has(key)) {
      throw new SingletonError(
        'INVALID_OPTION',
        `config file ${path}: unknown key "${key}"; known keys are ${[...FILE_KEYS].join(', ')}.`,
      )
    }
  }
  const config = parsed as Record<string, unknown>
  return {
    ...(config as object),
    name: config.name as string,
    policies: config.policies as RetentionPolicy[],
  } as ConfigFile
}
