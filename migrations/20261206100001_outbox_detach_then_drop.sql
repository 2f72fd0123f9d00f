-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection and retries on a lock timeout. Only functions change here.)

-- Issue 25: retention's cost to the outbox. Measured at 2,000,000 finished
-- rows (623 MB): the "anything pending, dead or recently finished?" checks
-- take 10 ms (each an index probe), the DROP statement 12 ms, and the COMMIT
-- 916 ms: PostgreSQL unlinks the partition's files at commit and the file
-- system frees their blocks (I/O wait, proportional to the size; 2.8-3.4 s
-- for a day of 7 M rows). The unlink comes after the commit releases the
-- locks, so captures do not wait for it (bench-retention's capture probe);
-- the caller does.
--
-- A day now leaves in two transactions:
--   1. `authz_outbox_drop_partitions(retention)` checks each expired day
--      under the parent's lock, DETACHes it (a catalog change) and renames it
--      `<name>_retired`: the only step that holds the outbox's lock (50 ms at
--      7 M rows), and it takes the day's lock NOWAIT, so it never waits
--      behind an autovacuum or a reader of the day while holding the parent;
--   2. `authz_outbox_drop_retired()` drops the retired tables. It locks only
--      them (no capture or claim can reach a detached table); its commit is
--      where the file system's seconds go. A worker that dies between the
--      two leaves a retired table the next call drops.
-- The guard is unchanged: a day with any pending or dead row, or a row that
-- finished within retention, stays attached, whole.
DO $functions$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION @s@.authz_outbox_drop_partitions(retention interval)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    p    record;
    held boolean;
    first boolean := true;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('authz_outbox_partitions'));
    FOR p IN SELECT * FROM @s@.authz_outbox_partitions() q
             WHERE NOT q.is_default AND q.upper_bound <= now() - retention
             ORDER BY q.upper_bound LOOP
        IF first THEN
            -- DETACH needs the parent's ACCESS EXCLUSIVE lock: take it before
            -- the partition's, in the order a claim or capture takes them,
            -- so the two never deadlock. Held to commit, which is quick.
            LOCK TABLE ONLY @s@.authz_outbox IN ACCESS EXCLUSIVE MODE;
            first := false;
        END IF;
        -- No write reaches it between the check and the detach. NOWAIT:
        -- while the parent's lock is held, waiting here (behind an
        -- autovacuum of the day, which yields only after deadlock_timeout,
        -- or a long reader) would stall every capture and claim; a busy day
        -- is left for the next run instead.
        BEGIN
            EXECUTE format('LOCK TABLE @s@.%I IN ACCESS EXCLUSIVE MODE NOWAIT', p.name);
        EXCEPTION WHEN lock_not_available THEN
            CONTINUE;
        END;
        -- Each probe is answered by a partial index of the partition
        -- (pending_by_operation, dead_by_time, finished_by_time), never by
        -- reading its rows.
        EXECUTE format(
            'SELECT EXISTS (SELECT 1 FROM @s@.%1$I WHERE state = ''pending'' AND operation = ''register'')
                 OR EXISTS (SELECT 1 FROM @s@.%1$I WHERE state = ''pending'' AND operation = ''deregister'')
                 OR EXISTS (SELECT 1 FROM @s@.%1$I WHERE state = ''dead'')
                 OR EXISTS (SELECT 1 FROM @s@.%1$I WHERE state IN (''delivered'', ''superseded'')
                                                 AND finished_at >= now() - $1)', p.name)
            INTO held USING retention;
        IF held THEN
            CONTINUE;
        END IF;
        EXECUTE format('ALTER TABLE @s@.authz_outbox DETACH PARTITION @s@.%I', p.name);
        EXECUTE format('ALTER TABLE @s@.%I RENAME TO %I', p.name, p.name || '_retired');
        RETURN NEXT p.name;
    END LOOP;
END
$fn$;
$body$, '@s@', s);

    -- Drops the days `authz_outbox_drop_partitions` retired; returns their
    -- names. Only tables it renamed: detached from the outbox, named
    -- `authz_outbox_<day>_retired`, owned by the outbox's owner.
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION @s@.authz_outbox_drop_retired()
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.relname::text AS name
             FROM pg_class c
             WHERE c.relnamespace = '@s@'::regnamespace
               AND c.relkind = 'r' AND NOT c.relispartition
               AND c.relname LIKE 'authz\_outbox\_%\_retired'
               AND c.relowner = (SELECT o.relowner FROM pg_class o WHERE o.oid = '@s@.authz_outbox'::regclass)
             ORDER BY 1 LOOP
        EXECUTE format('DROP TABLE @s@.%I', r.name);
        RETURN NEXT r.name;
    END LOOP;
END
$fn$;
$body$, '@s@', s);
END
$functions$;
REVOKE ALL ON FUNCTION authz_outbox_drop_retired() FROM PUBLIC;

-- Whoever may retire days may drop them: the grants of
-- authz_outbox_drop_partitions, copied (an upgraded worker role needs no new
-- GRANT).
DO $grants$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT a.grantee
             FROM pg_catalog.pg_proc f, pg_catalog.aclexplode(f.proacl) a
             WHERE f.oid = to_regprocedure('authz_outbox_drop_partitions(interval)')
               AND a.privilege_type = 'EXECUTE' AND a.grantee <> f.proowner LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION authz_outbox_drop_retired() TO %s',
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END);
    END LOOP;
END
$grants$;
