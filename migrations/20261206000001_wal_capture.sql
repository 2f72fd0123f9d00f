-- squawk-ignore-file require-lock-timeout, require-statement-timeout
-- (Accepted: `authz-outbox migrate` sets lock_timeout and statement_timeout on
-- its connection, --lock-timeout / --statement-timeout, and retries on a lock
-- timeout; `migrate --print-sql` prints both settings first.)

-- WAL capture (`migrate --capture wal`): the generated captures emit each
-- outbox row as a transactional logical message instead of inserting it,
-- and a relay in the worker moves the messages from a logical replication
-- slot into `authz_outbox` (src/relay). These tables hold what survives the
-- relay's restarts.

-- How the capture is installed: `capture` is `table` (the default) or
-- `wal`. `migrate` generates the capture functions from it.
CREATE TABLE IF NOT EXISTS authz_outbox_settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- One row per slot the relay reads. `applied_lsn` is the end of the last
-- transaction whose messages are in `authz_outbox`, written in the same
-- transaction as those rows: a relay killed after that commit and before
-- it advanced the slot reads the transaction again and skips it, so
-- nothing is lost and nothing is relayed twice. A slot found dropped or
-- invalidated is a gap: counted, with when and why, and
-- `reconcile_pending` until a reconcile of every type has run.
CREATE TABLE IF NOT EXISTS authz_outbox_relay (
    slot_name         text PRIMARY KEY,
    applied_lsn       pg_lsn      NOT NULL DEFAULT '0/0',
    applied_at        timestamptz,
    relayed           bigint      NOT NULL DEFAULT 0,
    gaps              bigint      NOT NULL DEFAULT 0,
    last_gap_at       timestamptz,
    last_gap_reason   text,
    reconcile_pending boolean     NOT NULL DEFAULT false
);
