/** The pg-boss queue of one singleton's cleanup jobs. */
export function queueName(singleton: string): string {
  return `pgsingleton.${singleton}`
}

/** What the holder puts in each job: the run to do, and the epoch that fences it. */
export interface CleanupJob {
  runId: string
  singleton: string
  policy: string
  epoch: number
}
