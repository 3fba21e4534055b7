/**
 * Schema revision 5: a stopping holder hands its epoch to the next holder itself.
 *
 * - `pgsingleton.hand_over`: what a holder runs when it lets go (a stop, a step-down). In
 *   one transaction it ends its term as released, unlocks the singleton's lock (the server
 *   grants it to the first waiter at once, inside this statement), and, when that waiter
 *   is a live registered node that speaks the schema's protocol, bumps the epoch for it:
 *   the lease names the waiter's session and node and is marked as handed (`handed_at`),
 *   its term opens, the bump is announced on channel pgsingleton, and the commit waits for
 *   its WAL flush. The database names the next holder at this commit; the next node hears
 *   it when its own wait statement, woken by the grant, has taken the epoch. It hands over
 *   nothing (and unlocks all the same) while a batch of its epoch holds the lease row, or
 *   when no such node waits: the next holder then bumps as before, after the batch.
 * - `pgsingleton.bump_epoch` takes an epoch handed to its own session and node (and clears
 *   the mark) rather than bumping again; every bump clears the mark. It plans generically.
 * - `pgsingleton.nodes.protocol`: the protocol the registering session declared
 *   (`pgsingleton.protocol`), kept by a trigger, so that older nodes' registrations say it
 *   too. A node registered before this step has none, and is never handed an epoch.
 *
 * Nodes of revision 4 run on it unchanged: they unlock as before (their successor bumps),
 * and when handed an epoch, their wait statement (this schema's function) takes it.
 *
 * Raw SQL on purpose, as in 0001.
 */
import { UP as SCHEMA_3 } from './0003_tasks.js'
import { excerpt } from './excerpt.js'

/** The protocol a setting declares, or NULL when it declares none (or nonsense). */
const SPOKEN = (setting: string) =>
  `(SELECT CASE WHEN s ~ '^[0-9]{1,9}$' THEN s::integer END FROM (SELECT ${setting} AS s) x)`

export const UP = `
ALTER TABLE pgsingleton.nodes ADD COLUMN IF NOT EXISTS protocol integer;
-- When the previous holder handed the lease's epoch over; cleared when the next holder takes it.
ALTER TABLE pgsingleton.leases ADD COLUMN IF NOT EXISTS handed_at timestamptz;

CREATE OR REPLACE FUNCTION pgsingleton.nodes_protocol() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.protocol := ${SPOKEN("current_setting('pgsingleton.protocol', true)")};
  RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER nodes_protocol BEFORE INSERT OR UPDATE ON pgsingleton.nodes
  FOR EACH ROW EXECUTE FUNCTION pgsingleton.nodes_protocol();

-- The epoch bump of a session that was just granted the singleton's lock (see step 3).
-- First, an epoch handed to this very session and node by the previous holder
-- (pgsingleton.hand_over), marked by handed_at, is taken as it is, and the mark cleared:
-- a lease that names this backend from an earlier holdership (a pooler that gave this
-- server session to the node again, a reused pid) carries no mark, and is bumped past.
-- Generic plans: the plans a standby made when it readied its takeover serve the takeover
-- (custom plans, made anew for each of a statement's first five runs, put the check for a
-- handed epoch at about 0.6 ms of the takeover's bump here).
CREATE OR REPLACE FUNCTION pgsingleton.bump_epoch(p_singleton text, p_node_id text,
  OUT epoch bigint, OUT acquired_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
  PERFORM 1 FROM pgsingleton.leases l WHERE l.name = p_singleton FOR UPDATE;
  UPDATE pgsingleton.leases l SET handed_at = NULL
   WHERE l.name = p_singleton AND l.handed_at IS NOT NULL
     AND l.backend_pid = pg_backend_pid() AND l.node_id = p_node_id
     AND EXISTS (SELECT 1 FROM pgsingleton.terms t
                  WHERE t.name = l.name AND t.epoch = l.epoch AND t.ended_at IS NULL)
     AND ${SPOKEN("current_setting('pgsingleton.protocol', true)")}
         >= (SELECT m.protocol FROM pgsingleton.meta m)
  RETURNING l.epoch, l.acquired_at INTO epoch, acquired_at;
  IF FOUND THEN
    RETURN;
  END IF;
  -- The clock, not now(): in a wait slice, now() is when the slice began.
  INSERT INTO pgsingleton.leases AS l (name, epoch, node_id, backend_pid, acquired_at, heartbeat_at)
  VALUES (p_singleton, 1, p_node_id, pg_backend_pid(), clock_timestamp(), clock_timestamp())
  ON CONFLICT (name) DO UPDATE
    SET epoch = l.epoch + 1, node_id = excluded.node_id, backend_pid = excluded.backend_pid,
        acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at, handed_at = NULL
  RETURNING l.epoch, l.acquired_at INTO epoch, acquired_at;
  UPDATE pgsingleton.terms t
     SET ended_at = bump_epoch.acquired_at, end_reason = 'lost', closed_by = 'successor',
         detail = format('closed by %s, which took over at epoch %s', p_node_id, bump_epoch.epoch)
   WHERE t.name = p_singleton AND t.ended_at IS NULL;
  -- A holder's own account may have committed after this bump read the clock: no term
  -- ends after the next began.
  UPDATE pgsingleton.terms t SET ended_at = bump_epoch.acquired_at
   WHERE t.name = p_singleton AND t.epoch < bump_epoch.epoch AND t.ended_at > bump_epoch.acquired_at;
  INSERT INTO pgsingleton.terms (name, epoch, node_id, acquired_at)
  VALUES (p_singleton, bump_epoch.epoch, p_node_id, bump_epoch.acquired_at)
  ON CONFLICT DO NOTHING;
  PERFORM pg_notify('pgsingleton',
    json_build_object('singleton', p_singleton, 'epoch', bump_epoch.epoch, 'node', p_node_id)::text);
END $$;

-- The holder lets go of epoch p_epoch (see the step's header). successor and epoch are
-- the node handed the next epoch and that epoch, or NULL when none was. A session readied
-- on a key and a term of its own, with no one waiting, has run (and planned) every
-- statement but the announcement.
CREATE OR REPLACE FUNCTION pgsingleton.hand_over(p_singleton text, p_epoch bigint, p_detail text,
  OUT successor text, OUT epoch bigint)
LANGUAGE plpgsql VOLATILE
-- The plans made when the session readied its hand-over serve the real one (custom plans,
-- made anew for each of a statement's first five runs, cost about 1 ms here, inside the
-- hand-over).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
  singleton_key bigint := pgsingleton.lock_key(p_singleton);
  -- Read before the unlock, with every other catalog and table the hand-over reads.
  this_database oid := (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
  kept boolean := false;
  next_pid integer;
BEGIN
  PERFORM pgsingleton.end_term(p_singleton, p_epoch, 'released', p_detail);
  -- Before the unlock, every lock the hand-over takes after it, none waited for: the tables
  -- it reads (a DDL queued on one of them must not hold up the next holder, which already
  -- holds the singleton's lock), and the lease row, so that the next holder's bump, which
  -- locks it at once, waits for this commit and finds its epoch here. Not while a batch of
  -- this epoch holds the lease row.
  BEGIN
    LOCK TABLE pgsingleton.nodes, pgsingleton.meta IN ACCESS SHARE MODE NOWAIT;
    -- The lease row's lock alone is ROW SHARE on the table: the UPDATE after the unlock needs
    -- ROW EXCLUSIVE, which would queue behind a CREATE INDEX queued on the table.
    LOCK TABLE pgsingleton.leases, pgsingleton.terms IN ROW EXCLUSIVE MODE NOWAIT;
    PERFORM 1 FROM pgsingleton.leases l
     WHERE l.name = p_singleton AND l.epoch = p_epoch AND l.backend_pid = pg_backend_pid()
       FOR UPDATE NOWAIT;
    kept := FOUND;
  EXCEPTION WHEN lock_not_available THEN
    kept := false;
  END;
  -- (A session that held no lock hands nothing over; the server warns of it.)
  IF NOT pg_advisory_unlock(singleton_key) THEN
    kept := false;
  END IF;
  -- A session may hold it twice: a grant that came in the same instant as a wait slice's
  -- lock_timeout keeps the lock, and the next slice takes it again. All of it goes.
  WHILE EXISTS (SELECT 1 FROM pg_locks g
                 WHERE g.locktype = 'advisory' AND g.granted AND g.objsubid = 1
                   AND g.pid = pg_backend_pid()
                   AND g.classid::bigint = ((singleton_key >> 32) & 4294967295)
                   AND g.objid::bigint = (singleton_key & 4294967295)) LOOP
    EXIT WHEN NOT pg_advisory_unlock(singleton_key);
  END LOOP;
  -- Not a statement more otherwise: even a plan that would read no row locks the tables
  -- it names before it runs, and waits behind a DDL queued on one of them.
  IF kept THEN
    -- The server granted the lock to the first waiter inside pg_advisory_unlock: a live,
    -- registered node of this singleton (its membership lock held by the same session) that
    -- speaks the schema's protocol.
    SELECT n.node_id, n.backend_pid INTO successor, next_pid
      FROM pg_locks g
      JOIN pgsingleton.nodes n ON n.singleton = p_singleton AND n.backend_pid = g.pid
      JOIN pg_locks m ON m.locktype = 'advisory' AND m.granted AND m.objsubid = 1
                     AND m.database = g.database AND m.pid = g.pid
                     AND m.classid::bigint = ((n.member_key >> 32) & 4294967295)
                     AND m.objid::bigint = (n.member_key & 4294967295)
     WHERE g.locktype = 'advisory' AND g.granted AND g.objsubid = 1
       AND g.database = this_database
       AND g.classid::bigint = ((singleton_key >> 32) & 4294967295)
       AND g.objid::bigint = (singleton_key & 4294967295)
       AND g.pid <> pg_backend_pid()
       AND n.protocol >= (SELECT mt.protocol FROM pgsingleton.meta mt);
    UPDATE pgsingleton.leases l
       SET epoch = l.epoch + 1, node_id = successor, backend_pid = next_pid,
           acquired_at = clock_timestamp(), heartbeat_at = clock_timestamp(),
           handed_at = clock_timestamp()
     WHERE l.name = p_singleton AND l.epoch = p_epoch AND successor IS NOT NULL
    RETURNING l.epoch INTO epoch;
    INSERT INTO pgsingleton.terms (name, epoch, node_id, acquired_at)
    SELECT l.name, l.epoch, l.node_id, l.acquired_at FROM pgsingleton.leases l
     WHERE l.name = p_singleton AND l.epoch = hand_over.epoch
    ON CONFLICT DO NOTHING;
  END IF;
  IF epoch IS NULL THEN
    successor := NULL;
    -- Only the term's account: the next holder's own bump, whose commit waits for its WAL
    -- flush, flushes this one with it. A server crash in between loses the account, and the
    -- next holder closes the term as lost.
    PERFORM set_config('synchronous_commit', 'off', true);
  ELSE
    -- A handed epoch commits as the session's own bump would (synchronous_commit as set):
    -- no one sees an epoch that a server crash could take back and give to another node.
    PERFORM pg_notify('pgsingleton',
      json_build_object('singleton', p_singleton, 'epoch', epoch, 'node', successor)::text);
  END IF;
END $$;
`

export const DOWN = `
DROP FUNCTION IF EXISTS pgsingleton.hand_over(text, bigint, text);
${excerpt(SCHEMA_3, 'CREATE OR REPLACE FUNCTION pgsingleton.bump_epoch', 'END $$;')}
ALTER TABLE pgsingleton.leases DROP COLUMN IF EXISTS handed_at;
DROP TRIGGER IF EXISTS nodes_protocol ON pgsingleton.nodes;
DROP FUNCTION IF EXISTS pgsingleton.nodes_protocol();
ALTER TABLE pgsingleton.nodes DROP COLUMN IF EXISTS protocol;
`
