-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- The findings of reconcile runs started from the operator page, so the page
-- can show a past run's drift resource by resource (a run record alone holds
-- only its counts). At most a bounded number per run is kept (src/ui); the
-- rest is counted in the run's summary. Deleting a run deletes its findings.
CREATE TABLE IF NOT EXISTS authz_outbox_reconcile_findings (
    run_id   bigint NOT NULL REFERENCES authz_outbox_reconcile_runs (id) ON DELETE CASCADE,
    -- squawk-ignore prefer-bigint-over-int
    seq      integer NOT NULL,
    kind     text    NOT NULL,
    resource text    NOT NULL,
    reason   text    NOT NULL,
    fix      text    NOT NULL,
    enqueued boolean NOT NULL,
    PRIMARY KEY (run_id, seq)
);
