import pg from 'pg'
import { fingerprint, type RunDefinition } from '../config/definition.js'
import { destroySocket, endClient } from '../db/client.js'
import { SQLSTATE, sqlState } from '../db/sqlstate.js'
import { errorMessage, SingletonError } from '../errors.js'
import { withHighDescriptor } from './high-descriptor.js'
import { keepsSession, sessionNotKept, sharedSession } from './session-pinning.js'

/**
 * The protocol this code speaks, declared on the lock session. A database migrated to a
 * schema that requires more refuses this node's epoch bumps, with a message that says to
 * upgrade (migrations/0002).
 */
export const PROTOCOL = 3

export interface Lease {
  readonly name: string
  readonly epoch: number
  readonly nodeId: string
  readonly backendPid: number
  readonly acquiredAt: Date
}

export interface LockSessionSettings {
  readonly name: string
  readonly nodeId: string
  readonly idleSessionTimeoutMs: number
  readonly lockWaitSliceMs: number
  /** How often the server checks, during a long lock wait, that our socket is still there. */
  readonly connectionCheckMs: number
  /**
   * A statement of the lock session that has not answered this long after it should have
   * (a wait slice after its slice) is taken as a sign the connection is dead: the socket
   * is destroyed and the node queues again on a new one.
   */
  readonly deadAfterMs: number
}

/**
 * TCP keepalive of the server's end of the lock session, so that the server ends the
 * backend of a client whose path died without a word (and it leaves the lock queue): idle
 * 5 s, then a probe every 2 s, dead after 3 missed, and data unacknowledged for 10 s.
 * Together with client_connection_check_interval, a waiting backend of a vanished client
 * is gone within about 12 s.
 */
export const SERVER_KEEPALIVE = {
  tcp_keepalives_idle: '5',
  tcp_keepalives_interval: '2',
  tcp_keepalives_count: '3',
  tcp_user_timeout: '10000',
}

/** What the lock session goes on without, for the node to warn of (`SingletonWarning`). */
export interface SessionWarning {
  readonly code: 'SESSION_SETTING_REFUSED' | 'TAKEOVER_NOT_READIED' | 'SESSION_CHECK_SKIPPED'
  readonly message: string
}

/** The SQLSTATE of the error the readying raises to undo its bump (a class of our own). */
const UNDONE = 'PGS01'

/**
 * The readying of a session (a standby's for its takeover, a holder's for its hand-over):
 * one DO statement that runs `setup`, then `body` in a subtransaction it rolls back, so
 * what the body loads stays in the session and what it writes or notifies does not. Both
 * may name `warm_up`, a singleton name of this session's own ('warm-up <backend pid>':
 * real names have no space).
 */
function undone(setup: string, body: string): string {
  return `DO $ready$
   DECLARE
     warm_up text := 'warm-up ' || pg_backend_pid();
     warm_epoch bigint;
   BEGIN
     ${setup}
     BEGIN
       ${body}
       RAISE EXCEPTION 'undone' USING ERRCODE = '${UNDONE}';
     EXCEPTION WHEN SQLSTATE '${UNDONE}' THEN
       NULL;
     END;
   END $ready$`
}

/** What one slice of a standby's wait ended with. */
type WaitSlice = 'acquired' | 'waiting' | 'moved'

/**
 * One dedicated connection that waits for, holds and releases the singleton's advisory
 * lock. Never a pooled client: a pooled connection goes back to its pool with the lock
 * still on it, and the lock's lifetime must be exactly this session's.
 */
export class LockSession {
  readonly #client: pg.Client
  readonly #connection: pg.ClientConfig
  readonly #settings: LockSessionSettings
  #closed = false
  #backendPid = 0
  #warnings: SessionWarning[] = []

  constructor(connection: pg.ClientConfig, settings: LockSessionSettings) {
    this.#settings = settings
    this.#connection = {
      // A connect into a partition would otherwise wait out the kernel's SYN retries (minutes).
      connectionTimeoutMillis: 10_000,
      ...connection,
      // The client's own keepalive; behind a TCP proxy it only reaches the proxy, which is
      // why every statement of this session also has a deadline of its own.
      keepAlive: true,
      keepAliveInitialDelayMillis: 5000,
    }
    this.#client = new pg.Client({ ...this.#connection, application_name: settings.nodeId })
  }

  /**
   * What the session goes on without: settings the server refused (say, on some
   * platforms), and a readying for the takeover that failed.
   */
  get warnings(): readonly SessionWarning[] {
    return this.#warnings
  }

  get backendPid(): number {
    return this.#backendPid
  }

  /** Registers a listener for the session's end (server closed it, network error). */
  onLost(listener: (error: Error) => void): void {
    this.#client.on('error', listener)
    this.#client.on('end', () => listener(new Error('the lock session ended')))
  }

  async connect(): Promise<void> {
    // An idle client that errors emits 'error'; without a listener Node would end the process.
    this.#client.on('error', () => {})
    // The descriptors are held until the socket has its number: not through the start-up
    // and authentication that follow.
    await withHighDescriptor((opened) => {
      ;(
        this.#client as unknown as { connection?: { stream?: NodeJS.EventEmitter } }
      ).connection?.stream?.once('connect', opened)
      return this.#client.connect()
    })
    const { rows } = await this.#client.query<{ pid: number; version: number }>(
      `SELECT pg_backend_pid() AS pid, current_setting('server_version_num')::int AS version`,
    )
    const first = rows[0]
    if (!first || first.version < 140000) {
      throw new SingletonError(
        'SESSION_NOT_KEPT',
        `PostgreSQL ${first?.version ?? '?'} is too old: the lock session needs idle_session_timeout (PostgreSQL 14+) to cut off a silent holder.`,
      )
    }
    const { idleSessionTimeoutMs, lockWaitSliceMs, connectionCheckMs } = this.#settings
    // An epoch bump (and a hand-over's) commits with this session's synchronous_commit, and
    // must never be lost once committed: a server crash that takes back a bump would give
    // the same epoch, the fencing token, to the next holder. So where the role or database
    // turned it off for the app, 'on' (the server's default: the local WAL flush, and the
    // synchronous standbys if any are configured); any other value is the operator's, and
    // left alone (not pinned: a reload still reaches it).
    await this.#client.query(
      `SELECT set_config('idle_session_timeout', $1, false),
              set_config('lock_timeout', $2, false),
              set_config('statement_timeout', '0', false),
              set_config('pgsingleton.protocol', $3, false),
              (SELECT set_config('synchronous_commit', 'on', false)
                WHERE current_setting('synchronous_commit') = 'off')`,
      [`${idleSessionTimeoutMs}ms`, `${lockWaitSliceMs}ms`, String(PROTOCOL)],
    )
    // Each may be refused (client_connection_check_interval is not supported on every
    // platform; keepalive settings only on TCP): the session works without them, more
    // slowly to notice a vanished peer, and says so.
    for (const [setting, value] of Object.entries({
      client_connection_check_interval: `${connectionCheckMs}ms`,
      ...SERVER_KEEPALIVE,
    })) {
      await this.#client
        .query('SELECT set_config($1, $2, false)', [setting, value])
        .catch((error) =>
          this.#warnings.push({
            code: 'SESSION_SETTING_REFUSED',
            message: `the lock session goes on without a setting the server refused: ${setting}: ${errorMessage(error)}`,
          }),
        )
    }
    // Refused before any lock is taken: a lock taken through a transaction pooler stays on
    // the pooled server connection after this node exits.
    const pinned = await keepsSession(this.#client, this.#connection)
    if (!pinned.kept) throw sessionNotKept(pinned.reason)
    this.#backendPid = first.pid
  }

  /**
   * Checks again, while the node holds, that no other client on the same URL is handed
   * this server session (this session's own statements staying in it is checked by every
   * heartbeat). Throws SESSION_NOT_KEPT when one is; resolves with the reason it could not
   * check when the other client could not connect or answer in time (a server at
   * max_connections, a database closed to new connections, a slow authentication). That is
   * no verdict on this session, which goes on holding: it never waits on this check, and
   * never dies of it.
   */
  async checkStillPinned(): Promise<string | undefined> {
    const deadline = this.#settings.deadAfterMs
    const other = new pg.Client({
      ...this.#connection,
      connectionTimeoutMillis: deadline,
      query_timeout: deadline,
    })
    other.on('error', () => {})
    let theirs: number | undefined
    try {
      await other.connect()
      const { rows } = await other.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
      theirs = rows[0]?.pid
    } catch (error) {
      return `could not open another connection to check that the lock session is not shared: ${errorMessage(error)}`
    } finally {
      await endClient(other)
    }
    if (theirs === this.#backendPid) throw sessionNotKept(sharedSession(theirs))
    return undefined
  }

  /**
   * Makes this node live and records the policy definitions it holds, before it queues
   * for the lock (and again after every reconnect, since each session does it). Live
   * means this session holds the node's membership lock: other nodes read that from
   * pg_locks, so a node that crashed, froze past idle_session_timeout or lost its
   * connection stops counting the moment the server ends its session. The lock is taken
   * first and the rows written after, so a second node with the same id can never
   * overwrite the definitions of the live one.
   */
  async register(definitions: readonly RunDefinition[]): Promise<void> {
    const { name, nodeId } = this.#settings
    // Taken only in this session's own backend: a statement a pooler ran elsewhere takes nothing.
    const { rows } = await this.#client.query<{ got: boolean | null; holder: number | null }>(
      `SELECT CASE WHEN pg_backend_pid() = $3 THEN pg_try_advisory_lock(pgsingleton.member_key($1, $2)) END AS got,
              (SELECT n.backend_pid FROM pgsingleton.live_nodes n
                WHERE n.singleton = $1 AND n.node_id = $2) AS holder`,
      [name, nodeId, this.#backendPid],
    )
    if (rows[0]?.got === null)
      throw sessionNotKept('the membership lock would have been taken in another server session')
    if (rows[0]?.got !== true) {
      throw new SingletonError(
        'NODE_ID_IN_USE',
        `node id "${nodeId}" is in use by another live session of singleton "${name}"${rows[0]?.holder ? ` (backend pid ${rows[0].holder})` : ''}: give every node its own node id. ` +
          'If this node was just restarted, the server has not yet ended its previous session; it will retry.',
      )
    }
    const held = definitions.map((definition) => ({
      policy: definition.name,
      fingerprint: fingerprint(definition),
      definition,
    }))
    await this.#client.query('BEGIN')
    try {
      // Waits for batches in flight, which check the agreement under the same lock shared;
      // every batch after this commits sees this node's definitions.
      await this.#client.query('SELECT pg_advisory_xact_lock(pgsingleton.agreement_key($1))', [
        name,
      ])
      await this.#client.query(
        `INSERT INTO pgsingleton.nodes AS n (singleton, node_id, backend_pid, member_key, registered_at)
         VALUES ($1, $2, pg_backend_pid(), pgsingleton.member_key($1, $2), clock_timestamp())
         ON CONFLICT (singleton, node_id) DO UPDATE
           SET backend_pid = excluded.backend_pid, member_key = excluded.member_key,
               registered_at = excluded.registered_at`,
        [name, nodeId],
      )
      await this.#client.query(
        'DELETE FROM pgsingleton.node_policies WHERE singleton = $1 AND node_id = $2',
        [name, nodeId],
      )
      await this.#client.query(
        `INSERT INTO pgsingleton.node_policies (singleton, node_id, policy, fingerprint, definition)
         SELECT $1, $2, d.policy, d.fingerprint, d.definition
           FROM jsonb_to_recordset($3::jsonb) AS d(policy text, fingerprint text, definition jsonb)`,
        [name, nodeId, JSON.stringify(held)],
      )
      // Registrations of nodes gone for a week are only clutter.
      await this.#client.query(
        `DELETE FROM pgsingleton.nodes n
          WHERE n.singleton = $1 AND n.registered_at < now() - interval '7 days'
            AND NOT EXISTS (SELECT 1 FROM pgsingleton.live_nodes l
                             WHERE l.singleton = n.singleton AND l.node_id = n.node_id)`,
        [name],
      )
      await this.#client.query('COMMIT')
    } catch (error) {
      await this.#client.query('ROLLBACK').catch(() => {})
      throw error
    }
    await this.#readyTakeover()
  }

  /**
   * The first epoch bump in a server session pays for compiling bump_epoch and loading
   * the metadata of the tables it writes: measured here, 3 to 5 ms of a 4 to 6 ms
   * statement, which would otherwise fall inside the takeover. A standby pays it now: it
   * bumps the epoch of a name no singleton can have (the name pattern has no space) and
   * undoes it in the same statement, by raising an error of its own and catching it,
   * which rolls back the block's subtransaction. Nothing is written, locked past it or
   * announced (a notification of a rolled-back subtransaction is dropped), and no ERROR
   * reaches the server log or the database's rollback count, which operators watch.
   * bump_epoch must stay free of effects a rollback does not undo (session-level locks,
   * sequences, anything outside the database).
   *
   * Any other failure (no USAGE on plpgsql, which DO needs and the functions do not; no
   * right on a table the bump writes; a schema that refuses this node's protocol) leaves
   * the session as it was, and the node queues anyway, with a warning that names it: the
   * same error from the real bump would keep this node from holding.
   */
  async #readyTakeover(): Promise<void> {
    try {
      await this.#client.query(
        // Its commit keeps nothing, so it need not wait for a WAL flush (or a synchronous replica).
        undone(
          `PERFORM set_config('synchronous_commit', 'off', true);`,
          `PERFORM pgsingleton.bump_epoch(warm_up, 'warm-up');`,
        ),
      )
    } catch (error) {
      const code = sqlState(error)
      // Not an answer from the server: the connection failed, as the next statement would.
      if (!code) throw error
      this.#warnings.push({
        code: 'TAKEOVER_NOT_READIED',
        message: `the standby could not ready its session for a takeover (${code}: ${errorMessage(error)}); it queues anyway, and takes over a few milliseconds slower, or, if the real epoch bump fails the same way, not at all`,
      })
    }
  }

  /**
   * Waits inside PostgreSQL for the lock, and takes the holdership's epoch: the server
   * grants the lock to the first waiter the moment the holder's backend ends, and the same
   * statement bumps the epoch, so failover costs one commit, not a polling interval nor a
   * second round trip. Waits in slices (`pgsingleton.wait_for_lock`, which ends a slice
   * without an error in the server log) so that a stop is noticed, and so that every slice
   * answers: one that has not answered `deadAfterMs` after its slice means the connection
   * is dead. Resolves undefined when `signal` stopped the wait.
   */
  async acquire(signal: AbortSignal): Promise<Lease | undefined> {
    const { name, nodeId, lockWaitSliceMs, deadAfterMs } = this.#settings
    while (!signal.aborted) {
      let row: { slice: WaitSlice; epoch: string | null; acquired_at: Date | null } | undefined
      try {
        const { rows } = await this.#withDeadline(
          this.#client.query<{ slice: WaitSlice; epoch: string | null; acquired_at: Date | null }>(
            'SELECT slice, epoch, acquired_at FROM pgsingleton.wait_for_lock($1, $2, $3)',
            [name, nodeId, lockWaitSliceMs],
          ),
          lockWaitSliceMs + deadAfterMs,
          'a wait slice',
        )
        row = rows[0]
      } catch (error) {
        if (signal.aborted) return undefined
        throw error
      }
      if (row?.slice === 'acquired') {
        if (row.epoch === null || row.acquired_at === null) return this.#bumpEpoch(signal)
        return this.#lease(row.epoch, row.acquired_at)
      }
      if (row?.slice === 'moved')
        throw sessionNotKept(
          'a wait ran in another server session than the one holding the membership lock',
        )
    }
    return undefined
  }

  #lease(epoch: string, acquiredAt: Date): Lease {
    const { name, nodeId } = this.#settings
    return { name, nodeId, epoch: Number(epoch), backendPid: this.#backendPid, acquiredAt }
  }

  /**
   * Bumps the epoch when the wait could not (a batch of the old epoch held the lease row
   * through the slice): waits for that batch, whose statement_timeout bounds the wait.
   */
  async #bumpEpoch(signal: AbortSignal): Promise<Lease | undefined> {
    const { name, nodeId, lockWaitSliceMs, deadAfterMs } = this.#settings
    while (!signal.aborted) {
      try {
        const { rows } = await this.#withDeadline(
          this.#client.query<{ epoch: string; acquired_at: Date }>(
            // The session's lock_timeout (a slice) bounds each try.
            'SELECT epoch, acquired_at FROM pgsingleton.bump_epoch($1, $2)',
            [name, nodeId],
          ),
          lockWaitSliceMs + deadAfterMs,
          'the epoch bump',
        )
        const row = rows[0]
        if (!row) throw new Error('the epoch bump returned no row')
        return this.#lease(row.epoch, row.acquired_at)
      } catch (error) {
        if (sqlState(error) === SQLSTATE.LOCK_NOT_AVAILABLE) continue
        throw error
      }
    }
    return undefined
  }

  /**
   * `current` while this session's epoch is still the current one; `superseded` when
   * another node bumped it; throws when the statement ran in another server session (a
   * transaction pooler the start-up check missed).
   *
   * Without synchronous replication its commit does not wait for its WAL to reach the
   * disk: a heartbeat proves that the server answered this session at the current epoch,
   * which it knows before any flush, and a crash that takes back a heartbeat_at ends the
   * session (and the holdership) anyway. Waiting made the holder's tenure hang on the
   * disk: an fsync that stalled past fenceAfterMs under another process's writes fenced a
   * holder whose session was fine. With synchronous standbys configured (and this session
   * committing through them) it does wait, for them: a primary cut off from its standby
   * cannot tell it from the standby's promotion, where another node may take the next
   * epoch, and a holder whose heartbeats the standby no longer confirms must fence.
   */
  async heartbeat(epoch: number): Promise<'current' | 'superseded'> {
    const { rows } = await this.#client.query<{ pid: number; updated: number }>(
      `WITH beat AS (
         UPDATE pgsingleton.leases SET heartbeat_at = now()
          WHERE name = $1 AND epoch = $2 AND backend_pid = pg_backend_pid() RETURNING 1)
       SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM beat)::int AS updated,
              (SELECT set_config('synchronous_commit', 'off', true)
                WHERE current_setting('synchronous_standby_names') = ''
                   OR current_setting('synchronous_commit') IN ('off', 'local')) AS unflushed`,
      [this.#settings.name, epoch],
    )
    if (rows[0]?.pid !== this.#backendPid)
      throw sessionNotKept(`a heartbeat ran in backend ${rows[0]?.pid}, not ${this.#backendPid}`)
    return rows[0]?.updated === 1 ? 'current' : 'superseded'
  }

  /**
   * Readies a new holder's session for its hand-over, off the takeover's path: runs what the
   * hand-over runs, on a key and a term of its own (locked and bumped just before), in a
   * subtransaction it rolls back, so nothing stays and no notification goes out; one
   * statement, so no other query of the session can run inside it. The first hand-over of
   * a session otherwise compiles pgsingleton.hand_over and plans its statements on the way:
   * 4 to 8 ms on a 2-core machine, against about 2 ms readied. It waits at most 100 ms for a
   * lock (a migration's, say), so that it never holds up the heartbeat queued behind it.
   * Only speed: a session that cannot ready hands over all the same.
   */
  async readyHandOver(): Promise<void> {
    if (this.#closed) return
    await this.#client.query(
      undone(
        // Its commit keeps nothing, so it need not wait for a WAL flush: the body writes (in
        // its subtransaction), which gives the transaction an id, and so a commit record.
        `PERFORM set_config('lock_timeout', '100ms', true),
                 set_config('synchronous_commit', 'off', true);
         PERFORM pg_advisory_lock(pgsingleton.lock_key(warm_up));`,
        // A term of its own to hand over: every statement of the hand-over but the
        // announcement then runs (with no one waiting on the key, it hands nothing over).
        `SELECT b.epoch INTO warm_epoch FROM pgsingleton.bump_epoch(warm_up, 'warm-up') b;
         PERFORM pgsingleton.hand_over(warm_up, warm_epoch, 'warm-up');`,
      ),
    )
  }

  /**
   * Unlocks the singleton's lock alone: the next waiter holds at once, while this session
   * stays, and with it the node's membership (its work in flight ends as a live node's).
   * The term ends as released, and the next holder's epoch is bumped for it, in the same
   * statement (pgsingleton.hand_over): from this commit the database names the next holder
   * and fences this epoch, without waiting for the next holder's backend to wake up and
   * bump (its node hears it when its wait statement has taken the epoch). When no node
   * waits, or a batch of this epoch holds the lease row, only the term ends; the next
   * holder bumps itself, as after a crash.
   */
  async handOver(epoch: number, detail: string): Promise<void> {
    // Not an answer: a session closed meanwhile (a deadline gave it up) was lost.
    if (this.#closed) throw new Error('the lock session was closed')
    // The function decides whether the commit waits for its WAL flush: not when it only
    // ended the term (the next holder's bump, synchronous, flushes it), yes when it handed
    // an epoch over.
    await this.#withDeadline(
      this.#client.query('SELECT h.successor, h.epoch FROM pgsingleton.hand_over($1, $2, $3) h', [
        this.#settings.name,
        epoch,
        detail,
      ]),
      this.#settings.deadAfterMs,
      'the hand-over',
    )
  }

  /**
   * Whether a node that could take over waits in the lock queue: as pgsingleton.hand_over
   * picks its successor, a live, registered node of this singleton (its membership lock
   * held by the waiting session) that speaks the schema's protocol; not an operator's
   * session, nor a node of an older protocol, whose epoch bump would be refused.
   */
  async othersWaiting(): Promise<boolean> {
    if (this.#closed) throw new Error('the lock session was closed')
    const { rows } = await this.#withDeadline(
      this.#client.query<{ waiting: boolean }>(
        `SELECT EXISTS (
           SELECT 1 FROM pg_locks g
             JOIN pgsingleton.nodes n ON n.singleton = $1 AND n.backend_pid = g.pid
             JOIN pg_locks m ON m.locktype = 'advisory' AND m.granted AND m.objsubid = 1
                            AND m.database = g.database AND m.pid = g.pid
                            AND m.classid::bigint = ((n.member_key >> 32) & 4294967295)
                            AND m.objid::bigint = (n.member_key & 4294967295)
            WHERE g.locktype = 'advisory' AND NOT g.granted AND g.objsubid = 1
              AND g.database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND g.classid::bigint = ((k.key >> 32) & 4294967295)
              AND g.objid::bigint = (k.key & 4294967295)
              AND n.protocol >= (SELECT mt.protocol FROM pgsingleton.meta mt)) AS waiting
           FROM (SELECT pgsingleton.lock_key($1) AS key) k`,
        [this.#settings.name],
      ),
      this.#settings.deadAfterMs,
      'a look at the lock queue',
    )
    return rows[0]?.waiting ?? true
  }

  /** A query that keeps the session from idling out (after a hand-over, while work ends). */
  async ping(): Promise<void> {
    if (this.#closed) return
    await this.#withDeadline(this.#client.query('SELECT 1'), this.#settings.deadAfterMs, 'a ping')
  }

  /** Unlocks and closes: the next waiter is granted the lock at once. */
  async release(): Promise<void> {
    if (this.#closed) return
    try {
      await this.#withDeadline(
        this.#client.query('SELECT pg_advisory_unlock_all()'),
        this.#settings.deadAfterMs,
        'the release',
      )
    } finally {
      await this.close()
    }
  }

  /** Closes the connection; the server frees the lock when the backend ends. */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    await endClient(this.#client)
  }

  /** `work`, or an error (and a destroyed socket) when it has not answered within `ms`. */
  async #withDeadline<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
    let timer: NodeJS.Timeout | undefined
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.destroy()
        reject(
          new Error(
            `the lock connection did not answer ${what} within ${ms} ms: taken as dead, and replaced`,
          ),
        )
      }, ms)
    })
    try {
      return await Promise.race([work, deadline])
    } finally {
      clearTimeout(timer)
    }
  }

  /**
   * Tears the socket down without a goodbye. Used when the session can no longer be
   * trusted (a heartbeat that did not answer in time): a client-side timeout does not
   * cancel the query on the server, so the only safe move is to drop the connection.
   */
  destroy(): void {
    this.#closed = true
    destroySocket(this.#client)
  }
}
