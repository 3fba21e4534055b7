/**
 * Schema revision 5: a stopping holder hands its epoch to the next holder itself.
 *
 * - `pgsingleton.hand_over`: what a holder runs when it lets go (a stop, a step-down). In
 *   one transaction it ends its term as released, unlocks the singleton's lock (the server
 *   grants it to the first waiter at once, inside this statement), and, when that waiter
 *   is a registered node that speaks the schema's protocol, bumps the epoch for it: the
 *   lease names the waiter's session and node, its term opens, and the bump is announced
 *   on channel pgsingleton. The next holder is then current at this commit, without waiting
 *   for its own backend to wake up and bump. It hands over nothing (and unlocks all the
 *   same) while a batch of its epoch holds the lease row, or when no node waits: the next
 *   holder then bumps as before, after the batch.
 * - `pgsingleton.bump_epoch` takes such an epoch rather than bumping again: when the lease
 *   names this session and node, its term is open, and this session speaks the protocol.
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

/** The lease row's lock, first in step 3's bump_epoch: what it then takes, when handed. */
const LOCKED = 'PERFORM 1 FROM pgsingleton.leases l WHERE l.name = p_singleton FOR UPDATE;\n'

/** Step 3's bump_epoch begins so. */
const HEADER = 'LANGUAGE plpgsql VOLATILE AS $$'

/**
 * Step 3's bump_epoch, which first takes an epoch handed over (by pgsingleton.hand_over)
 * to this very session, and plans generically: the plans the standby made when it readied
 * its takeover serve the takeover (custom plans, made anew for each of a statement's first
 * five runs, put the check for a handed epoch at about 0.6 ms of the takeover's bump here;
 * planned generically, the bump costs what it cost before the check).
 */
const BUMP_EPOCH = excerpt(SCHEMA_3, 'CREATE OR REPLACE FUNCTION pgsingleton.bump_epoch', 'END $$;')
  .replace(
    HEADER,
    () => 'LANGUAGE plpgsql VOLATILE\nSET plan_cache_mode = force_generic_plan\nAS $$',
  )
  .replace(
    LOCKED,
    // A function: the text holds a $' that a replacement string would expand.
    () => `${LOCKED}  -- Handed over by the previous holder (pgsingleton.hand_over) to this very session.
  SELECT l.epoch, l.acquired_at INTO epoch, acquired_at
    FROM pgsingleton.leases l
   WHERE l.name = p_singleton AND l.backend_pid = pg_backend_pid() AND l.node_id = p_node_id
     AND EXISTS (SELECT 1 FROM pgsingleton.terms t
                  WHERE t.name = l.name AND t.epoch = l.epoch AND t.ended_at IS NULL)
     AND ${SPOKEN("current_setting('pgsingleton.protocol', true)")}
         >= (SELECT m.protocol FROM pgsingleton.meta m);
  IF FOUND THEN
    RETURN;
  END IF;
`,
  )
if (!BUMP_EPOCH.includes('pgsingleton.hand_over') || !BUMP_EPOCH.includes('force_generic_plan'))
  throw new Error("step 3's bump_epoch changed shape")

export const UP = `
ALTER TABLE pgsingleton.nodes ADD COLUMN IF NOT EXISTS protocol integer;

CREATE OR REPLACE FUNCTION pgsingleton.nodes_protocol() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.protocol := ${SPOKEN("current_setting('pgsingleton.protocol', true)")};
  RETURN NEW;
END $$;
CREATE OR REPLACE TRIGGER nodes_protocol BEFORE INSERT OR UPDATE ON pgsingleton.nodes
  FOR EACH ROW EXECUTE FUNCTION pgsingleton.nodes_protocol();

${BUMP_EPOCH}
-- The holder lets go of epoch p_epoch (see the step's header). successor and epoch are
-- the node handed the next epoch and that epoch, or NULL when none was. Every statement
-- runs on every call (those with nothing to do match no row), so that a session readied
-- on a key and a term of its own has planned them all.
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
  kept boolean := false;
  next_pid integer;
BEGIN
  PERFORM pgsingleton.end_term(p_singleton, p_epoch, 'released', p_detail);
  -- The lease row first, so that the next holder's bump, which locks it at once, waits for
  -- this commit and finds its epoch here. Not while a batch of this epoch holds it.
  BEGIN
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
   WHERE kept AND g.locktype = 'advisory' AND g.granted AND g.objsubid = 1
     AND g.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
     AND g.classid::bigint = ((singleton_key >> 32) & 4294967295)
     AND g.objid::bigint = (singleton_key & 4294967295)
     AND g.pid <> pg_backend_pid()
     AND n.protocol >= (SELECT mt.protocol FROM pgsingleton.meta mt);
  UPDATE pgsingleton.leases l
     SET epoch = l.epoch + 1, node_id = successor, backend_pid = next_pid,
         acquired_at = clock_timestamp(), heartbeat_at = clock_timestamp()
   WHERE l.name = p_singleton AND l.epoch = p_epoch AND successor IS NOT NULL
  RETURNING l.epoch INTO epoch;
  INSERT INTO pgsingleton.terms (name, epoch, node_id, acquired_at)
  SELECT l.name, l.epoch, l.node_id, l.acquired_at FROM pgsingleton.leases l
   WHERE l.name = p_singleton AND l.epoch = hand_over.epoch
  ON CONFLICT DO NOTHING;
  IF epoch IS NULL THEN
    successor := NULL;
  ELSE
    PERFORM pg_notify('pgsingleton',
      json_build_object('singleton', p_singleton, 'epoch', epoch, 'node', successor)::text);
  END IF;
END $$;
`

export const DOWN = `
DROP FUNCTION IF EXISTS pgsingleton.hand_over(text, bigint, text);
${excerpt(SCHEMA_3, 'CREATE OR REPLACE FUNCTION pgsingleton.bump_epoch', 'END $$;')}
DROP TRIGGER IF EXISTS nodes_protocol ON pgsingleton.nodes;
DROP FUNCTION IF EXISTS pgsingleton.nodes_protocol();
ALTER TABLE pgsingleton.nodes DROP COLUMN IF EXISTS protocol;
`
