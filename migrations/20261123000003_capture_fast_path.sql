-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- The capture path, cheaper per transaction; behaviour unchanged.
--
-- Measured per captured key (one INSERT per transaction, asynchronous
-- commit, 5,000 in a loop): the trigger cost about as much again as the
-- key's own insert. Most of it was per-transaction set-up of nested calls,
-- not work: `PERFORM authz_outbox_enqueue(...)` runs a query through SPI, a
-- non-inlined SQL function re-plans its body for every calling query, and
-- the principal allowlist ran a jsonb_each query for every key. Now:
--   * the principal's usual shape (only allowlisted keys, string or null
--     values) is recognised by operators alone; other shapes still go
--     through the filtering query;
--   * authz_outbox_workers_asleep is PL/pgSQL, so its plan is cached for
--     the session;
--   * authz_outbox_enqueue_row (authz_outbox_enqueue's successor) returns
--     whether it enqueued a pending row, so the triggers call it as a plain
--     expression instead of through PERFORM;
--   * the partial index authz_outbox_pending_by_resource is dropped: the
--     claim's "earlier pending row of this resource?" check uses
--     authz_outbox_by_resource (a resource has a handful of rows), and every
--     captured row and every state change wrote one index entry fewer.

CREATE OR REPLACE FUNCTION authz_outbox_current_principal() RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    raw    text := current_setting('authz_outbox.principal', true);
    parsed jsonb;
BEGIN
    IF raw IS NULL OR btrim(raw) = '' THEN
        RETURN NULL;
    END IF;
    BEGIN
        parsed := raw::jsonb;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    IF jsonb_typeof(parsed) <> 'object' THEN
        RETURN NULL;
    END IF;
    -- The usual shape, recognised without a query.
    IF parsed - '{user_id,service_account_id,account_id,principal_type}'::text[] = '{}'::jsonb
       AND coalesce(jsonb_typeof(parsed -> 'user_id'), 'null') IN ('string', 'null')
       AND coalesce(jsonb_typeof(parsed -> 'service_account_id'), 'null') IN ('string', 'null')
       AND coalesce(jsonb_typeof(parsed -> 'account_id'), 'null') IN ('string', 'null')
       AND coalesce(jsonb_typeof(parsed -> 'principal_type'), 'null') IN ('string', 'null')
    THEN
        RETURN parsed;
    END IF;
    RETURN (
        SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb)
        FROM jsonb_each(parsed)
        WHERE key IN ('user_id', 'service_account_id', 'account_id', 'principal_type')
          AND jsonb_typeof(value) IN ('string', 'null')
    );
END
$$;

CREATE OR REPLACE FUNCTION authz_outbox_workers_asleep() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM authz_outbox_listeners WHERE sleeping_since IS NOT NULL);
END
$$;

-- authz_outbox_enqueue with a result (true when a pending row was enqueued,
-- false for a dead one), so that callers can use it as an expression. A new
-- name, because CREATE OR REPLACE cannot change a return type.
CREATE OR REPLACE FUNCTION authz_outbox_enqueue_row(
    p_operation text, p_resource_type text, p_resource_id text,
    p_parent_type text, p_parent_id text
) RETURNS boolean
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
        RETURN true;
    END IF;
    INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation,
                              principal, state, finished_at, last_error)
    VALUES (p_resource_type, p_resource_id, p_parent_type, p_parent_id, p_operation,
            who, 'dead', clock_timestamp(),
            'no creator resolvable: set authz_outbox.principal in the writing transaction');
    RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION authz_outbox_capture_api_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    enqueued boolean;
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        enqueued := authz_outbox_enqueue_row('deregister', 'api_key', OLD.id, 'agent', OLD.agent_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        enqueued := authz_outbox_enqueue_row('register', 'api_key', NEW.id, 'agent', NEW.agent_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION authz_outbox_capture_agent() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    enqueued boolean;
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        enqueued := authz_outbox_enqueue_row('deregister', 'agent', OLD.id, NULL, NULL);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        enqueued := authz_outbox_enqueue_row('register', 'agent', NEW.id, NULL, NULL);
    END IF;
    RETURN NULL;
END
$$;

-- Released before the concurrent-index rule was adopted; applied by every
-- deployment since. New migrations drop and build indexes CONCURRENTLY.
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX IF EXISTS authz_outbox_pending_by_resource;

-- Nothing calls the old one any more.
-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS authz_outbox_enqueue(text, text, text, text, text);
