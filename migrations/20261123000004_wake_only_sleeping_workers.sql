-- NOTIFY serialises committing transactions (PostgreSQL takes a global lock
-- for the notification queue from pre-commit to the end of commit, WAL flush
-- included), which measured as half the throughput of key creation. A busy
-- worker does not need the wake-up: it claims again as soon as it has room.
-- So captures notify only while some worker is asleep waiting for work.
--
-- Workers register here when they go idle and clear the mark when they find
-- work. UNLOGGED: after a crash the table is empty and the first idle worker
-- re-registers; a missed wake-up only costs the poll interval.
CREATE UNLOGGED TABLE IF NOT EXISTS authz_outbox_listeners (
    worker_id      text PRIMARY KEY,
    sleeping_since timestamptz
);

-- SECURITY DEFINER so host writers need no grant on the listeners table
-- (every role may execute functions by default); the search_path is pinned
-- to the one the migration ran with.
CREATE OR REPLACE FUNCTION authz_outbox_workers_asleep() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT EXISTS (SELECT 1 FROM authz_outbox_listeners WHERE sleeping_since IS NOT NULL)
$$;

CREATE OR REPLACE FUNCTION authz_outbox_enqueue(
    p_operation text, p_resource_type text, p_resource_id text,
    p_parent_type text, p_parent_id text
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    who jsonb := authz_outbox_current_principal();
BEGIN
    IF p_operation = 'deregister' AND NOT authz_outbox_has_creator(who) THEN
        SELECT o.principal INTO who
        FROM authz_outbox o
        WHERE o.resource_type = p_resource_type
          AND o.resource_id = p_resource_id
          AND o.operation = 'register'
          AND authz_outbox_has_creator(o.principal)
        ORDER BY o.id DESC
        LIMIT 1;
    END IF;

    IF authz_outbox_has_creator(who) THEN
        INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation, principal)
        VALUES (p_resource_type, p_resource_id, p_parent_type, p_parent_id, p_operation, who);
        IF authz_outbox_workers_asleep() THEN
            PERFORM pg_notify('authz_outbox', '');
        END IF;
    ELSE
        INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation,
                                  principal, state, finished_at, last_error)
        VALUES (p_resource_type, p_resource_id, p_parent_type, p_parent_id, p_operation,
                who, 'dead', clock_timestamp(),
                'no creator resolvable: set authz_outbox.principal in the writing transaction');
    END IF;
END
$$;
