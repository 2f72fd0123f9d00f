-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- authz_outbox_owners from the delivered rows still present: per resource,
-- every principal registered after its last delivered deregister (the state
-- the trigger of the previous migration would have built). Resources whose
-- rows were already pruned have no recorded owner, and reconcile does not
-- judge their owners.
--
-- Race-free with deliveries going on: the table is locked against writes
-- first, so a delivery that has not committed yet waits in its trigger and
-- applies its change on top of the backfill; one that committed before is
-- in the backfill's snapshot (taken after the lock). Only the worker's
-- outcomes wait, for as long as the backfill reads the outbox; the host's
-- writes never touch this table.
LOCK TABLE authz_outbox_owners IN EXCLUSIVE MODE;

INSERT INTO authz_outbox_owners (resource_type, resource_id, principal_key, principal,
                                 principal_source, outbox_id, registered_at)
SELECT DISTINCT ON (r.resource_type, r.resource_id, md5(r.principal::text))
       r.resource_type, r.resource_id, md5(r.principal::text), r.principal,
       r.principal_source, r.id, coalesce(r.delivered_at, r.finished_at, r.created_at)
FROM authz_outbox AS r
WHERE r.state = 'delivered'
  AND r.operation = 'register'
  AND authz_outbox_has_creator(r.principal)
  AND NOT EXISTS (
      SELECT 1 FROM authz_outbox AS d
      WHERE d.resource_type = r.resource_type
        AND d.resource_id = r.resource_id
        AND d.operation = 'deregister'
        AND d.state = 'delivered'
        AND (coalesce(d.delivered_at, d.finished_at, d.created_at), d.id)
            > (coalesce(r.delivered_at, r.finished_at, r.created_at), r.id))
ORDER BY r.resource_type, r.resource_id, md5(r.principal::text), r.id DESC
ON CONFLICT DO NOTHING;
