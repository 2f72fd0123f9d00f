-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- The operator page's last hour (deliveries per minute and their
-- commit-to-delivered latency), counted by the workers as they record
-- outcomes and added here every few seconds, one row per minute, resource
-- type and worker.
--
-- The page used to count the outbox's delivered rows instead: a scan of
-- every row delivered in the hour, which a busy worker's page paid on its
-- first request after each start (seconds at thousands of deliveries a
-- second) and which slowed delivery itself (BENCHMARKS.md, issue 23). This
-- table holds at most 60 minutes x types x workers rows the page reads;
-- workers delete minutes older than two hours.
--
-- The figures are a chart, not a record: counts a worker had not yet added
-- when it was killed are missing from it, never from the outbox.
CREATE TABLE IF NOT EXISTS authz_outbox_delivery_minutes (
    minute         timestamptz      NOT NULL,
    resource_type  text             NOT NULL,
    worker_id      text             NOT NULL,
    delivered      bigint           NOT NULL,
    latency_ms_sum double precision NOT NULL,
    PRIMARY KEY (minute, resource_type, worker_id)
);

-- The roles that mark idle workers in authz_outbox_listeners are the
-- workers' (docs/operations.md "Database roles"): they count deliveries here
-- too, so an upgraded worker role needs no new GRANT. Host roles get nothing.
DO $grants$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT a.grantee
             FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
             WHERE c.oid = pg_catalog.to_regclass('authz_outbox_listeners')
               AND a.privilege_type = 'INSERT' AND a.grantee <> c.relowner
               AND a.grantee <> 0 LOOP
        EXECUTE pg_catalog.format(
            'GRANT SELECT, INSERT, UPDATE, DELETE ON authz_outbox_delivery_minutes TO %I',
            pg_catalog.pg_get_userbyid(g.grantee));
    END LOOP;
END
$grants$;
