-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- Who each resource was registered as, kept after retention prunes the
-- outbox rows that said so: reconcile compares it with the owners SpiceDB
-- holds (drift of kind `owner_mismatch`).
--
-- One row per principal registered since the resource's last delivered
-- deregister: a register TOUCHes its owner edge and only a deregister removes
-- edges, so two registers as two principals with no deregister between them
-- leave SpiceDB holding both, and both are recorded. Maintained by the
-- trigger below when a row becomes `delivered`; rows that never reached
-- SpiceDB (superseded, dead) change nothing. `principal_key` is the
-- principal's canonical text hashed, so the key's size does not depend on
-- how many fields a provider's principal keeps.
CREATE TABLE IF NOT EXISTS authz_outbox_owners (
    resource_type    text        NOT NULL,
    resource_id      text        NOT NULL,
    principal_key    text        NOT NULL,
    principal        jsonb       NOT NULL,
    -- Where the register's principal came from (authz_outbox.principal_source).
    principal_source text,
    -- The delivered register that recorded it, and when it was delivered.
    outbox_id        bigint      NOT NULL,
    registered_at    timestamptz NOT NULL,
    PRIMARY KEY (resource_type, resource_id, principal_key)
);

-- Replaced by `migrate` right after the migrations (src/mapping/core.rs):
-- search path pinned to pg_catalog, every name qualified. SECURITY DEFINER
-- so the worker, which marks rows delivered, needs no grant on the table.
CREATE OR REPLACE FUNCTION authz_outbox_record_owner() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW.operation = 'deregister' THEN
        DELETE FROM authz_outbox_owners
        WHERE resource_type = NEW.resource_type AND resource_id = NEW.resource_id;
    ELSIF authz_outbox_has_creator(NEW.principal) THEN
        INSERT INTO authz_outbox_owners (resource_type, resource_id, principal_key, principal,
                                         principal_source, outbox_id, registered_at)
        VALUES (NEW.resource_type, NEW.resource_id, md5(NEW.principal::text), NEW.principal,
                NEW.principal_source, NEW.id, coalesce(NEW.delivered_at, now()))
        ON CONFLICT (resource_type, resource_id, principal_key) DO UPDATE
        SET principal_source = EXCLUDED.principal_source,
            outbox_id = EXCLUDED.outbox_id,
            registered_at = EXCLUDED.registered_at;
    END IF;
    RETURN NULL;
END
$$;

-- Only the transition to `delivered` fires it: claims, retries and leases
-- (the worker's hot updates) do not.
DROP TRIGGER IF EXISTS authz_outbox_owners_on_delivery ON authz_outbox;
CREATE TRIGGER authz_outbox_owners_on_delivery
    AFTER UPDATE OF state ON authz_outbox
    FOR EACH ROW
    WHEN (NEW.state = 'delivered' AND OLD.state IS DISTINCT FROM 'delivered')
    EXECUTE FUNCTION authz_outbox_record_owner();

-- Filled from the rows already delivered by the next migration, in a
-- transaction of its own: the trigger's lock on authz_outbox, which holds the
-- host's captured writes too, is released as soon as this one commits.
