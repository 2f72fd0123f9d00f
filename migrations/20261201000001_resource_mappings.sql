-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- Resource mappings: the machinery every mapping's generated capture calls.
--
-- The capture triggers themselves are generated from the mappings in force
-- and installed by `authz-outbox migrate` after these migrations (see
-- src/mapping/). This migration does not touch the existing api_key and
-- agent triggers: the mapping install replaces them in the same
-- transaction that creates their successors, so no write is ever made
-- without a capture. Rows already in the outbox are not touched.

-- What `migrate` installed, per mapping: its definition and the exact DDL,
-- so a later `migrate` with the same mappings is a no-op and `mappings
-- list` shows what is in force.
CREATE TABLE IF NOT EXISTS authz_outbox_mappings (
    name          text PRIMARY KEY,
    resource_type text        NOT NULL,
    table_name    text        NOT NULL,
    join_table    text,
    definition    jsonb       NOT NULL,
    ddl           text        NOT NULL,
    installed_at  timestamptz NOT NULL DEFAULT now()
);

-- Fields that look like credentials are dropped from any principal,
-- whatever a mapping's `principal_fields` say (mirrors
-- domain::principal::is_credential_key in the worker: CREDENTIAL_KEYS and
-- CREDENTIAL_SUFFIXES; a test compares the two).
CREATE OR REPLACE FUNCTION authz_outbox_is_credential_field(field text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT lower(btrim(field)) = ANY (ARRAY['api_key', 'apikey', 'api-key', 'x-api-key', 'token', 'access_token', 'refresh_token', 'id_token', 'bearer', 'secret', 'client_secret', 'password', 'passwd', 'pwd', 'authorization', 'cookie', 'set-cookie', 'credential', 'credentials', 'private_key', 'session', 'session_id', 'jwt'])
        OR EXISTS (
            SELECT 1 FROM unnest(ARRAY['_token', '-token', '_secret', '-secret', '_password', '_passwd', '_api_key', '_apikey', '_key_secret', '_private_key', '_credential', '_credentials', '_cookie', '_session']) AS s(suffix)
            WHERE right(lower(btrim(field)), length(s.suffix)) = s.suffix)
$$;

-- A principal reduced to the kept fields: scalar values only (a nested
-- object could hide a token), strings of at most 256 characters (a longer
-- value is dropped, never cut, so an identity is never silently altered),
-- credential-looking fields never.
CREATE OR REPLACE FUNCTION authz_outbox_sanitize_principal(p jsonb, keep text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p IS NULL OR jsonb_typeof(p) <> 'object' THEN NULL ELSE (
        SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb)
        FROM jsonb_each(p)
        WHERE key = ANY (keep)
          AND NOT authz_outbox_is_credential_field(key)
          AND jsonb_typeof(value) IN ('string', 'number', 'boolean', 'null')
          AND (jsonb_typeof(value) <> 'string' OR length(value #>> '{}') <= 256)
    ) END
$$;

-- JSON text to an object, or NULL (never an error: malformed input must
-- not abort the host's transaction).
CREATE OR REPLACE FUNCTION authz_outbox_parse_jsonb(raw text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
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
    RETURN parsed;
END
$$;

-- The transaction setting `authz_outbox.principal`, parsed, not reduced.
CREATE OR REPLACE FUNCTION authz_outbox_setting_principal() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT authz_outbox_parse_jsonb(current_setting('authz_outbox.principal', true))
$$;

-- The first candidate that names a creator, reduced to the kept fields;
-- else the first reduced candidate at all (recorded on the dead row);
-- else NULL.
CREATE OR REPLACE FUNCTION authz_outbox_first_creator(candidates jsonb[], keep text[]) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    candidate jsonb;
    reduced   jsonb;
    fallback  jsonb;
BEGIN
    FOREACH candidate IN ARRAY candidates LOOP
        reduced := authz_outbox_sanitize_principal(candidate, keep);
        IF authz_outbox_has_creator(reduced) THEN
            RETURN reduced;
        END IF;
        fallback := coalesce(fallback, reduced);
    END LOOP;
    RETURN fallback;
END
$$;

-- The default principal path (the setting, the identity allowlist), now
-- also capping value lengths. The usual shape is still recognised by
-- operators alone.
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
    IF parsed - '{user_id,service_account_id,account_id,principal_type}'::text[] = '{}'::jsonb
       AND coalesce(jsonb_typeof(parsed -> 'user_id'), 'null') IN ('string', 'null')
       AND coalesce(jsonb_typeof(parsed -> 'service_account_id'), 'null') IN ('string', 'null')
       AND coalesce(jsonb_typeof(parsed -> 'account_id'), 'null') IN ('string', 'null')
       AND coalesce(jsonb_typeof(parsed -> 'principal_type'), 'null') IN ('string', 'null')
       AND length(raw) <= 256
    THEN
        RETURN parsed;
    END IF;
    RETURN authz_outbox_sanitize_principal(
        parsed, '{user_id,service_account_id,account_id,principal_type}'::text[]);
END
$$;

-- Enqueue one operation with the creator the capture resolved. A write
-- with no creator is never skipped: it becomes a dead row `status` shows
-- and `replay --principal` re-drives. A deregister without a creator of
-- its own (a cascade, a manual DELETE) borrows its resource's register's.
CREATE OR REPLACE FUNCTION authz_outbox_enqueue_as(
    p_operation text, p_resource_type text, p_resource_id text,
    p_parent_type text, p_parent_id text, p_who jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    who jsonb := p_who;
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

-- The previous entry point, kept for writers that call it directly.
CREATE OR REPLACE FUNCTION authz_outbox_enqueue_row(
    p_operation text, p_resource_type text, p_resource_id text,
    p_parent_type text, p_parent_id text
) RETURNS boolean
LANGUAGE sql AS $$
    SELECT authz_outbox_enqueue_as(p_operation, p_resource_type, p_resource_id,
                                   p_parent_type, p_parent_id, authz_outbox_current_principal())
$$;

-- Until `migrate` installs the mappings: every resource counts as live,
-- as it did for types without a table before mappings existed.
CREATE OR REPLACE FUNCTION authz_outbox_resource_live(p_type text, p_selector text, p_parent_id text)
RETURNS boolean LANGUAGE sql STABLE AS $$ SELECT true $$;

-- Released versions altered a minimal `agents` here (one migration 1 used
-- to create) to add the host's `status` and `description`. authz-outbox
-- never creates or alters a host's table, so that step is gone; databases
-- that applied it keep its result (src/migrate.rs, REVISED).
