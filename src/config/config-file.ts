import { readFile } from 'node:fs/promises'
import { dirname, resolve as resolvePath } from 'node:path'
import { pathToFileURL } from 'node:url'
import { SingletonError } from '../errors.js'
import { DEFAULTS, type SingletonOptions } from './options.js'
import type { RetentionPolicy } from './policy.js'
import type { ConfigFileTask, SingletonTask } from './task.js'

/** The JSON config file: the singleton's name, its policies and tasks, and optional timing knobs. */
export type ConfigFile = Pick<SingletonOptions, 'name' | 'policies' | 'workQueue'> & {
  /** Tasks, each `module` made absolute (relative paths are read from the config file's folder). */
  tasks?: ConfigFileTask[]
} & Partial<Record<keyof typeof DEFAULTS, number>>

const FILE_KEYS = new Set<string>([
  'name',
  'policies',
  'tasks',
  'workQueue',
  ...Object.keys(DEFAULTS),
])
const TASK_FILE_KEYS = new Set(['name', 'module', 'every', 'cron', 'timeZone', 'timeout'])

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
  let tasks: ConfigFileTask[] | undefined
  if (config.tasks !== undefined) {
    if (!Array.isArray(config.tasks)) {
      throw new SingletonError(
        'INVALID_OPTION',
        `config file ${path}: "tasks" must be an array of { name, module, every or cron, timeZone?, timeout? }.`,
      )
    }
    tasks = config.tasks.map((raw: unknown, index) => {
      const at = `config file ${path}, tasks[${index}]`
      if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
        throw new SingletonError('INVALID_OPTION', `${at}: expected an object.`)
      }
      const task = raw as Record<string, unknown>
      for (const key of Object.keys(task)) {
        if (!TASK_FILE_KEYS.has(key)) {
          throw new SingletonError(
            'INVALID_OPTION',
            `${at}: unknown key "${key}"; a task has ${[...TASK_FILE_KEYS].join(', ')}.`,
          )
        }
      }
      if (typeof task.module !== 'string' || task.module.trim() === '') {
        throw new SingletonError(
          'INVALID_OPTION',
          `${at}: "module" must name an ES module whose default export is the handler.`,
        )
      }
      return {
        ...(task as object),
        module: resolvePath(dirname(resolvePath(path)), task.module),
      } as ConfigFileTask
    })
  }
  return {
    ...(config as object),
    name: config.name as string,
    policies: config.policies as RetentionPolicy[] | undefined,
    tasks,
  } as ConfigFile
}

/**
 * The handlers of a config file's tasks: each module's default export. A module that
 * cannot be loaded, or whose default export is not a function, fails start-up by name.
 */
export async function loadTasks(tasks: readonly ConfigFileTask[]): Promise<SingletonTask[]> {
  const loaded: SingletonTask[] = []
  for (const task of tasks) {
    let module: { default?: unknown }
    try {
      module = (await import(pathToFileURL(task.module).href)) as { default?: unknown }
    } catch (error) {
      throw new SingletonError(
        'INVALID_OPTION',
        `task "${task.name}", field module: ${task.module} could not be loaded (${(error as Error).message}).`,
        { cause: error },
      )
    }
    if (typeof module.default !== 'function') {
      throw new SingletonError(
        'INVALID_OPTION',
        `task "${task.name}", field module: ${task.module} has no default export that is a function (the handler).`,
      )
    }
    const { module: _path, ...rest } = task
    loaded.push({ ...rest, handler: module.default as SingletonTask['handler'] })
  }
  return loaded
}
