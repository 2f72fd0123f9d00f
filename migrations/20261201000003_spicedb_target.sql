-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- The SpiceDB target: relationships whose subject comes from a column other
-- than the parent's (`document:{id}#owner@user:{owner_id}`) need that
-- column's value at delivery, when the row may have changed or be gone. The
-- capture of such a mapping stores those values here, as a JSON object of
-- text values; every other capture leaves it NULL (and the built-in
-- mappings' capture is unchanged). A nullable column without a default: no
-- table rewrite, no row touched.
ALTER TABLE authz_outbox ADD COLUMN IF NOT EXISTS attributes jsonb;

-- authz_outbox_enqueue_as, with the row's attributes.
CREATE OR REPLACE FUNCTION authz_outbox_enqueue_with(
    p_operation text, p_resource_type text, p_resource_id text,
    p_parent_type text, p_parent_id text, p_who jsonb, p_attributes jsonb
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
        INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation,
                                  principal, attributes)
        VALUES (p_resource_type, p_resource_id, p_parent_type, p_parent_id, p_operation,
                who, p_attributes);
        IF authz_outbox_workers_asleep() THEN
            PERFORM pg_notify('authz_outbox', '');
        END IF;
        RETURN true;
    END IF;
    INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation,
                              principal, attributes, state, finished_at, last_error)
    VALUES (p_resource_type, p_resource_id, p_parent_type, p_parent_id, p_operation,
            who, p_attributes, 'dead', clock_timestamp(),
            'no creator resolvable: set authz_outbox.principal in the writing transaction');
    RETURN false;
END
$$;
