//! The outbox store: every SQL statement that touches `authz_outbox` lives
//! under this module, one file per concern, next to the function that runs it.
//!
//! A row's life: the capture trigger inserts it `pending`; [`claim`] leases it
//! to one worker with a fencing token; [`record`] writes the outcome
//! (`delivered`, `dead`, `superseded`, or back to `pending` with a later
//! `next_attempt_at`) only while that token still holds; [`partitions`]
//! drops whole days of finished rows past retention and [`prune`] deletes
//! those the partitions kept; [`purge`] deletes dead rows an operator has
//! given up on. [`minutes`] keeps the deliveries per minute the operator
//! page charts. A day's rows live in two halves, open and done, and a row
//! moves between them as it finishes; [`moved`] retries the statements
//! that race such a move.

pub mod claim;
pub mod enqueue;
pub mod minutes;
pub mod moved;
pub mod partitions;
pub mod prune;
pub mod purge;
pub mod record;
pub mod replay;
pub mod stats;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// Row states, as stored in `authz_outbox.state`.
pub const STATES: [&str; 4] = ["pending", "delivered", "dead", "superseded"];

/// The name of the `pg_notify` channel the capture trigger signals.
pub const NOTIFY_CHANNEL: &str = "authz_outbox";

/// A row leased to this worker. `lease_token` fences every later write.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedRow {
    pub id: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub parent_type: Option<String>,
    pub parent_id: Option<String>,
    pub operation: String,
    pub principal: Option<Value>,
    /// Attempts including the one this claim starts.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub lease_token: Uuid,
    pub guarded: bool,
    /// capture, reconcile or replay.
    pub origin: String,
    pub last_error: Option<String>,
    /// Column values the mapping's relationships need besides the parent
    /// (SpiceDB target; NULL for every other capture).
    pub attributes: Option<Value>,
}

impl ClaimedRow {
    /// Whether this row is certain never to have reached agentex-auth: a
    /// captured row on its first claim with no earlier error. Rows from
    /// reconcile or replay may repair tuples that already exist, and any
    /// earlier error (a timeout, an applied-then-failed answer, a release)
    /// leaves it open whether something was applied.
    pub fn never_attempted(&self) -> bool {
        self.attempts <= 1 && self.last_error.is_none() && self.origin == "capture"
    }
}
