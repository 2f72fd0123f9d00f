//! Writing the outcome of a delivery back to the row, fenced by the claim's
//! lease token.
//!
//! A row that becomes `delivered` also updates, in the same statement, who
//! its resource is registered as (`authz_outbox_owners`: a register adds its
//! principal, a deregister forgets the resource's owners). A trigger does it
//! (`authz_outbox_record_owner`, src/mapping/core.rs), so every way a row
//! reaches `delivered` counts, and the worker needs no grant on that table.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// What becomes of a claimed row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowUpdate {
    /// agentex-auth applied it.
    Delivered { consistency_token: Option<String> },
    /// Try again at `at`; this attempt counted.
    Retry {
        at: DateTime<Utc>,
        status: Option<u16>,
        error: String,
    },
    /// Back to pending without spending the attempt (our credential was
    /// refused, the circuit held it back, or the worker is shutting down).
    /// Without an error of its own it keeps the row's `last_error`: that is
    /// the evidence that something of the row may already be in SpiceDB (an
    /// earlier attempt, or a re-parent's swap that wrote it early), and a
    /// row without it counts as never attempted, which lets the worker
    /// supersede it with the deregister after it and send neither.
    Release {
        at: DateTime<Utc>,
        status: Option<u16>,
        error: Option<String>,
    },
    /// Will never succeed as it is; waits for `replay`.
    Dead { status: Option<u16>, error: String },
    /// Nothing to deliver any more (see the reason).
    Superseded { reason: String },
}

impl RowUpdate {
    fn state(&self) -> &'static str {
        match self {
            RowUpdate::Delivered { .. } => "delivered",
            RowUpdate::Retry { .. } | RowUpdate::Release { .. } => "pending",
            RowUpdate::Dead { .. } => "dead",
            RowUpdate::Superseded { .. } => "superseded",
        }
    }
}

/// One outcome to record.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub id: i64,
    /// The row's partition key: the update looks in that day's partition
    /// only, not in the primary key of every partition.
    pub created_at: DateTime<Utc>,
    pub lease_token: Uuid,
    pub update: RowUpdate,
}

/// A row whose outcome was written, with what the metrics need.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Written {
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The record statement (public so a test can check its plan): binds one
/// array per column of [`Recorded`] and its update, in the order
/// [`record`] builds them, `created_at` last.
pub const RECORD_SQL: &str = r#"
        UPDATE authz_outbox o
        SET state = u.state,
            attempts = CASE WHEN u.refund THEN greatest(o.attempts - 1, 0) ELSE o.attempts END,
            next_attempt_at = coalesce(u.next_attempt_at, o.next_attempt_at),
            last_error = CASE WHEN u.refund THEN coalesce(u.last_error, o.last_error) ELSE u.last_error END,
            last_status = u.last_status,
            consistency_token = coalesce(u.consistency_token, o.consistency_token),
            delivered_at = CASE WHEN u.state = 'delivered' THEN now() ELSE o.delivered_at END,
            finished_at = CASE WHEN u.state = 'pending' THEN NULL ELSE now() END,
            locked_by = NULL,
            locked_until = NULL,
            lease_token = NULL
        FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::timestamptz[], $5::text[],
                    $6::int[], $7::text[], $8::bool[], $9::timestamptz[])
             AS u(id, token, state, next_attempt_at, last_error, last_status, consistency_token, refund,
                  created_at)
        WHERE o.id = u.id AND o.created_at = u.created_at
          AND o.lease_token = u.token AND o.state = 'pending'
        RETURNING o.id, o.created_at, o.finished_at
"#;

/// Records many outcomes in one statement. Returns the rows actually written:
/// a row missing from the answer had lost its lease (expired and claimed by
/// another worker, or released, or finished by someone else meanwhile), and
/// its outcome was rightly dropped. A row that finishes here moves to its
/// day's `_done` half ([`super::moved`]).
pub async fn record(pool: &PgPool, outcomes: &[Recorded]) -> Result<Vec<Written>, sqlx::Error> {
    if outcomes.is_empty() {
        return Ok(Vec::new());
    }
    let n = outcomes.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut next = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut ctokens = Vec::with_capacity(n);
    let mut refunds = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    for o in outcomes {
        ids.push(o.id);
        created.push(o.created_at);
        tokens.push(o.lease_token);
        states.push(o.update.state());
        let (at, error, status, ctoken, refund) = match &o.update {
            RowUpdate::Delivered { consistency_token } => {
                (None, None, None, consistency_token.clone(), false)
            }
            RowUpdate::Retry { at, status, error } => {
                (Some(*at), Some(error.clone()), *status, None, false)
            }
            RowUpdate::Release { at, status, error } => {
                (Some(*at), error.clone(), *status, None, true)
            }
            RowUpdate::Dead { status, error } => (None, Some(error.clone()), *status, None, false),
            RowUpdate::Superseded { reason } => (None, Some(reason.clone()), None, None, false),
        };
        next.push(at);
        errors.push(error);
        statuses.push(status.map(i32::from));
        ctokens.push(ctoken);
        refunds.push(refund);
    }
    super::moved::retry(|| {
        sqlx::query_as(RECORD_SQL)
            .bind(&ids)
            .bind(&tokens)
            .bind(&states)
            .bind(&next)
            .bind(&errors)
            .bind(&statuses)
            .bind(&ctokens)
            .bind(&refunds)
            .bind(&created)
            .fetch_all(pool)
    })
    .await
}
