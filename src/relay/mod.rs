//! The WAL relay: with `migrate --capture wal`, captures emit each outbox
//! row as a transactional logical message (one WAL record, no heap row, no
//! index entry in the writing transaction), and the relay moves them from
//! a logical replication slot into `authz_outbox`, in commit order.
//!
//! Follow one message. The relay streams the slot over the replication
//! protocol ([`stream`], [`walsender`]; pgoutput with an empty publication:
//! only our messages and transaction boundaries come out). The walsender
//! decodes each transaction once, when it commits and its WAL is flushed,
//! and pushes it. The relay inserts the messages of whole transactions into
//! the outbox and records the end of the last one
//! (`authz_outbox_relay.applied_lsn`) in the same transaction, and only then
//! tells the walsender that position (a standby status update: the slot's
//! `confirmed_flush_lsn` follows). Killed anywhere, the next relay streams
//! again from the slot's confirmed position and skips what `applied_lsn`
//! says is in: nothing lost, nothing twice. From the outbox on, a row is
//! delivered, superseded, ordered and replayed exactly as in table mode.
//!
//! Why the replication protocol and not the SQL functions: every
//! `pg_logical_slot_peek_binary_changes` decodes again from the slot's
//! `restart_lsn` (which PostgreSQL moves only every ~15 s), so a polling
//! relay re-read seconds of WAL per poll (BENCHMARKS.md, "WAL mode beside
//! table mode"); a walsender keeps its decoding state and pushes changes
//! as they commit. The SQL functions stay for what has no stream to read
//! ([`peek`]): a one-shot run's drain, `migrate` draining the slot before
//! it drops it, the leader's turn while a switch back to table mode is in
//! progress (it must let go of the slot for `migrate` to drop it), and
//! where no replication connection can be had (a Unix-socket `DATABASE_URL`,
//! which the client cannot dial; a pooler that does not pass replication
//! connections): then the relay polls, and tries streaming again every
//! minute.
//!
//! One relay reads at a time across replicas: it holds a session advisory
//! lock on its own connection, and every write of the outbox and the slot's
//! position goes through that connection, so a relay that lost its
//! connection lost its turn with it. The slot itself is a second guard: a
//! walsender streams it for one client at a time, and a relay that finds it
//! busy (a dead leader's walsender not yet gone) waits its turn.
//!
//! A slot found dropped or invalidated is a gap: the messages emitted while
//! it was gone are lost. The relay recreates it, counts the gap, and marks
//! `reconcile_pending`; a reconcile of every type (run by the worker when it
//! can read SpiceDB, else by the operator, as `status` says) heals it.

mod apply;
pub mod peek;
pub mod pgoutput;
pub mod setup;
pub mod stream;
pub mod walsender;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgConnection;
use tokio_util::sync::CancellationToken;

use crate::delivery::listener::Wake;
use crate::mapping::core::CaptureMode;
pub use apply::apply;
use apply::{applied_lsn, lsn_text};
pub use peek::{Step, step};

/// The (empty) publication pgoutput needs to be named.
pub const PUBLICATION: &str = "authz_outbox_relay";

/// The advisory lock only the relay reading the slot holds.
const LEADER_LOCK: &str = "SELECT pg_try_advisory_lock(hashtext('authz_outbox_relay'))";

/// How often a leader looks up from reading: the lag metrics, a pending
/// gap's reconcile, whether the slot or the capture mode changed, and a
/// status update that keeps the walsender from timing the relay out.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Connect(#[from] crate::db::DbError),
    #[error("the slot's output: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("a captured message is not an outbox row: {0}")]
    Message(String),
    #[error("the replication slot {slot} is gone ({reason})")]
    SlotLost { slot: String, reason: String },
    /// Another client reads the slot now: not a gap, another's turn.
    #[error("the replication slot is in use: {0}")]
    SlotBusy(String),
    #[error("the replication stream: {0}")]
    Stream(String),
    /// No replication connection can be had (the client cannot dial this
    /// `DATABASE_URL`, or the server or a pooler refused it): the SQL
    /// functions read the slot instead.
    #[error("the replication stream is not available: {0}")]
    StreamUnavailable(String),
}

/// How the relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub database_url: String,
    /// Only where the relay reads through the SQL functions (see [`peek`]):
    /// the pause between two peeks that found nothing. A streaming relay is
    /// pushed each commit and does not poll.
    pub poll: Duration,
    /// Rows per outbox transaction (whole transactions: a large one may
    /// exceed it); for the SQL functions, changes per peek.
    pub batch: i64,
}

/// Where a relay may stop early, for the tests that kill one mid-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAt {
    Never,
    /// After the rows are committed, before the slot's position moves
    /// (the slot advanced, or the walsender told).
    BeforeAdvance,
}

/// The slot the relay reads, if WAL capture is installed (or being left).
pub async fn slot_name(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('authz_outbox_relay') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT slot_name FROM authz_outbox_relay ORDER BY slot_name LIMIT 1")
        .fetch_optional(&mut *conn)
        .await
}

/// Recreates a lost slot and records the gap (see the module docs).
pub async fn recover_lost_slot(
    conn: &mut PgConnection,
    slot: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    tracing::error!(
        slot,
        reason,
        "the relay's replication slot is gone: captures made while it was gone are lost; \
         recreating it and marking a reconcile of every type as needed"
    );
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .execute(&mut *conn)
    .await?;
    setup::create_slot(conn, slot).await?;
    sqlx::query(
        "UPDATE authz_outbox_relay
         SET gaps = gaps + 1, last_gap_at = now(), last_gap_reason = $2,
             reconcile_pending = true,
             applied_lsn = (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1)
         WHERE slot_name = $1",
    )
    .bind(slot)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    crate::metrics::relay_gap();
    Ok(())
}

/// The relay's loop, beside the worker's: idle while there is no slot, the
/// leader's turns otherwise.
pub async fn run(config: RelayConfig, pool: PgPool, beside: Beside, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match lead(&config, &pool, &beside, &cancel).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, "the WAL relay stopped; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
    }
}

/// What runs beside the relay in its process.
#[derive(Default, Clone)]
pub struct Beside {
    /// Runs after a lost slot was recreated (the worker's reconcile, when
    /// it can read SpiceDB).
    pub on_gap: Option<GapHandler>,
    /// The worker's claimer, woken directly once new rows are committed
    /// (its `NOTIFY` takes a round trip through the listening connection).
    pub wake: Option<Arc<dyn Wake>>,
}

impl Beside {
    fn relayed(&self, rows: u64) {
        if rows > 0
            && let Some(wake) = &self.wake
        {
            wake.wake();
        }
    }
}

/// Runs after a gap was recorded; errors are logged and retried later.
pub type GapHandler = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>
        + Send
        + Sync,
>;

/// One connection's leadership: wait for the lock, then read the slot
/// (streaming in WAL mode, through the SQL functions while leaving it)
/// until cancelled or an error.
async fn lead(
    config: &RelayConfig,
    pool: &PgPool,
    beside: &Beside,
    cancel: &CancellationToken,
) -> Result<(), RelayError> {
    let mut conn = relay_connection(&config.database_url).await?;
    let idle = Duration::from_secs(2);
    // Set while the replication connection cannot be had: the SQL
    // functions read the slot until then, when streaming is tried again.
    let mut stream_again_at: Option<Instant> = None;
    let mut warned = false;
    // Another replica leads, or there is no slot: look again later.
    loop {
        let Some(slot) = slot_name(&mut conn).await? else {
            metrics::gauge!(crate::metrics::RELAY_LEADER).set(0.0);
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(idle) => continue,
            }
        };
        let lead: bool = sqlx::query_scalar(LEADER_LOCK).fetch_one(&mut conn).await?;
        if !lead {
            metrics::gauge!(crate::metrics::RELAY_LEADER).set(0.0);
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(idle) => continue,
            }
        }
        tracing::info!(slot, "leading the WAL relay");
        loop {
            metrics::gauge!(crate::metrics::RELAY_LEADER).set(1.0);
            let mode = crate::mapping::install::capture_mode(&mut conn).await?;
            let streaming = stream_again_at.is_none_or(|at| Instant::now() >= at);
            let turn = if mode == CaptureMode::Wal && streaming {
                stream_turn(&mut conn, pool, &slot, config, beside, cancel).await
            } else {
                let until = stream_again_at.filter(|_| mode == CaptureMode::Wal);
                poll_turn(&mut conn, pool, &slot, config, beside, cancel, mode, until).await
            };
            match turn {
                Ok(TurnEnd::Cancelled) => return Ok(()),
                Ok(TurnEnd::ModeChanged) => {}
                Ok(TurnEnd::SlotChanged) => break,
                // Back in table mode, `migrate` dropped the slot it drained:
                // not a gap.
                Err(RelayError::SlotLost { .. })
                    if crate::mapping::install::capture_mode(&mut conn).await?
                        == CaptureMode::Table =>
                {
                    break;
                }
                Err(RelayError::SlotLost { slot, reason }) => {
                    recover_lost_slot(&mut conn, &slot, &reason).await?;
                }
                Err(RelayError::SlotBusy(why)) => {
                    metrics::gauge!(crate::metrics::RELAY_LEADER).set(0.0);
                    tracing::info!(slot, %why, "another client reads the slot; waiting for it to let go");
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(RelayError::StreamUnavailable(why)) => {
                    if !warned {
                        tracing::warn!(%why, "the relay cannot stream the slot; reading it \
                                              through PostgreSQL's SQL functions instead \
                                              (slower), and trying again every minute");
                        warned = true;
                    }
                    stream_again_at = Some(Instant::now() + Duration::from_secs(60));
                }
                Err(e) => return Err(e),
            }
        }
        // The slot was taken away (a switch back to table mode): go back to
        // looking for one.
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut conn)
            .await?;
    }
}

/// The relay's own connection. Its commits wait for the WAL flush whatever
/// the database's default: the slot may move past a capture only once the
/// outbox row holding it is durable (see [`apply`]).
async fn relay_connection(database_url: &str) -> Result<PgConnection, RelayError> {
    let mut conn = crate::db::connect_one(database_url).await?;
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// How a leader's turn ended, short of an error.
enum TurnEnd {
    Cancelled,
    /// WAL capture was left: the slot is no longer ours to read.
    SlotChanged,
    /// The capture mode changed, or it is time to try streaming again:
    /// choose how to read anew.
    ModeChanged,
}

/// WAL mode: stream the slot, one batch after another.
async fn stream_turn(
    conn: &mut PgConnection,
    pool: &PgPool,
    slot: &str,
    config: &RelayConfig,
    beside: &Beside,
    cancel: &CancellationToken,
) -> Result<TurnEnd, RelayError> {
    let mut streamer = match stream::Streamer::open(conn, &config.database_url, slot).await {
        Ok(streamer) => streamer,
        // The relay's own connection works, the replication connection
        // does not (a pooler that does not pass replication connections,
        // `REPLICATION` missing from the role): the SQL functions can
        // still read the slot.
        Err(RelayError::Stream(why)) => return Err(RelayError::StreamUnavailable(why)),
        Err(e) => return Err(e),
    };
    let max_rows = config.batch.max(1) as usize;
    let mut caught_up_at = Instant::now();
    let mut looked = Instant::now();
    loop {
        // Dropping a read on cancel loses what it read: the streamer goes
        // with it, and the next relay starts from the confirmed position.
        let batch = tokio::select! {
            () = cancel.cancelled() => return Ok(TurnEnd::Cancelled),
            batch = streamer.read_batch(HOUSEKEEPING, max_rows) => batch?,
        };
        if batch.caught_up {
            caught_up_at = Instant::now();
        }
        let idle = batch.transactions.is_empty();
        let done = streamer.apply(conn, batch, StopAt::Never).await?;
        beside.relayed(done.relayed);
        metrics::counter!(crate::metrics::RELAYED).increment(done.relayed);
        let look = looked.elapsed() >= HOUSEKEEPING;
        if idle || look || streamer.reply_owed() {
            streamer.confirm_idle().await?;
        }
        if look {
            looked = Instant::now();
            if let Some(end) =
                housekeeping(conn, pool, slot, beside, caught_up_at, CaptureMode::Wal).await?
            {
                return Ok(end);
            }
        }
    }
}

/// Through the SQL functions ([`peek`]): while leaving WAL mode (the slot
/// must be free for `migrate` to drop it), or, `until` it is time to try
/// again, where no replication connection can be had.
#[allow(clippy::too_many_arguments)]
async fn poll_turn(
    conn: &mut PgConnection,
    pool: &PgPool,
    slot: &str,
    config: &RelayConfig,
    beside: &Beside,
    cancel: &CancellationToken,
    mode: CaptureMode,
    until: Option<Instant>,
) -> Result<TurnEnd, RelayError> {
    let mut caught_up_at = Instant::now();
    let mut looked = Instant::now() - HOUSEKEEPING;
    loop {
        if cancel.is_cancelled() {
            return Ok(TurnEnd::Cancelled);
        }
        let s = step(conn, slot, config.batch, StopAt::Never).await?;
        beside.relayed(s.relayed);
        metrics::counter!(crate::metrics::RELAYED).increment(s.relayed);
        if s.caught_up {
            caught_up_at = Instant::now();
        }
        if looked.elapsed() >= HOUSEKEEPING {
            looked = Instant::now();
            if let Some(end) = housekeeping(conn, pool, slot, beside, caught_up_at, mode).await? {
                return Ok(end);
            }
            // Time to try the replication connection again.
            if until.is_some_and(|at| Instant::now() >= at) {
                return Ok(TurnEnd::ModeChanged);
            }
        }
        if s.caught_up && s.relayed == 0 {
            tokio::select! {
                () = cancel.cancelled() => return Ok(TurnEnd::Cancelled),
                () = tokio::time::sleep(config.poll) => {}
            }
        }
    }
}

/// What a leader does between reads, about once a second: the lag
/// metrics, a pending gap's reconcile, and whether its turn is over.
async fn housekeeping(
    conn: &mut PgConnection,
    pool: &PgPool,
    slot: &str,
    beside: &Beside,
    caught_up_at: Instant,
    mode: CaptureMode,
) -> Result<Option<TurnEnd>, RelayError> {
    report_lag(conn, slot, caught_up_at.elapsed()).await?;
    if let Some(handler) = &beside.on_gap {
        heal_if_pending(conn, pool, slot, handler).await;
    }
    if slot_name(conn).await?.as_deref() != Some(slot) {
        return Ok(Some(TurnEnd::SlotChanged));
    }
    if crate::mapping::install::capture_mode(conn).await? != mode {
        return Ok(Some(TurnEnd::ModeChanged));
    }
    Ok(None)
}

async fn report_lag(
    conn: &mut PgConnection,
    slot: &str,
    since_caught_up: Duration,
) -> Result<(), sqlx::Error> {
    let bytes: Option<i64> = sqlx::query_scalar(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await?
    .flatten();
    metrics::gauge!(crate::metrics::RELAY_LAG_BYTES).set(bytes.unwrap_or(0) as f64);
    metrics::gauge!(crate::metrics::RELAY_LAG_SECONDS).set(since_caught_up.as_secs_f64());
    Ok(())
}

/// Runs the gap handler while a gap awaits its reconcile, then clears it.
async fn heal_if_pending(conn: &mut PgConnection, pool: &PgPool, slot: &str, handler: &GapHandler) {
    let pending: Result<Option<bool>, _> =
        sqlx::query_scalar("SELECT reconcile_pending FROM authz_outbox_relay WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(&mut *conn)
            .await;
    if !matches!(pending, Ok(Some(true))) {
        return;
    }
    // Rows captured before the gap are delivered first: a register still
    // pending now would be judged "in flight" and left alone, and when it
    // lands after the reconcile, the delete the gap lost would leave it an
    // orphan no one comes back for.
    let before_gap: Result<bool, _> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM authz_outbox o, authz_outbox_relay r
                        WHERE r.slot_name = $1 AND o.state = 'pending'
                          AND o.created_at <= r.last_gap_at)",
    )
    .bind(slot)
    .fetch_one(&mut *conn)
    .await;
    if !matches!(before_gap, Ok(false)) {
        return;
    }
    match handler().await {
        Ok(()) => {
            let cleared = sqlx::query(
                "UPDATE authz_outbox_relay SET reconcile_pending = false WHERE slot_name = $1",
            )
            .bind(slot)
            .execute(pool)
            .await;
            if let Err(e) = cleared {
                tracing::warn!(error = %e, "could not clear the relay's pending reconcile");
            } else {
                tracing::info!(slot, "the reconcile after the relay's gap is done");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the reconcile after the relay's gap failed; retrying")
        }
    }
}

/// Relays everything the slot holds now, if WAL capture is installed and
/// no other relay leads (then that one does it): what a one-shot worker
/// runs first.
pub async fn drain_once(config: &RelayConfig) -> Result<(), RelayError> {
    let mut conn = relay_connection(&config.database_url).await?;
    let Some(slot) = slot_name(&mut conn).await? else {
        return Ok(());
    };
    let lead: bool = sqlx::query_scalar(LEADER_LOCK).fetch_one(&mut conn).await?;
    if !lead {
        return Ok(());
    }
    loop {
        match step(&mut conn, &slot, config.batch, StopAt::Never).await {
            Ok(s) if s.caught_up => return Ok(()),
            Ok(_) => {}
            // A walsender still streams it (a leader that lost its lock
            // and whose connection is not gone yet): that one's turn.
            Err(RelayError::SlotBusy(_)) => return Ok(()),
            Err(RelayError::SlotLost { slot, reason }) => {
                recover_lost_slot(&mut conn, &slot, &reason).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// How captures reach the outbox, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureStatus {
    pub mode: &'static str,
    pub slot: Option<String>,
    pub lag_bytes: Option<i64>,
    pub relayed: Option<i64>,
    pub gaps: Option<i64>,
    pub last_gap_at: Option<DateTime<Utc>>,
    pub last_gap_reason: Option<String>,
    pub reconcile_pending: bool,
}

pub async fn capture_status(pool: &PgPool) -> Result<CaptureStatus, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mode = crate::mapping::install::capture_mode(&mut conn).await?;
    let mut out = CaptureStatus {
        mode: mode.as_str(),
        slot: None,
        lag_bytes: None,
        relayed: None,
        gaps: None,
        last_gap_at: None,
        last_gap_reason: None,
        reconcile_pending: false,
    };
    if slot_name(&mut conn).await?.is_none() {
        return Ok(out);
    }
    type Row = (
        String,
        Option<i64>,
        i64,
        i64,
        Option<DateTime<Utc>>,
        Option<String>,
        bool,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT r.slot_name,
                pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                r.relayed, r.gaps, r.last_gap_at, r.last_gap_reason, r.reconcile_pending
         FROM authz_outbox_relay r
         LEFT JOIN pg_replication_slots s ON s.slot_name = r.slot_name
         ORDER BY r.slot_name LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((slot, lag, relayed, gaps, at, reason, pending)) = row {
        out.slot = Some(slot);
        out.lag_bytes = lag;
        out.relayed = Some(relayed);
        out.gaps = Some(gaps);
        out.last_gap_at = at;
        out.last_gap_reason = reason;
        out.reconcile_pending = pending;
    }
    Ok(out)
}

/// A reconcile of every type was applied: a recorded gap is healed.
pub async fn reconciled(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    if slot_name(&mut conn).await?.is_some() {
        sqlx::query(
            "UPDATE authz_outbox_relay SET reconcile_pending = false WHERE reconcile_pending",
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
