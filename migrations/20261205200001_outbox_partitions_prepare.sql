-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection and retries on a lock timeout.)

-- Issue 25, step 1 of 3: the single `authz_outbox` table becomes the first
-- partition ("legacy", everything created before a cutoff) of a table
-- range-partitioned on created_at. Attaching it must not scan it under an
-- exclusive lock, so it first gets a CHECK that proves its rows lie below
-- the cutoff: added NOT VALID here (a catalog change; new rows are checked
-- from now on), validated by the next migration under SHARE UPDATE
-- EXCLUSIVE, which blocks no reader or writer.
--
-- The cutoff is the second UTC midnight from now, far beyond the seconds
-- between these migrations. Should the swap still not have happened by
-- then, the column default is clamped below the cutoff, so a host's write
-- is never refused by this CHECK: it only gets a created_at slightly early.
DO $prepare$
DECLARE
    cutoff timestamptz := (date_trunc('day', now() AT TIME ZONE 'UTC') + interval '2 days') AT TIME ZONE 'UTC';
BEGIN
    IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = to_regclass('authz_outbox')) = 'r'
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                       WHERE conrelid = to_regclass('authz_outbox') AND conname = 'authz_outbox_legacy_range') THEN
        EXECUTE format('ALTER TABLE authz_outbox ADD CONSTRAINT authz_outbox_legacy_range CHECK (created_at < %L::timestamptz) NOT VALID', cutoff);
        EXECUTE format('ALTER TABLE authz_outbox ALTER COLUMN created_at SET DEFAULT least(clock_timestamp(), %L::timestamptz - interval ''1 millisecond'')', cutoff);
    END IF;
END
$prepare$;
