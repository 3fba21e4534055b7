import type pg from 'pg'

/** One holdership, from `pgsingleton.terms`. */
export interface Term {
  name: string
  epoch: number
  nodeId: string
  acquiredAt: Date
  /** Null while it lasts. */
  endedAt: Date | null
  /** `released` (a stop or step-down), `lost` (its session ended), `fenced` (it fenced itself), `superseded` (a newer epoch was found). */
  endReason: 'released' | 'lost' | 'fenced' | 'superseded' | null
  /** Who closed it: the holder itself, or the next holder (which found it still open). */
  closedBy: 'holder' | 'successor' | null
  detail: string | null
}

/** The latest terms, newest first: of every singleton, or of the one named. */
export async function readTerms(
  db: pg.Pool | pg.Client,
  name?: string,
  limit = 20,
): Promise<Term[]> {
  const { rows } = await db.query<{
    name: string
    epoch: string
    node_id: string
    acquired_at: Date
    ended_at: Date | null
    end_reason: Term['endReason']
    closed_by: Term['closedBy']
    detail: string | null
  }>(
    `SELECT * FROM (
       SELECT t.*, row_number() OVER (PARTITION BY t.name ORDER BY t.epoch DESC) AS n
         FROM pgsingleton.terms t WHERE $1::text IS NULL OR t.name = $1) x
      WHERE n <= $2 ORDER BY name, epoch DESC`,
    [name ?? null, limit],
  )
  return rows.map((row) => ({
    name: row.name,
    epoch: Number(row.epoch),
    nodeId: row.node_id,
    acquiredAt: row.acquired_at,
    endedAt: row.ended_at,
    endReason: row.end_reason,
    closedBy: row.closed_by,
    detail: row.detail,
  }))
}
