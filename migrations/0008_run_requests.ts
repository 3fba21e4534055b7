/**
 * Schema revision 8: what an operator asks of the holder is announced.
 *
 * - A trigger on `pgsingleton.policy_controls` announces on channel pgsingleton, at the
 *   commit, a run asked for now (`run_now_at` set to a new value) and a policy resumed
 *   (`paused` from true to false): `{"singleton", "policy", "asked": "run" | "resume"}` as
 *   JSON. Whatever writes the request (`pg-singleton run-now`, `runNow` on any node, an
 *   operator's own SQL, a node of an older revision) is announced alike. The holder
 *   listens while it holds (on a connection of its own), and its scheduler looks at once
 *   instead of at its next tick (up to 5 s away). The holder's own clearing of a request
 *   it took announces nothing.
 * - Nodes of revision 5 to 7 run on it unchanged (`schema_version` stays 3): they do not
 *   listen, and take requests at their next tick as before. This version's nodes need
 *   revision 8.
 *
 * Raw SQL on purpose, as in 0001.
 */

export const UP = `
CREATE OR REPLACE FUNCTION pgsingleton.announce_control() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.run_now_at IS NOT NULL
     AND (TG_OP = 'INSERT' OR NEW.run_now_at IS DISTINCT FROM OLD.run_now_at) THEN
    PERFORM pg_notify('pgsingleton', json_build_object(
      'singleton', NEW.singleton, 'policy', NEW.policy, 'asked', 'run')::text);
  ELSIF TG_OP = 'UPDATE' AND OLD.paused AND NOT NEW.paused THEN
    PERFORM pg_notify('pgsingleton', json_build_object(
      'singleton', NEW.singleton, 'policy', NEW.policy, 'asked', 'resume')::text);
  END IF;
  RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER policy_controls_announce AFTER INSERT OR UPDATE ON pgsingleton.policy_controls
  FOR EACH ROW EXECUTE FUNCTION pgsingleton.announce_control();
`

export const DOWN = `
DROP TRIGGER IF EXISTS policy_controls_announce ON pgsingleton.policy_controls;
DROP FUNCTION IF EXISTS pgsingleton.announce_control();
`
