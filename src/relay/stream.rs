//! The leader's turn on the streaming replication protocol: the walsender
//! keeps one decoding context open and pushes each transaction once it
//! commits and its WAL is flushed; the relay inserts whole transactions and
//! records `applied_lsn` in one outbox transaction, and only then tells the
//! walsender the new flush position.
//!
//! Batching: a batch starts with the first committed transaction and takes
//! every transaction already waiting behind it, up to `max_rows` rows or
//! [`MAX_BATCH_WAIT`] after its first. A lone capture is inserted at once;
//! under load, the transactions that arrived while the last batch was being
//! inserted go in together (one insert, one commit for many).

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;

use super::pgoutput::{Decoder, Transaction};
use super::walsender::{Frame, Walsender};
use super::{RelayError, StopAt, applied_lsn, apply};
use crate::mapping::core::MESSAGE_PREFIX;

/// How long a batch's first transaction may wait for others to join it.
pub const MAX_BATCH_WAIT: Duration = Duration::from_millis(5);

/// Whole transactions read from the stream, not yet in the outbox.
#[derive(Debug, Default)]
pub struct Batch {
    pub transactions: Vec<Transaction>,
    /// Whether the walsender had nothing more to send when the batch ended.
    pub caught_up: bool,
}

/// What one applied batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Rows inserted into the outbox.
    pub relayed: u64,
    /// Transactions `applied_lsn` already covered (sent again after a relay
    /// died between its insert and its status update).
    pub skipped: u64,
}

/// The slot, streaming: read batches, apply them, confirm.
pub struct Streamer {
    walsender: Walsender,
    decoder: Decoder,
    slot: String,
    /// The end of the last transaction in the outbox.
    applied: u64,
    /// The furthest keepalive position, confirmed once nothing is pending.
    keepalive: u64,
    /// A batch was read and not applied yet: nothing may be confirmed.
    unapplied: bool,
}

impl Streamer {
    /// Starts streaming `slot`; `conn` is the relay's (it holds the leader
    /// lock) and gives where the outbox is (`applied_lsn`).
    pub async fn open(
        conn: &mut PgConnection,
        database_url: &str,
        slot: &str,
    ) -> Result<Self, RelayError> {
        let applied = applied_lsn(conn, slot).await?;
        let walsender = Walsender::start(database_url, slot).await?;
        Ok(Streamer {
            walsender,
            decoder: Decoder::new(MESSAGE_PREFIX),
            slot: slot.to_string(),
            applied,
            keepalive: 0,
            unapplied: false,
        })
    }

    /// Reads the next batch: waits up to `idle` for a first committed
    /// transaction, then takes those already behind it (see the module
    /// docs). Empty when nothing committed within `idle`.
    ///
    /// Dropping this future loses what it read from the stream: the
    /// streamer must then be dropped too (the next one starts again from
    /// the slot's confirmed position).
    pub async fn read_batch(
        &mut self,
        idle: Duration,
        max_rows: usize,
    ) -> Result<Batch, RelayError> {
        let mut batch = Batch::default();
        let mut rows = 0;
        let mut first: Option<Instant> = None;
        let started = Instant::now();
        loop {
            let wait = match first {
                None => idle.saturating_sub(started.elapsed()),
                // A transaction in the middle of arriving may finish it;
                // otherwise only what is already here joins.
                Some(at) if self.decoder.in_transaction() => {
                    MAX_BATCH_WAIT.saturating_sub(at.elapsed())
                }
                Some(_) => Duration::ZERO,
            };
            let Some(frame) = self.walsender.next(wait).await? else {
                batch.caught_up = !self.decoder.in_transaction();
                break;
            };
            match frame {
                Frame::Keepalive { wal_end } => self.keepalive = self.keepalive.max(wal_end),
                Frame::Data(data) => {
                    if let Some(tx) = self.decoder.feed(&data)? {
                        first.get_or_insert_with(Instant::now);
                        rows += tx.messages.len();
                        batch.transactions.push(tx);
                    }
                }
            }
            if let Some(at) = first
                && (rows >= max_rows || at.elapsed() >= MAX_BATCH_WAIT)
            {
                break;
            }
        }
        self.unapplied = !batch.transactions.is_empty();
        Ok(batch)
    }

    /// Inserts the batch's new rows and records its end as applied, in one
    /// transaction; then (unless `stop` says to die first) tells the
    /// walsender. Never confirms past what that transaction committed.
    pub async fn apply(
        &mut self,
        conn: &mut PgConnection,
        batch: Batch,
        stop: StopAt,
    ) -> Result<Applied, RelayError> {
        let (relayed, skipped, end) =
            apply(conn, &self.slot, &batch.transactions, self.applied).await?;
        if let Some(end) = end {
            self.applied = self.applied.max(end);
        }
        if stop == StopAt::BeforeAdvance {
            return Ok(Applied { relayed, skipped });
        }
        self.unapplied = false;
        if end.is_some() {
            self.walsender.confirm(self.applied).await?;
        }
        Ok(Applied { relayed, skipped })
    }

    /// With nothing read and not applied and no transaction half-read,
    /// confirms up to the walsender's last keepalive: every transaction
    /// committed before it was sent ahead of it, and is in the outbox. This
    /// is how the slot moves past WAL with no capture in it (other tables'
    /// writes), so it does not hold that WAL. Also answers a keepalive that
    /// asked for a reply, and keeps the walsender from timing out.
    pub async fn confirm_idle(&mut self) -> Result<(), RelayError> {
        if self.unapplied {
            return Ok(());
        }
        let mut to = self.applied;
        if !self.decoder.in_transaction() {
            to = to.max(self.keepalive);
        }
        self.walsender.confirm(to).await
    }

    /// Whether a keepalive asked for a status update not sent yet.
    pub fn reply_owed(&self) -> bool {
        self.walsender.reply_owed()
    }
}
