-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)
-- squawk-ignore-file prefer-text-field
-- (Accepted: these are the host's tables, created only when absent, with the
-- host's own column types.)

-- The host service (scale-agentex) owns `agents` and `agent_api_keys`. On a
-- fresh database (tests, the demo) we create a compatible subset; on the
-- host's database they already exist and must not be altered, so every
-- statement here is conditional.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'agentapikeytype') THEN
        CREATE TYPE agentapikeytype AS ENUM ('INTERNAL', 'EXTERNAL', 'GITHUB', 'SLACK');
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS agents (
    id         varchar(64) PRIMARY KEY,
    name       varchar(256) NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS agent_api_keys (
    id           text NOT NULL,
    agent_id     varchar(64) NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    created_at   timestamptz DEFAULT now(),
    name         varchar(256) NOT NULL,
    api_key_type agentapikeytype NOT NULL,
    api_key      text NOT NULL,
    PRIMARY KEY (id, agent_id)
);
