-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- The outbox. Its table and column names are a public contract: operators
-- query it and writers in other languages rely on the capture triggers.

-- bigserial and 32-bit attempts/status are kept: the table and its sequence
-- are a public contract, attempts are capped far below 2^31 and a status is
-- an HTTP code.
CREATE TABLE IF NOT EXISTS authz_outbox (
    -- The global order. Per-resource order is "by id among rows of one resource".
    -- squawk-ignore prefer-identity
    id                bigserial PRIMARY KEY,
    resource_type     text        NOT NULL,
    resource_id       text        NOT NULL,
    parent_type       text,
    parent_id         text,
    operation         text        NOT NULL CHECK (operation IN ('register', 'deregister')),
    -- Creator identity only (an allowlist of fields), never a credential.
    principal         jsonb,
    state             text        NOT NULL DEFAULT 'pending'
                                  CHECK (state IN ('pending', 'delivered', 'dead', 'superseded')),
    -- squawk-ignore prefer-bigint-over-int
    attempts          integer     NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    -- The lease: a pending row with locked_until in the future is held by
    -- locked_by; lease_token is the fencing token of that claim, so a worker
    -- whose lease expired can never record an outcome over the new holder's.
    locked_by         text,
    locked_until      timestamptz,
    lease_token       uuid,
    last_error        text,
    -- squawk-ignore prefer-bigint-over-int
    last_status       integer,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at      timestamptz,
    -- When the row reached a terminal state (delivered, dead or superseded).
    finished_at       timestamptz,
    consistency_token text,
    -- Guarded deregisters (enqueued by reconcile) are delivered only if the
    -- resource's row still does not exist at delivery time.
    guarded           boolean     NOT NULL DEFAULT false,
    -- Who enqueued the row: capture (triggers), reconcile, replay.
    origin            text        NOT NULL DEFAULT 'capture'
)
-- Claiming a row updates only unindexed columns (lease, attempts); with room
-- left on each page those updates are HOT and leave no dead index entries
-- for the next claim to scan past.
WITH (fillfactor = 70);

-- "Next due rows", scanned in global order per operation (deregisters first).
-- The table was created empty by this same migration: nothing to block.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS authz_outbox_pending_by_operation
    ON authz_outbox (operation, id) WHERE state = 'pending';
-- "Is there an earlier undelivered row for this resource?"
-- The table was created empty by this same migration: nothing to block.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS authz_outbox_pending_by_resource
    ON authz_outbox (resource_type, resource_id, id) WHERE state = 'pending';
-- History of one resource (replay's "overtaken?" check, the creator of a deregister).
-- The table was created empty by this same migration: nothing to block.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS authz_outbox_by_resource
    ON authz_outbox (resource_type, resource_id, id);
-- "Dead rows by time" for status, replay and alerts.
-- The table was created empty by this same migration: nothing to block.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS authz_outbox_dead_by_time
    ON authz_outbox (finished_at) WHERE state = 'dead';
-- Pruning of finished rows past retention.
-- The table was created empty by this same migration: nothing to block.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS authz_outbox_finished_by_time
    ON authz_outbox (finished_at) WHERE state IN ('delivered', 'superseded');

-- The creator of the current write, from the transaction-local setting
-- `authz_outbox.principal` (or a role/database default of it), reduced to the
-- identity allowlist. NULL when the setting is absent, empty, not JSON or not
-- an object. Malformed input must never abort the host's transaction.
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
    RETURN (
        SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb)
        FROM jsonb_each(parsed)
        WHERE key IN ('user_id', 'service_account_id', 'account_id', 'principal_type')
          AND jsonb_typeof(value) IN ('string', 'null')
    );
END
$$;

-- A principal names a creator when user_id or service_account_id is a
-- non-empty string (the host's rule for "creator resolvable").
CREATE OR REPLACE FUNCTION authz_outbox_has_creator(p jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p IS NOT NULL AND (
        coalesce(nullif(p ->> 'user_id', ''), nullif(p ->> 'service_account_id', '')) IS NOT NULL
    )
$$;

-- NOTIFY serialises committing transactions (PostgreSQL takes a global lock
-- for the notification queue from pre-commit to the end of commit, WAL flush
-- included), which measured as half the throughput of key creation. A busy
-- worker does not need the wake-up: it claims again as soon as it has room.
-- So captures notify only while some worker is asleep waiting for work.
--
-- Workers register here when they go idle and clear the mark when they find
-- work. UNLOGGED: after a crash the table is empty; each worker, woken by its
-- poll, marks itself again the next time it goes idle. A missed wake-up only
-- costs the poll interval.
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

-- Enqueue one operation. A write whose creator cannot be resolved is never
-- skipped: it becomes a dead row that `status` shows and `replay --principal`
-- can re-drive. A deregister without a principal of its own (a cascade, a
-- manual DELETE) borrows the one its resource was registered with.
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

CREATE OR REPLACE FUNCTION authz_outbox_capture_api_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM authz_outbox_enqueue('deregister', 'api_key', OLD.id, 'agent', OLD.agent_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM authz_outbox_enqueue('register', 'api_key', NEW.id, 'agent', NEW.agent_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION authz_outbox_capture_agent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM authz_outbox_enqueue('deregister', 'agent', OLD.id, NULL, NULL);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM authz_outbox_enqueue('register', 'agent', NEW.id, NULL, NULL);
    END IF;
    RETURN NULL;
END
$$;

-- Only where the host's tables exist: authz-outbox never creates them, and
-- `migrate` replaces these triggers with the installed mappings' anyway.
DO $$
BEGIN
    IF to_regclass('agent_api_keys') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS authz_outbox_capture_insert_delete ON agent_api_keys;
        CREATE TRIGGER authz_outbox_capture_insert_delete
            AFTER INSERT OR DELETE ON agent_api_keys
            FOR EACH ROW EXECUTE FUNCTION authz_outbox_capture_api_key();

        DROP TRIGGER IF EXISTS authz_outbox_capture_rekey ON agent_api_keys;
        CREATE TRIGGER authz_outbox_capture_rekey
            AFTER UPDATE OF id, agent_id ON agent_api_keys
            FOR EACH ROW
            WHEN (OLD.id IS DISTINCT FROM NEW.id OR OLD.agent_id IS DISTINCT FROM NEW.agent_id)
            EXECUTE FUNCTION authz_outbox_capture_api_key();
    END IF;
    IF to_regclass('agents') IS NOT NULL THEN
        DROP TRIGGER IF EXISTS authz_outbox_capture_insert_delete ON agents;
        CREATE TRIGGER authz_outbox_capture_insert_delete
            AFTER INSERT OR DELETE ON agents
            FOR EACH ROW EXECUTE FUNCTION authz_outbox_capture_agent();

        DROP TRIGGER IF EXISTS authz_outbox_capture_rekey ON agents;
        CREATE TRIGGER authz_outbox_capture_rekey
            AFTER UPDATE OF id ON agents
            FOR EACH ROW
            WHEN (OLD.id IS DISTINCT FROM NEW.id)
            EXECUTE FUNCTION authz_outbox_capture_agent();
    END IF;
END
$$;

-- Results of reconcile runs; the worker exports the latest as metrics.
CREATE TABLE IF NOT EXISTS authz_outbox_reconcile_runs (
    -- squawk-ignore prefer-identity
    id          bigserial PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied     boolean     NOT NULL,
    drift       bigint      NOT NULL,
    summary     jsonb       NOT NULL
);
