-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- Read-your-writes by resource, for writers in any language.
--
-- A writer that has just committed a change to a resource (an api key, an
-- agent, a task, a schedule) calls
--
--     SELECT * FROM authz_outbox_wait_for_resource('api_key', '<key id>', interval '5 seconds');
--
-- and gets one row (outcome, error, consistency_token, outbox_id) once the
-- resource has nothing left to deliver, or when the timeout passes. It needs
-- no outbox id, only the resource it wrote.
--
-- outcome:
--   delivered   nothing pending; the resource's newest row reached agentex-auth
--               (consistency_token: the ZedToken it answered, when it sent one)
--   superseded  nothing pending; the newest row was settled without a request
--               (e.g. the key was created and deleted before any delivery)
--   dead        the newest row is dead: answered at once, with its error
--               (fix the cause, then `authz-outbox replay`)
--   timeout     a row of the resource was still pending when the timeout passed
--   none        the resource has no outbox row at all (never captured: check
--               the type and id; or its rows were pruned after retention)
--
-- "Newest row" semantics: what counts is the resource's latest captured
-- operation. A delivered register followed by a pending deregister is not
-- done; an older dead row followed by a delivered one is done.
--
-- Why it polls, and how. A function cannot receive NOTIFY, and the worker
-- holds no row lock while its request is in flight (the lease is a column),
-- so there is nothing to block on. Instead it re-reads the resource's few
-- rows through authz_outbox_by_resource (resource_type, resource_id, id)
-- with pg_sleep in between, the pause a tenth of the time waited so far,
-- at least 1 ms and at most 50 ms. Commit to delivered is a few
-- milliseconds at moderate load, so most waits poll every millisecond and
-- return within about one of the delivery; a slow delivery is noticed at
-- most ~10% (or 50 ms) late, and a long wait costs 20 polls a second. Each
-- poll is one index scan of a handful of rows. (A doubling step measured
-- worse: under load, deliveries of 20-40 ms were noticed 7-9 ms late.)
--
-- Why READ COMMITTED only. The function is VOLATILE PL/pgSQL, so under READ
-- COMMITTED each of its statements takes a fresh snapshot and sees the
-- worker's commits as they happen. Under REPEATABLE READ or SERIALIZABLE
-- every statement reuses the transaction's snapshot and could never see
-- progress; such a call is refused instead of sleeping to its timeout. A
-- transaction that has itself written (it holds a transaction id) is refused
-- too: its own captured rows are invisible to the worker until it commits,
-- and it would hold its locks for the whole wait. Call it after COMMIT.
--
-- SECURITY DEFINER, so a writer role needs only EXECUTE on this function,
-- not SELECT on authz_outbox. EXECUTE is revoked from PUBLIC: grant it to the
-- roles that wait (docs/host-integration.md, "Grants").

CREATE OR REPLACE FUNCTION authz_outbox_wait_for_resource(
    p_resource_type text,
    p_resource_id   text,
    p_timeout       interval,
    -- Only the resource's rows up to this outbox id count (NULL: all rows).
    -- The Rust library's wait_until_delivered(outbox_id) uses it, so that a
    -- later change to the same resource does not lengthen its wait.
    p_through_id    bigint DEFAULT NULL
) RETURNS TABLE (outcome text, error text, consistency_token text, outbox_id bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    started  timestamptz := clock_timestamp();
    deadline timestamptz;
    pause    double precision;
    newest   record;
BEGIN
    IF p_resource_type IS NULL OR p_resource_id IS NULL THEN
        RAISE EXCEPTION 'authz_outbox_wait_for_resource: resource type and id are required'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF p_timeout IS NULL OR p_timeout < interval '0' OR p_timeout > interval '5 minutes' THEN
        RAISE EXCEPTION 'authz_outbox_wait_for_resource: timeout must be between 0 and 5 minutes, got %',
            coalesce(p_timeout::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'authz_outbox_wait_for_resource: called in a % transaction, which never sees the worker''s progress',
            upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Call it after COMMIT, in autocommit or a READ COMMITTED transaction.';
    END IF;
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'authz_outbox_wait_for_resource: called in a transaction that has written; its rows reach the worker only after COMMIT'
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Commit the write first, then wait (in autocommit or a new transaction).';
    END IF;
    deadline := started + p_timeout;

    LOOP
        -- One statement, one fresh snapshot: the newest row and whether
        -- anything of the resource is still pending, read together.
        SELECT o.id, o.state, o.last_error, o.consistency_token,
               EXISTS (
                   SELECT 1 FROM authz_outbox p
                   WHERE p.resource_type = p_resource_type
                     AND p.resource_id = p_resource_id
                     AND (p_through_id IS NULL OR p.id <= p_through_id)
                     AND p.state = 'pending'
               ) AS any_pending
        INTO newest
        FROM authz_outbox o
        WHERE o.resource_type = p_resource_type
          AND o.resource_id = p_resource_id
          AND (p_through_id IS NULL OR o.id <= p_through_id)
        ORDER BY o.id DESC
        LIMIT 1;

        IF NOT FOUND THEN
            RETURN QUERY SELECT 'none'::text, NULL::text, NULL::text, NULL::bigint;
            RETURN;
        END IF;
        IF newest.state = 'dead' THEN
            RETURN QUERY SELECT 'dead'::text, newest.last_error, NULL::text, newest.id;
            RETURN;
        END IF;
        IF NOT newest.any_pending THEN
            RETURN QUERY SELECT newest.state,
                                NULL::text,
                                CASE WHEN newest.state = 'delivered' THEN newest.consistency_token END,
                                newest.id;
            RETURN;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN QUERY SELECT 'timeout'::text,
                                format('%s:%s still has a pending outbox row after %s',
                                       p_resource_type, p_resource_id, p_timeout),
                                NULL::text, newest.id;
            RETURN;
        END IF;
        pause := least(greatest(extract(epoch FROM clock_timestamp() - started)::double precision / 10,
                                0.001),
                       0.05);
        PERFORM pg_sleep(least(pause, extract(epoch FROM deadline - clock_timestamp())::double precision));
    END LOOP;
END
$$;

COMMENT ON FUNCTION authz_outbox_wait_for_resource(text, text, interval, bigint) IS
    'Waits (READ COMMITTED, after commit) until the resource has nothing pending in authz_outbox; '
    'outcome delivered | superseded | dead (at once, with its error) | timeout | none. '
    'Timeout at most 5 minutes. See migrations/20261201000002_wait_for_resource.sql.';

REVOKE ALL ON FUNCTION authz_outbox_wait_for_resource(text, text, interval, bigint) FROM PUBLIC;
