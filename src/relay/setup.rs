//! Switching the capture between table and WAL mode (`migrate --capture`),
//! with the checks WAL mode needs said in one line each.
//!
//! To WAL: the slot exists before any capture emits a message (a message
//! emitted before its slot is never decoded), then the capture functions
//! are replaced. Back to table: the capture functions are replaced first,
//! then every transaction that may still have emitted with the old ones
//! finishes, the relay drains the slot up to that point, and only then is
//! the slot dropped. Either way nothing is lost.

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;

use super::{PUBLICATION, StopAt, step};
use crate::mapping::core::CaptureMode;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "WAL capture needs wal_level = logical (it is {0}): set wal_level = logical in postgresql.conf (or your service's parameter group) and restart PostgreSQL"
    )]
    WalLevel(String),
    #[error(
        "WAL capture needs the migrating role to read replication slots: ALTER ROLE {0} REPLICATION (or run migrate as a role that has it)"
    )]
    Replication(String),
    #[error(
        "WAL capture needs a free replication slot: max_replication_slots = {max}, {used} in use; raise max_replication_slots and restart PostgreSQL"
    )]
    NoFreeSlot { max: i64, used: i64 },
    #[error(
        "draining the WAL relay before leaving WAL mode timed out after {0:?}; run migrate --capture table again"
    )]
    DrainTimeout(Duration),
    #[error("the WAL relay: {0}")]
    Relay(#[from] super::RelayError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// This database's slot name: slots are per cluster, so the database's oid
/// tells two databases' relays apart.
async fn our_slot_name(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT 'authz_outbox_' || oid::text FROM pg_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await
}

/// Creates the logical slot (pgoutput). PostgreSQL waits for the
/// transactions running now to end before it returns.
/// On PostgreSQL 17 and later the slot is a failover slot: with
/// `sync_replication_slots` on a physical standby, it survives a failover
/// (docs/operations.md, WAL capture). Before 17 a failover loses it, which
/// the relay treats as any lost slot: recreated, a gap, a reconcile.
pub async fn create_slot(conn: &mut PgConnection, slot: &str) -> Result<(), sqlx::Error> {
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&mut *conn)
        .await?;
    let sql = if version >= 170_000 {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    };
    sqlx::query(sql).bind(slot).execute(&mut *conn).await?;
    Ok(())
}

/// The checks WAL mode needs, each failing with what to change; returns
/// advice worth printing (not an error).
pub async fn check_wal_ready(conn: &mut PgConnection) -> Result<Vec<String>, SetupError> {
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&mut *conn)
        .await?;
    if level != "logical" {
        return Err(SetupError::WalLevel(level));
    }
    let (role, allowed): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !allowed {
        return Err(SetupError::Replication(role));
    }
    let (max, used): (i64, i64) = sqlx::query_as(
        "SELECT current_setting('max_replication_slots')::bigint,
                (SELECT count(*) FROM pg_replication_slots)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let mine = our_slot_name(conn).await?;
    let have: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(&mine)
    .fetch_one(&mut *conn)
    .await?;
    if !have && used >= max {
        return Err(SetupError::NoFreeSlot { max, used });
    }
    let keep: String = sqlx::query_scalar("SHOW max_slot_wal_keep_size")
        .fetch_one(&mut *conn)
        .await?;
    let mut advice = Vec::new();
    if keep == "-1" {
        advice.push(
            "advice: max_slot_wal_keep_size is unlimited: a relay stopped for long keeps WAL \
             without bound; set a bound (e.g. 10GB) — a slot that exceeds it is invalidated, \
             which the relay recovers from with a reconcile"
                .to_string(),
        );
    }
    Ok(advice)
}

/// Prepares WAL mode: publication, slot and relay row, then the setting
/// the capture functions are generated from (the caller reinstalls them).
pub async fn enable_wal(conn: &mut PgConnection) -> Result<Vec<String>, SetupError> {
    let advice = check_wal_ready(conn).await?;
    // The slot's start is the flushed WAL; commits not yet flushed when it
    // is created are still decoded (they end after its consistent point).
    let slot = our_slot_name(conn).await?;
    let publication: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(PUBLICATION)
            .fetch_one(&mut *conn)
            .await?;
    if !publication {
        // Empty on purpose: pgoutput then sends our messages and nothing of
        // any table.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE PUBLICATION {PUBLICATION}"
        )))
        .execute(&mut *conn)
        .await?;
    }
    let have: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(&slot)
    .fetch_one(&mut *conn)
    .await?;
    if !have {
        create_slot(conn, &slot).await?;
    }
    sqlx::query(
        "INSERT INTO authz_outbox_relay (slot_name, applied_lsn)
         SELECT $1, confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1
         ON CONFLICT (slot_name) DO NOTHING",
    )
    .bind(&slot)
    .execute(&mut *conn)
    .await?;
    set_mode(conn, CaptureMode::Wal).await?;
    Ok(advice)
}

pub async fn set_mode(conn: &mut PgConnection, mode: CaptureMode) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO authz_outbox_settings (name, value) VALUES ('capture', $1)
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
    )
    .bind(mode.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Leaves WAL mode once the capture functions insert again: waits for the
/// transactions that may have emitted with the old ones, drains the slot
/// (a running relay, seeing table mode, stops streaming and drains it
/// through the SQL functions; with none, this takes the relay's turn), and
/// drops slot, relay row and publication.
/// `relay_conn` is a connection of its own (it holds the relay's lock).
pub async fn finish_leaving_wal(
    conn: &mut PgConnection,
    relay_conn: &mut PgConnection,
    timeout: Duration,
) -> Result<bool, SetupError> {
    let Some(slot) = super::slot_name(conn).await? else {
        return Ok(false);
    };
    let started = Instant::now();
    // Every transaction running now started before the switch committed.
    let horizon: String =
        sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
            .fetch_one(&mut *conn)
            .await?;
    loop {
        let done: bool =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::xid8")
                .bind(&horizon)
                .fetch_one(&mut *conn)
                .await?;
        if done {
            break;
        }
        if started.elapsed() > timeout {
            return Err(SetupError::DrainTimeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Drained up to here: by the running relay (it keeps its turn while it
    // reads), or, when none leads, by this one.
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut *conn)
        .await?;
    let mut leading = false;
    loop {
        let reached: bool = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .bind(&target)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(true);
        if reached {
            break;
        }
        if started.elapsed() > timeout {
            return Err(SetupError::DrainTimeout(timeout));
        }
        if !leading {
            leading = sqlx::query_scalar(super::LEADER_LOCK)
                .fetch_one(&mut *relay_conn)
                .await?;
        }
        if !leading {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match step(relay_conn, &slot, 10_000, StopAt::Never).await {
            // Waiting for the WAL writer to flush what is left.
            Ok(s) if s.relayed == 0 => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(_) => {}
            // A slot already gone has nothing left to drain.
            Err(super::RelayError::SlotLost { .. }) => break,
            // A walsender of a leader that is gone has not let go yet.
            Err(super::RelayError::SlotBusy(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    // The running relay may be in a peek for a moment, or still streaming
    // until it sees table mode (within a second) and lets go: the drop
    // waits for it.
    loop {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .execute(&mut *conn)
        .await;
        match dropped {
            Ok(_) => break,
            Err(e)
                if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55006")
                    && started.elapsed() <= timeout =>
            {
                tracing::debug!(error = %e, "the slot is in use; dropping it again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    sqlx::query("DELETE FROM authz_outbox_relay WHERE slot_name = $1")
        .bind(&slot)
        .execute(&mut *conn)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP PUBLICATION IF EXISTS {PUBLICATION}"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *relay_conn)
        .await?;
    Ok(true)
}
