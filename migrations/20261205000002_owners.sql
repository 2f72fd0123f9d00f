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
--
-- A statement trigger over the rows the statement changed (its transition
-- tables), not a row trigger: recording 100,000 outcomes in batches of 100
-- took 2.4 s without it, 4.6 s with it, and 8.4 s with the same work done
-- row by row; the worker's claims (updates that change no state) cost the
-- same with and without it.
CREATE OR REPLACE FUNCTION authz_outbox_record_owner() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM authz_outbox_owners AS w
    USING (SELECT DISTINCT n.resource_type, n.resource_id
           FROM authz_outbox_updated_new AS n
           JOIN authz_outbox_updated_old AS o ON o.id = n.id
           WHERE n.state = 'delivered' AND o.state IS DISTINCT FROM 'delivered'
             AND n.operation = 'deregister') AS d
    WHERE w.resource_type = d.resource_type AND w.resource_id = d.resource_id;
    INSERT INTO authz_outbox_owners AS w (resource_type, resource_id, principal_key, principal,
                                          principal_source, outbox_id, registered_at)
    SELECT DISTINCT ON (n.resource_type, n.resource_id, md5(n.principal::text))
           n.resource_type, n.resource_id, md5(n.principal::text), n.principal,
           n.principal_source, n.id, coalesce(n.delivered_at, now())
    FROM authz_outbox_updated_new AS n
    JOIN authz_outbox_updated_old AS o ON o.id = n.id
    LEFT JOIN (SELECT d.resource_type, d.resource_id, max(d.id) AS id
               FROM authz_outbox_updated_new AS d
               JOIN authz_outbox_updated_old AS od ON od.id = d.id
               WHERE d.state = 'delivered' AND od.state IS DISTINCT FROM 'delivered'
                 AND d.operation = 'deregister'
               GROUP BY d.resource_type, d.resource_id) AS last
           ON last.resource_type = n.resource_type AND last.resource_id = n.resource_id
    WHERE n.state = 'delivered' AND o.state IS DISTINCT FROM 'delivered'
      AND n.operation = 'register'
      AND authz_outbox_has_creator(n.principal)
      AND (last.id IS NULL OR n.id > last.id)
    ORDER BY n.resource_type, n.resource_id, md5(n.principal::text), n.id DESC
    ON CONFLICT (resource_type, resource_id, principal_key) DO UPDATE
    SET principal_source = EXCLUDED.principal_source,
        outbox_id = EXCLUDED.outbox_id,
        registered_at = EXCLUDED.registered_at;
    RETURN NULL;
END
$$;

-- Fires for every UPDATE of authz_outbox (a trigger with transition tables
-- takes no column list and no WHEN); only rows whose state became
-- `delivered` count.
DROP TRIGGER IF EXISTS authz_outbox_owners_on_delivery ON authz_outbox;
CREATE TRIGGER authz_outbox_owners_on_delivery
    AFTER UPDATE ON authz_outbox
    REFERENCING OLD TABLE AS authz_outbox_updated_old NEW TABLE AS authz_outbox_updated_new
    FOR EACH STATEMENT
    EXECUTE FUNCTION authz_outbox_record_owner();

-- Filled from the rows already delivered by the next migration, in a
-- transaction of its own: the trigger's lock on authz_outbox, which holds the
-- host's captured writes too, is released as soon as this one commits.
