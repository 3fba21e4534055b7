import { hostname, userInfo } from 'node:os'
import type pg from 'pg'
import { loadConfigFile } from '../config/config-file.js'
import { resolvePolicies } from '../config/policy.js'
import { resolveTasks } from '../config/task.js'
import { assertSchemaCurrent } from '../db/migrate.js'
import { SingletonError } from '../errors.js'
import { forgetSingleton, pausePolicy, requestRun, resumePolicy } from '../operations/controls.js'
import { type PolicyPlan, planPolicies, planTasks, type TaskPlan } from '../operations/plan.js'
import { commandPool, resolveConnection } from './connection.js'

const say = (line: string) => process.stderr.write(`${line}\n`)

export interface Target {
  config: string
  name?: string
  embedded: boolean
}

/** The singleton a command is about: `--name`, or the name in the config file. */
async function singletonName(target: Target): Promise<string> {
  if (target.name) return target.name
  try {
    return (await loadConfigFile(target.config)).name
  } catch (error) {
    throw new SingletonError(
      'INVALID_OPTION',
      `which singleton? Pass --name NAME, or --config FILE with its name (${(error as Error).message})`,
      { cause: error },
    )
  }
}

async function withDatabase<T>(target: Target, work: (pool: pg.Pool) => Promise<T>): Promise<T> {
  const { url } = await resolveConnection(say, target)
  const pool = commandPool(url)
  try {
    await assertSchemaCurrent(pool)
    return await work(pool)
  } finally {
    await pool.end()
  }
}

const operator = () => `${userInfo().username}@${hostname()}`

export async function controlCommand(
  action: 'pause' | 'resume' | 'run-now',
  policy: string | undefined,
  target: Target,
): Promise<void> {
  if (!policy)
    throw new SingletonError(
      'INVALID_OPTION',
      `usage: pg-singleton ${action} POLICY [--name N | --config F]`,
    )
  const name = await singletonName(target)
  await withDatabase(target, async (pool) => {
    if (action === 'pause') {
      await pausePolicy(pool, name, policy, operator())
      say(
        `Paused policy "${policy}" of "${name}": no new run starts, and a run in flight stops at its next batch.`,
      )
    } else if (action === 'resume') {
      await resumePolicy(pool, name, policy, operator())
      say(`Resumed policy "${policy}" of "${name}"; occurrences it missed run once.`)
    } else {
      await requestRun(pool, name, policy, operator())
      say(
        `Asked for a run of policy "${policy}" of "${name}" now: the holder issues it at once, or once the policy's open run, if any, has ended.`,
      )
    }
  })
}

export async function forgetCommand(target: Target & { name?: string }): Promise<void> {
  const name = await singletonName(target)
  await withDatabase(target, async (pool) => {
    const { runs } = await forgetSingleton(pool, name)
    say(
      `Forgot singleton "${name}": its lease, schedules, ${runs} runs, registrations and controls are gone.`,
    )
  })
}

export async function planCommand(target: Target & { json?: boolean }): Promise<void> {
  const file = await loadConfigFile(target.config)
  const policies = resolvePolicies(file.policies)
  // A task's schedule needs no handler: its module is not loaded for a plan.
  const tasks = resolveTasks(
    (file.tasks ?? []).map(({ module: _module, ...task }) => ({ ...task, handler: () => {} })),
  )
  await withDatabase(target, async (pool) => {
    const { plans, warnings } = await planPolicies(pool, policies)
    const taskPlans = await planTasks(pool, file.name, tasks)
    if (target.json) {
      process.stdout.write(
        `${JSON.stringify({ singleton: file.name, plans, tasks: taskPlans, warnings }, null, 2)}\n`,
      )
      return
    }
    process.stdout.write(formatPlans(file.name, plans, warnings, taskPlans))
  })
}

export function formatPlans(
  name: string,
  plans: PolicyPlan[],
  warnings: string[],
  tasks: TaskPlan[] = [],
): string {
  const lines = [`${name}: what each policy would delete now (nothing is deleted)`, '']
  for (const task of tasks) {
    lines.push(
      `task "${task.task}": ${task.schedule}; next ${task.next.map((d) => d.toISOString()).join(', ')}`,
      '',
    )
  }
  for (const plan of plans) {
    lines.push(plan.understood)
    for (const t of plan.tables) {
      lines.push(
        `  ${t.relation}: ${t.outdated.toLocaleString('en')} outdated rows${t.oldest ? `, the oldest ${t.oldest}` : ''}; batches walk it ${t.strategy === 'index' ? 'in column order' : 'in page order'} (${t.access})`,
      )
    }
    lines.push(`  in all: ${plan.outdated.toLocaleString('en')} rows`, '')
  }
  for (const warning of warnings) lines.push(`warning: ${warning}`)
  return `${lines.join('\n')}\n`
}
