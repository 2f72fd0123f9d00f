-- squawk-ignore-file require-lock-timeout, require-statement-timeout, prefer-identity, prefer-bigint-over-int, require-concurrent-index-creation
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection and retries on a lock timeout. The indexes below are built
-- on a partitioned table with no partition yet: nothing to scan or block.)

-- Issue 25, step 3 of 3: `authz_outbox` becomes a table range-partitioned by
-- created_at, daily partitions created ahead, and retention drops a
-- partition whole instead of deleting its rows one by one.
--
-- One transaction, every lock short: the old table is renamed (ACCESS
-- EXCLUSIVE, a catalog change), the partitioned parent takes its name, and
-- the old table is attached as the partition of everything below its
-- cutoff. Its indexes match the parent's, so none is built, and the CHECK
-- validated by the previous migration proves its range, so it is not
-- scanned. Readers and writers see every row before and after: nothing is
-- copied, so no row can be lost or duplicated, and `id` (the global order,
-- one sequence) is unchanged, so pending rows keep their order.
--
-- The parent has no primary key: one would have to include created_at and
-- be built on the old table. `id` stays unique because one sequence issues
-- it; each partition has its own primary key on id (the old table keeps its
-- own), which serves every lookup by id.

-- The functions below run as the outbox's owner (SECURITY DEFINER): the
-- worker's role has no DDL (docs/operations.md, Database roles) yet creates
-- and drops partitions through them. So, as every function of ours that runs
-- with another role's privileges, each pins its search_path to pg_catalog
-- and names every object with the schema `migrate` ran in (substituted for
-- @s@ below), and none is executable by PUBLIC.
DO $functions$
DECLARE
    s text := quote_ident(current_schema());
BEGIN
    -- A partition's own indexes, built while it is detached (empty, or
    -- holding the few rows moved out of the default partition) and named
    -- after it, so ATTACH adopts them instead of building its own and a plan
    -- names them `<partition>_pending_by_operation` like the old table's.
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION @s@.authz_outbox_index_partition(part text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    EXECUTE format('CREATE INDEX %I ON @s@.%I (operation, id) WHERE state = ''pending''', part || '_pending_by_operation', part);
    EXECUTE format('CREATE INDEX %I ON @s@.%I (resource_type, resource_id, id)', part || '_by_resource', part);
    EXECUTE format('CREATE INDEX %I ON @s@.%I (finished_at) WHERE state = ''dead''', part || '_dead_by_time', part);
    EXECUTE format('CREATE INDEX %I ON @s@.%I (finished_at) WHERE state IN (''delivered'', ''superseded'')', part || '_finished_by_time', part);
END
$fn$;
$body$, '@s@', s);

    -- The partitions, their bounds and sizes (the old table's lower bound
    -- is -infinity, the default partition has none), for status, metrics
    -- and the two functions below.
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION @s@.authz_outbox_partitions()
RETURNS TABLE (name text, lower_bound timestamptz, upper_bound timestamptz, is_default boolean, bytes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT c.relname::text,
           CASE WHEN b.expr LIKE '%MINVALUE%' THEN '-infinity'::timestamptz
                ELSE substring(b.expr FROM 'FROM \(''([^'']*)''\)')::timestamptz END,
           substring(b.expr FROM 'TO \(''([^'']*)''\)')::timestamptz,
           b.expr = 'DEFAULT',
           pg_total_relation_size(c.oid)
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
    WHERE i.inhparent = to_regclass('@s@.authz_outbox')
    ORDER BY 3 NULLS LAST
$fn$;
$body$, '@s@', s);

    -- Creates the daily partitions (UTC days) from the last one's end
    -- through `days_ahead` days after today; returns how many it created.
    -- Rows that already fell into the default partition for a new day move
    -- into it, keeping their id (so their order), in the same transaction.
    -- Each new partition is built detached and attached (SHARE UPDATE
    -- EXCLUSIVE on the parent), so captures never wait behind it.
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
    -- Every replica tries at start: one at a time, the others then find
    -- the days already there (each waits at most the caller's lock_timeout).
    PERFORM pg_advisory_xact_lock(hashtext('authz_outbox_partitions'));
    SELECT coalesce(max(p.upper_bound), today) INTO lo
    FROM @s@.authz_outbox_partitions() p WHERE NOT p.is_default;
    WHILE lo < target LOOP
        hi := (date_trunc('day', lo AT TIME ZONE 'UTC') + interval '1 day') AT TIME ZONE 'UTC';
        part := 'authz_outbox_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDD');
        EXECUTE format('CREATE TABLE @s@.%I (LIKE @s@.authz_outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (id)) WITH (fillfactor = 70)', part);
        EXECUTE format(
            'WITH moved AS (DELETE FROM @s@.authz_outbox_default WHERE created_at >= $1 AND created_at < $2 RETURNING *)
             INSERT INTO @s@.%I SELECT * FROM moved', part) USING lo, hi;
        PERFORM @s@.authz_outbox_index_partition(part);
        EXECUTE format('ALTER TABLE @s@.authz_outbox ATTACH PARTITION @s@.%I FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
        made := made + 1;
        lo := hi;
    END LOOP;
    RETURN made;
END
$fn$;
$body$, '@s@', s);

    -- Drops each partition whose range ended more than `retention` ago and
    -- whose rows all finished more than `retention` ago. A partition with a
    -- pending or dead row is kept whole: a dead row waits for an operator
    -- (replay, or an explicit purge), never for retention. Returns the
    -- dropped partitions' names. The caller bounds the lock wait.
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION @s@.authz_outbox_drop_partitions(retention interval)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    p    record;
    held boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('authz_outbox_partitions'));
    FOR p IN SELECT * FROM @s@.authz_outbox_partitions() q
             WHERE NOT q.is_default AND q.upper_bound <= now() - retention
             ORDER BY q.upper_bound LOOP
        -- No write reaches it between the check and the drop.
        EXECUTE format('LOCK TABLE @s@.%I IN ACCESS EXCLUSIVE MODE', p.name);
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
        EXECUTE format('DROP TABLE @s@.%I', p.name);
        RETURN NEXT p.name;
    END LOOP;
END
$fn$;
$body$, '@s@', s);
END
$functions$;
REVOKE ALL ON FUNCTION authz_outbox_index_partition(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION authz_outbox_partitions() FROM PUBLIC;
REVOKE ALL ON FUNCTION authz_outbox_create_partitions(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION authz_outbox_drop_partitions(interval) FROM PUBLIC;

DO $swap$
DECLARE
    cutoff timestamptz;
    g      record;
BEGIN
    IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = to_regclass('authz_outbox')) <> 'r' THEN
        RETURN;
    END IF;
    SELECT substring(pg_catalog.pg_get_constraintdef(oid) FROM '''([^'']*)''')::timestamptz INTO cutoff
    FROM pg_catalog.pg_constraint
    WHERE conrelid = to_regclass('authz_outbox') AND conname = 'authz_outbox_legacy_range';

    ALTER TABLE authz_outbox RENAME TO authz_outbox_legacy;
    ALTER INDEX authz_outbox_pending_by_operation RENAME TO authz_outbox_legacy_pending_by_operation;
    ALTER INDEX authz_outbox_by_resource RENAME TO authz_outbox_legacy_by_resource;
    ALTER INDEX authz_outbox_dead_by_time RENAME TO authz_outbox_legacy_dead_by_time;
    ALTER INDEX authz_outbox_finished_by_time RENAME TO authz_outbox_legacy_finished_by_time;
    ALTER TABLE authz_outbox_legacy ALTER COLUMN created_at SET DEFAULT clock_timestamp();

    CREATE TABLE authz_outbox (
        id                bigint      NOT NULL DEFAULT nextval('authz_outbox_id_seq'),
        resource_type     text        NOT NULL,
        resource_id       text        NOT NULL,
        parent_type       text,
        parent_id         text,
        operation         text        NOT NULL CONSTRAINT authz_outbox_operation_check
                                      CHECK (operation IN ('register', 'deregister')),
        principal         jsonb,
        state             text        NOT NULL DEFAULT 'pending' CONSTRAINT authz_outbox_state_check
                                      CHECK (state IN ('pending', 'delivered', 'dead', 'superseded')),
        attempts          integer     NOT NULL DEFAULT 0,
        next_attempt_at   timestamptz NOT NULL DEFAULT now(),
        locked_by         text,
        locked_until      timestamptz,
        lease_token       uuid,
        last_error        text,
        last_status       integer,
        created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
        delivered_at      timestamptz,
        finished_at       timestamptz,
        consistency_token text,
        guarded           boolean     NOT NULL DEFAULT false,
        origin            text        NOT NULL DEFAULT 'capture',
        attributes        jsonb,
        principal_source  text
    ) PARTITION BY RANGE (created_at);
    -- Whoever could read or write the outbox (the worker's and reconcile's
    -- roles, docs/operations.md) still can: the old table's grants, copied.
    FOR g IN SELECT a.grantee, a.privilege_type, a.is_grantable
             FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
             WHERE c.oid = to_regclass('authz_outbox_legacy') AND a.grantee <> c.relowner LOOP
        EXECUTE format('GRANT %s ON authz_outbox TO %s%s', g.privilege_type,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    -- The sequence goes with the parent: dropping the old partition one day
    -- must not drop the sequence.
    ALTER SEQUENCE authz_outbox_id_seq OWNED BY authz_outbox.id;

    CREATE INDEX authz_outbox_pending_by_operation
        ON authz_outbox (operation, id) WHERE state = 'pending';
    CREATE INDEX authz_outbox_by_resource
        ON authz_outbox (resource_type, resource_id, id);
    CREATE INDEX authz_outbox_dead_by_time
        ON authz_outbox (finished_at) WHERE state = 'dead';
    CREATE INDEX authz_outbox_finished_by_time
        ON authz_outbox (finished_at) WHERE state IN ('delivered', 'superseded');

    EXECUTE format('ALTER TABLE authz_outbox ATTACH PARTITION authz_outbox_legacy FOR VALUES FROM (MINVALUE) TO (%L)', cutoff);
    -- Its range is now the partition's own constraint.
    ALTER TABLE authz_outbox_legacy DROP CONSTRAINT authz_outbox_legacy_range;

    -- The safety net: a row whose day has no partition yet (creating ahead
    -- fell behind) lands here instead of failing the host's write; creating
    -- that day's partition moves it out.
    CREATE TABLE authz_outbox_default (LIKE authz_outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (id))
        WITH (fillfactor = 70);
    PERFORM authz_outbox_index_partition('authz_outbox_default');
    ALTER TABLE authz_outbox ATTACH PARTITION authz_outbox_default DEFAULT;

    -- Who each resource was registered as: the statement trigger moves to
    -- the parent, whose transition tables see the rows of every partition.
    DROP TRIGGER IF EXISTS authz_outbox_owners_on_delivery ON authz_outbox_legacy;
    CREATE TRIGGER authz_outbox_owners_on_delivery
        AFTER UPDATE ON authz_outbox
        REFERENCING OLD TABLE AS authz_outbox_updated_old NEW TABLE AS authz_outbox_updated_new
        FOR EACH STATEMENT
        EXECUTE FUNCTION authz_outbox_record_owner();
END
$swap$;

SELECT authz_outbox_create_partitions(3);
