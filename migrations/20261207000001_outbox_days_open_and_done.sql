-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection and retries on a lock timeout. Only functions change here,
-- and the days it replaces are empty.)

-- Issue 25: a finished day's size. Measured over a simulated week
-- (BENCHMARKS.md), a day's partition took 3.0x its rows' live size: each row
-- is written three times (inserted pending, leased, recorded) and the record
-- changes `state`, an indexed column, so it is never a HOT update; every row
-- leaves two dead versions in pages that fill before vacuum comes, and the
-- day keeps the space after its last write. No fillfactor or vacuum setting
-- removes that: the finished rows have to be written once, where nothing
-- churns.
--
-- So each new day is itself partitioned by state, in two:
--   `<day>_open`  pending and dead rows: the queue, where claims and
--                 retries churn (fillfactor 70, so a lease is a HOT update;
--                 vacuumed as soon as autovacuum can, so it stays small);
--   `<day>_done`  delivered and superseded rows: written once, when the row
--                 finishes, and never again (fillfactor 100).
-- Recording an outcome that finishes a row moves it from `_open` to `_done`
-- (PostgreSQL's row movement: a delete and an insert, in the updating
-- statement's transaction). The row keeps its id and created_at; reads of
-- `authz_outbox` see it before and after; the outbox's statement trigger
-- sees the move as the update it is (its transition tables hold both
-- versions), so who owns a resource is recorded as before.
--
-- A concurrent statement that tries to lock a row another transaction has
-- just moved fails with SQLSTATE 40001 instead of re-reading it; the
-- worker's statements that update rows retry on it (src/outbox/moved.rs).
--
-- Retention is unchanged: a day (the partitioned table) is detached and
-- dropped whole, with both halves, under the same guard. Days that already
-- hold rows keep their single table; the empty ones from today on are
-- created again in the new shape, so an upgraded outbox switches within
-- `migrate`, without copying a row.
DO $functions$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
    -- Sizes now sum a day's whole tree (a partitioned day has no storage of
    -- its own).
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION @s@.authz_outbox_partitions()
RETURNS TABLE (name text, lower_bound timestamptz, upper_bound timestamptz, is_default boolean, bytes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT c.relname::text,
           CASE WHEN b.expr LIKE '%MINVALUE%' THEN '-infinity'::timestamptz
                ELSE substring(b.expr FROM 'FROM \(''([^'']*)''\)')::timestamptz END,
           substring(b.expr FROM 'TO \(''([^'']*)''\)')::timestamptz,
           b.expr = 'DEFAULT',
           (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0)::bigint
            FROM pg_partition_tree(c.oid) t WHERE t.isleaf)
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
    WHERE i.inhparent = to_regclass('@s@.authz_outbox')
    ORDER BY 3 NULLS LAST
$fn$;
$body$, '@s@', s);

    -- As before (20261205200003), but each day in two halves by state. The
    -- day and its halves are built detached, the indexes created on the
    -- day (so on both halves), then the day attached: captures never wait
    -- behind it. A half's primary key is its own (a key on the day would
    -- have to include `state`).
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION @s@.authz_outbox_create_partitions(days_ahead integer)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    today  timestamptz := (date_trunc('day', now() AT TIME ZONE 'UTC')) AT TIME ZONE 'UTC';
    target timestamptz := today + (days_ahead + 1) * interval '1 day';
    lo     timestamptz;
    hi     timestamptz;
    part   text;
    made   integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('authz_outbox_partitions'));
    SELECT coalesce(max(p.upper_bound), today) INTO lo
    FROM @s@.authz_outbox_partitions() p WHERE NOT p.is_default;
    WHILE lo < target LOOP
        hi := (date_trunc('day', lo AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC';
        part := 'authz_outbox_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD');
        EXECUTE format('CREATE TABLE @s@.%I (LIKE @s@.authz_outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY LIST (state)', part);
        -- The queue half: vacuumed after every thousand dead versions (the
        -- default waits for a fifth of the table), the way queue tables are
        -- tuned, so the space a finished row leaves is reused at once.
        EXECUTE format('CREATE TABLE @s@.%I PARTITION OF @s@.%I (PRIMARY KEY (id)) FOR VALUES IN (''pending'', ''dead'')
                        WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)',
                       part || '_open', part);
        EXECUTE format('CREATE TABLE @s@.%I PARTITION OF @s@.%I (PRIMARY KEY (id)) FOR VALUES IN (''delivered'', ''superseded'')
                        WITH (fillfactor = 100)',
                       part || '_done', part);
        EXECUTE format(
            'WITH moved AS (DELETE FROM @s@.authz_outbox_default WHERE created_at >= $1 AND created_at < $2 RETURNING *)
             INSERT INTO @s@.%I SELECT * FROM moved', part) USING lo, hi;
        -- Each half's indexes first, named after it (so a plan names
        -- `<day>_open_pending_by_operation`); the day's own then adopt them.
        PERFORM @s@.authz_outbox_index_partition(part || '_open');
        PERFORM @s@.authz_outbox_index_partition(part || '_done');
        PERFORM @s@.authz_outbox_index_partition(part);
        EXECUTE format('ALTER TABLE @s@.authz_outbox ATTACH PARTITION @s@.%I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        made := made + 1;
        lo := hi;
    END LOOP;
    RETURN made;
END
$fn$;
$body$, '@s@', s);

    -- A retired day is a plain table (the old shape) or a partitioned one
    -- (the new); dropping the latter drops its halves.
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
               AND c.relkind IN ('r', 'p') AND NOT c.relispartition
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

-- The empty days from today on, in the old shape, are created again in the
-- new one. The outbox's lock first, then the days' (the order retention
-- takes them); a day that holds a row (or would, under a clock ahead of
-- this one) is kept, with every day after it, so the days stay contiguous.
--
-- The pre-upgrade table's range reaches past today (20261205200001 ended
-- it after tomorrow, so no capture of the upgrade's own day could miss
-- it): left so, a fresh install would keep the old shape for its first two
-- days. When it is empty and no later day remains, its range is cut back
-- to end today at midnight (a detach and an attach of an empty table,
-- nothing scanned), and today gets a day of the new shape.
DO $reshape$
DECLARE
    today  timestamptz := (date_trunc('day', now() AT TIME ZONE 'UTC')) AT TIME ZONE 'UTC';
    p      record;
    empty  boolean;
    gone   text[] := '{}';
    legacy timestamptz;
    last   timestamptz;
BEGIN
    LOCK TABLE ONLY authz_outbox IN ACCESS EXCLUSIVE MODE;
    FOR p IN SELECT q.name, c.relkind
             FROM authz_outbox_partitions() q
             JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(pg_catalog.quote_ident(q.name))
             WHERE NOT q.is_default AND q.lower_bound >= today AND q.name <> 'authz_outbox_legacy'
             ORDER BY q.upper_bound DESC LOOP
        EXIT WHEN p.relkind <> 'r';
        EXECUTE pg_catalog.format('SELECT NOT EXISTS (SELECT 1 FROM %I)', p.name) INTO empty;
        EXIT WHEN NOT empty;
        gone := gone || p.name;
    END LOOP;
    FOR i IN 1 .. coalesce(pg_catalog.array_length(gone, 1), 0) LOOP
        EXECUTE pg_catalog.format('DROP TABLE %I', gone[i]);
    END LOOP;

    SELECT q.upper_bound INTO legacy FROM authz_outbox_partitions() q WHERE q.name = 'authz_outbox_legacy';
    SELECT pg_catalog.max(q.upper_bound) INTO last FROM authz_outbox_partitions() q WHERE NOT q.is_default;
    IF legacy > today AND legacy = last AND NOT EXISTS (SELECT 1 FROM authz_outbox_legacy) THEN
        LOCK TABLE authz_outbox_legacy IN ACCESS EXCLUSIVE MODE;
        ALTER TABLE authz_outbox DETACH PARTITION authz_outbox_legacy;
        EXECUTE pg_catalog.format('ALTER TABLE authz_outbox ATTACH PARTITION authz_outbox_legacy FOR VALUES FROM (MINVALUE) TO (%L)', today);
    END IF;
    PERFORM authz_outbox_create_partitions(3);
END
$reshape$;
