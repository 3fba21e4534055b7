-- pg-singleton schema step 8 (pgsingleton_0008_run_requests).
-- Safe to run by any route, any number of times, at the same moment as another route:
-- it applies only on top of step 7 and records 8 in pgsingleton.meta.
DO $pgsingleton_migration$
DECLARE
  found integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(-7089759982357046742);
  IF to_regclass('pgsingleton.meta') IS NOT NULL THEN
    EXECUTE 'SELECT CASE WHEN m.schema_version >= 3
  THEN greatest(coalesce((to_jsonb(m)->>''revision'')::integer, 0), m.schema_version) ELSE m.schema_version END FROM pgsingleton.meta m' INTO found;
  END IF;
  IF found >= 8 THEN
    RETURN; -- applied already, by this route or another
  END IF;
  IF found < 7 THEN
    RAISE EXCEPTION 'pg-singleton: schema step 8 needs step 7 first; the database has %', found;
  END IF;
  EXECUTE $pgsingleton_step$
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
$pgsingleton_step$;
  IF EXISTS (SELECT FROM pg_attribute
              WHERE attrelid = to_regclass('pgsingleton.meta') AND attname = 'revision' AND NOT attisdropped) THEN
    EXECUTE 'UPDATE pgsingleton.meta SET revision = 8';
  END IF;
END $pgsingleton_migration$;
