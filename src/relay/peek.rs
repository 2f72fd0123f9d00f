//! Reading the slot through PostgreSQL's SQL functions: peek
//! (`pg_logical_slot_peek_binary_changes`), insert, record, advance
//! (`pg_replication_slot_advance`). Every peek decodes again from the
//! slot's `restart_lsn`, so this is the slow path (BENCHMARKS.md, "WAL mode
//! beside table mode"); it stays for what has no stream to read: a one-shot
//! run's drain ([`super::drain_once`]), `migrate --capture table` draining
//! the slot before dropping it, the relay's turn while a switch back to
//! table mode is in progress, and where no replication connection can be
//! had (a Unix-socket `DATABASE_URL`, a pooler that refuses one).

use sqlx::postgres::PgConnection;

use super::{PUBLICATION, RelayError, StopAt, applied_lsn, apply, lsn_text, pgoutput};
use crate::mapping::core::MESSAGE_PREFIX;

/// What one step did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// Rows inserted into the outbox.
    pub relayed: u64,
    /// Transactions skipped because `applied_lsn` already covered them (a
    /// relay that died between its insert and advancing the slot).
    pub skipped: u64,
    /// Whether the peek reached the WAL's end as it was at the start.
    pub caught_up: bool,
}

/// One step: peek, insert what is new, record, advance. `conn` must hold
/// the leader lock.
pub async fn step(
    conn: &mut PgConnection,
    slot: &str,
    batch: i64,
    stop: StopAt,
) -> Result<Step, RelayError> {
    // Decoding reads only flushed WAL: the flush position, not the insert
    // position, is how far a peek that comes back short has read (with
    // synchronous_commit = off a commit returns before its flush, and
    // moving the slot past unflushed commits would skip them).
    let upto: String = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn()::text")
        .fetch_one(&mut *conn)
        .await?;
    let rows: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::pg_lsn, $3::int,
             'proto_version', '1', 'publication_names', $4, 'messages', 'true')",
    )
    .bind(slot)
    .bind(&upto)
    .bind(batch.clamp(1, i64::from(i32::MAX)) as i32)
    .bind(PUBLICATION)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| slot_error(slot, e))?;
    let caught_up = (rows.len() as i64) < batch;
    let txs = pgoutput::decode(rows.iter().map(Vec::as_slice), MESSAGE_PREFIX)?;
    let applied = applied_lsn(conn, slot).await?;
    let (relayed, skipped, last_end) = apply(conn, slot, &txs, applied).await?;
    let out = Step {
        relayed,
        skipped,
        caught_up,
    };
    if stop == StopAt::BeforeAdvance {
        return Ok(out);
    }
    // Past everything read: to the WAL's end as it was, when the peek got
    // there; else to the last whole transaction.
    let advance_to = if caught_up {
        Some(upto)
    } else {
        last_end.map(lsn_text)
    };
    if let Some(to) = advance_to {
        sqlx::query(
            "SELECT pg_replication_slot_advance($1, $2::pg_lsn)
             FROM pg_replication_slots
             WHERE slot_name = $1 AND confirmed_flush_lsn < $2::pg_lsn",
        )
        .bind(slot)
        .bind(&to)
        .execute(&mut *conn)
        .await
        .map_err(|e| slot_error(slot, e))?;
    }
    Ok(out)
}

/// A peek or advance that failed because the slot is gone or invalidated,
/// or because a walsender is reading it.
fn slot_error(slot: &str, e: sqlx::Error) -> RelayError {
    let Some(db) = e.as_database_error() else {
        return RelayError::Database(e);
    };
    let message = db.message().to_string();
    match db.code().as_deref() {
        // undefined_object: dropped; object_not_in_prerequisite_state:
        // invalidated (its WAL removed past max_slot_wal_keep_size).
        Some("42704") | Some("55000") => RelayError::SlotLost {
            slot: slot.to_string(),
            reason: message,
        },
        // object_in_use: "replication slot … is active for PID …".
        Some("55006") => RelayError::SlotBusy(message),
        _ => RelayError::Database(e),
    }
}
