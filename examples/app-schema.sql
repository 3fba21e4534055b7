-- A stand-in for your app's own tables: what the example config cleans.
CREATE SCHEMA app;
CREATE TABLE app.events (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  created_at timestamptz NOT NULL DEFAULT now(),
  payload text
);
CREATE INDEX events_created_at ON app.events (created_at);
INSERT INTO app.events (created_at, payload)
SELECT now() - (i % 60) * interval '1 day', md5(i::text) FROM generate_series(1, 100000) AS i;
