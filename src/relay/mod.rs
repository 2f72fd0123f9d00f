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

pub mod peek;
pub mod pgoutput;
pub mod setup;
pub mod stream;
pub mod walsender;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgConnection;
use tokio_util::sync::CancellationToken;

use crate::delivery::listener::Wake;
use crate::mapping::core::{CaptureMode, NO_CREATOR_ERROR};
use crate::mapping::ddl::NO_CREATOR_NEEDED;
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

/// One captured row as the capture emitted it.
#[derive(Debug, Deserialize)]
struct Captured {
    resource_type: String,
    resource_id: String,
    parent_type: Option<String>,
    parent_id: Option<String>,
    operation: String,
    principal: Option<Value>,
    principal_source: Option<String>,
    attributes: Option<Value>,
    #[serde(default)]
    dead: bool,
}

impl Captured {
    /// A capture hands the `authz_outbox.principal` setting on as its
    /// unparsed text (a JSON string; `authz_outbox_current_principal` in
    /// WAL mode): parse and reduce it here, before any row holds it, and
    /// decide live or dead as the table-mode capture would.
    fn reduce_principal(&mut self) {
        if let Some(Value::String(raw)) = &self.principal {
            self.principal = crate::domain::principal_from_setting(raw);
            self.dead = !(names_a_creator(&self.principal)
                || self.principal_source.as_deref() == Some(NO_CREATOR_NEEDED));
        }
    }
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

fn names_a_creator(principal: &Option<Value>) -> bool {
    principal.as_ref().is_some_and(|p| {
        ["user_id", "service_account_id"].iter().any(|f| {
            p.get(*f)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
    })
}

/// The end of the last transaction in the outbox (`applied_lsn`).
async fn applied_lsn(conn: &mut PgConnection, slot: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query_scalar(
        "SELECT (applied_lsn - '0/0'::pg_lsn)::bigint FROM authz_outbox_relay WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await?
    .map_or(0, |v: i64| v.max(0) as u64))
}

/// Puts decoded transactions into the outbox, skipping those `applied`
/// already covers: returns the rows inserted, the transactions skipped, and
/// the end of the last transaction (where the slot may now move). `conn`
/// must hold the leader lock (the streaming and polling turns call this).
pub async fn apply(
    conn: &mut PgConnection,
    slot: &str,
    txs: &[pgoutput::Transaction],
    applied: u64,
) -> Result<(u64, u64, Option<u64>), RelayError> {
    let mut skipped = 0;
    let mut fresh = Vec::new();
    let mut last_end = None;
    for tx in txs {
        last_end = Some(tx.end_lsn);
        if tx.end_lsn <= applied {
            skipped += 1;
            continue;
        }
        for m in &tx.messages {
            let row: Captured =
                serde_json::from_slice(m).map_err(|e| RelayError::Message(format!("{e}")))?;
            fresh.push((row, tx.committed_at, tx.end_lsn));
        }
    }
    let mut relayed = 0;
    if let Some(end) = last_end.filter(|&e| e > applied) {
        let xids: Vec<i64> = txs
            .iter()
            .filter(|t| t.end_lsn > applied && !t.messages.is_empty())
            .map(|t| i64::from(t.xid))
            .collect();
        relayed = insert(conn, slot, fresh, &xids, end).await?;
    }
    Ok((relayed, skipped, last_end))
}

/// Whether every transaction in the parameter `$p` (32-bit xids, as
/// pgoutput sends them) is visible to the statement's snapshot. A 32-bit
/// xid above the snapshot's xmax (mod 2^32) is from the previous epoch.
macro_rules! all_visible {
    ($p:literal) => {
        concat!(
            "NOT EXISTS (
    SELECT 1
    FROM unnest(",
            $p,
            "::bigint[]) AS x(xid),
         (SELECT pg_current_snapshot() AS snap,
                 pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax) s
    WHERE NOT pg_visible_in_snapshot(
        (((s.xmax >> 32) - (x.xid > (s.xmax & 4294967295))::int) << 32 | x.xid)::text::xid8,
        s.snap))"
        )
    };
}

/// The pause between two looks at a commit not yet visible: short, since
/// the moment it stands for is short.
struct Pause(Duration);

impl Pause {
    fn new() -> Self {
        Pause(Duration::from_micros(200))
    }

    async fn sleep(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_millis(20));
    }
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// A batch's rows as one array per outbox column, for [`insert`].
#[derive(Default)]
struct Columns {
    resource_type: Vec<String>,
    resource_id: Vec<String>,
    parent_type: Vec<Option<String>>,
    parent_id: Vec<Option<String>>,
    operation: Vec<String>,
    principal: Vec<Option<Value>>,
    principal_source: Vec<Option<String>>,
    attributes: Vec<Option<Value>>,
    dead: Vec<bool>,
    created_at: Vec<DateTime<Utc>>,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        Columns {
            resource_type: Vec::with_capacity(n),
            resource_id: Vec::with_capacity(n),
            parent_type: Vec::with_capacity(n),
            parent_id: Vec::with_capacity(n),
            operation: Vec::with_capacity(n),
            principal: Vec::with_capacity(n),
            principal_source: Vec::with_capacity(n),
            attributes: Vec::with_capacity(n),
            dead: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, r: Captured, at: DateTime<Utc>) {
        self.resource_type.push(r.resource_type);
        self.resource_id.push(r.resource_id);
        self.parent_type.push(r.parent_type);
        self.parent_id.push(r.parent_id);
        self.operation.push(r.operation);
        self.principal.push(r.principal);
        self.principal_source.push(r.principal_source);
        self.attributes.push(r.attributes);
        self.dead.push(r.dead);
        self.created_at.push(at);
    }
}

/// Inserts the rows in commit order and records `end` as applied, in one
/// statement (one round trip, its own transaction), once the transactions
/// `xids` they came from are visible. A deregister the capture found no
/// creator for borrows its resource's last register's, from this batch or
/// the outbox (in WAL mode the register may have been in the slot when the
/// capture looked).
///
/// Why wait for visibility: a commit is decoded and sent once its record is
/// flushed, but other sessions see it only a moment later, when the
/// committing backend leaves the running set (with synchronous replication,
/// once a standby has confirmed it). A row inserted before that would be
/// claimed by a worker that cannot see the key it registers yet, and
/// superseded as a key that is gone. The statement checks its own snapshot
/// and inserts nothing until they are all in it; seen by one snapshot, a
/// commit is seen by every later one, and the worker's checks come later.
async fn insert(
    conn: &mut PgConnection,
    slot: &str,
    rows: Vec<(Captured, DateTime<Utc>, u64)>,
    xids: &[i64],
    end: u64,
) -> Result<u64, RelayError> {
    let mut latest: std::collections::HashMap<(String, String), (Option<Value>, Option<String>)> =
        std::collections::HashMap::new();
    let n = rows.len();
    let mut c = Columns::with_capacity(n);
    for (mut r, at, _) in rows {
        r.reduce_principal();
        if r.operation == "register" && names_a_creator(&r.principal) {
            latest.insert(
                (r.resource_type.clone(), r.resource_id.clone()),
                (r.principal.clone(), r.principal_source.clone()),
            );
        }
        if r.dead
            && r.operation == "deregister"
            && let Some((p, s)) = latest.get(&(r.resource_type.clone(), r.resource_id.clone()))
        {
            r.principal = p.clone();
            r.principal_source = s.clone();
            r.dead = false;
        }
        c.push(r, at);
    }
    let end = lsn_text(end);
    let mut pause = Pause::new();
    loop {
        // `synchronous_commit = on`: the rows are durable before the slot
        // may move past them. PostgreSQL writes a slot's new position to
        // disk (when its restart_lsn moves) without flushing the WAL first,
        // so an unflushed outbox commit could be lost in a crash that keeps
        // the slot's position past its captures. The relay's connection
        // sets it for its session (`relay_session`).
        let (inserted, _woken): (Option<i64>, i64) = sqlx::query_as(INSERT_SQL)
            .bind(slot)
            .bind(&c.resource_type)
            .bind(&c.resource_id)
            .bind(&c.parent_type)
            .bind(&c.parent_id)
            .bind(&c.operation)
            .bind(&c.principal)
            .bind(&c.principal_source)
            .bind(&c.attributes)
            .bind(&c.dead)
            .bind(&c.created_at)
            .bind(NO_CREATOR_ERROR)
            .bind(xids)
            .bind(&end)
            .fetch_one(&mut *conn)
            .await?;
        match inserted {
            Some(n) => return Ok(n.max(0) as u64),
            None => pause.sleep().await,
        }
    }
}

/// The relay's one statement per batch (see [`insert`]): NULL, and nothing
/// written, while a source transaction is not visible yet; else the rows
/// inserted. One typed array per column (not a JSON document per row):
/// PostgreSQL reads them without parsing JSON, which was a large part of
/// the relay's insert. Data-modifying `WITH` parts run once each, whether
/// or not the outer query reads them.
const INSERT_SQL: &str = concat!(
    "WITH visible AS (SELECT ",
    all_visible!("$13"),
    r#" AS yes),
    ins AS (
        INSERT INTO authz_outbox (resource_type, resource_id, parent_type, parent_id, operation,
                                  principal, principal_source, attributes, created_at,
                                  state, finished_at, last_error)
        SELECT r.resource_type, r.resource_id, r.parent_type, r.parent_id, r.operation,
               coalesce(b.principal, r.principal), coalesce(b.principal_source, r.principal_source),
               r.attributes, r.created_at,
               CASE WHEN r.dead AND b.principal IS NULL THEN 'dead' ELSE 'pending' END,
               CASE WHEN r.dead AND b.principal IS NULL THEN now() END,
               CASE WHEN r.dead AND b.principal IS NULL THEN $12 END
        FROM visible v,
             unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::jsonb[], $8::text[], $9::jsonb[], $10::bool[], $11::timestamptz[])
             WITH ORDINALITY
             AS r(resource_type, resource_id, parent_type, parent_id, operation,
                  principal, principal_source, attributes, dead, created_at, n)
        LEFT JOIN LATERAL (
            SELECT o.principal, o.principal_source FROM authz_outbox o
            WHERE r.dead AND r.operation = 'deregister'
              AND o.resource_type = r.resource_type AND o.resource_id = r.resource_id
              AND o.operation = 'register'
              AND (coalesce(o.principal->>'user_id', '') <> ''
                   OR coalesce(o.principal->>'service_account_id', '') <> '')
            ORDER BY o.id DESC LIMIT 1
        ) b ON true
        WHERE v.yes
        ORDER BY r.n
        RETURNING 1
    ),
    counted AS (SELECT count(*) AS n FROM ins),
    bookkept AS (
        UPDATE authz_outbox_relay
        SET applied_lsn = $14::pg_lsn, applied_at = now(), relayed = relayed + counted.n
        FROM visible v, counted
        WHERE slot_name = $1 AND v.yes
    ),
    woken AS (SELECT pg_notify('authz_outbox', '') FROM visible v, counted
              WHERE v.yes AND counted.n > 0)
    SELECT CASE WHEN v.yes THEN counted.n END, (SELECT count(*) FROM woken)
    FROM visible v, counted
    "#
);

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
/// outbox row holding it is durable (see [`insert`]).
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
