-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout on its connection and
-- retries on a lock timeout.)

-- Issue 25, step 2 of 3: proves every existing row lies below the cutoff.
-- VALIDATE CONSTRAINT scans the table but holds only SHARE UPDATE
-- EXCLUSIVE: captures, claims and outcomes go on meanwhile. The scan of a
-- large outbox may outlast the connection's statement_timeout, which is
-- meant for statements that block others; this one blocks no writer, so it
-- runs without one (the lock_timeout still bounds the wait for its lock).
SET LOCAL statement_timeout = 0;

DO $validate$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
               WHERE conrelid = to_regclass('authz_outbox') AND conname = 'authz_outbox_legacy_range'
                 AND NOT convalidated) THEN
        ALTER TABLE authz_outbox VALIDATE CONSTRAINT authz_outbox_legacy_range;
    END IF;
END
$validate$;
