//! Re-driving dead rows: back to `pending` with fresh attempts, unless
//! replaying would undo something that happened since.
//!
//! Everything happens in one transaction that locks the selected rows
//! (`FOR UPDATE`), so two operators replaying at once, or a replay racing a
//! worker, cannot revive a row twice or after it was superseded.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::domain::{Principal, ResourceRef};

/// Which rows to replay. Selectors combine with AND; at least one is needed.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// These rows (a row that is not dead is reported as skipped).
    pub ids: Vec<i64>,
    /// Every dead row (narrowed by any other selector).
    pub all_dead: bool,
    /// Rows that went dead at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Rows that went dead at or before this time.
    pub until: Option<DateTime<Utc>>,
    pub resource: Option<ResourceRef>,
    /// Case-insensitive substring of `last_error`.
    pub error_contains: Option<String>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && !self.all_dead
            && self.since.is_none()
            && self.until.is_none()
            && self.resource.is_none()
            && self.error_contains.is_none()
    }
}

#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    pub selector: Selector,
    /// The creator for rows that died for "no creator resolvable".
    pub principal: Option<Principal>,
    /// Decide and report, change nothing.
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "no rows selected: pass --id, --all-dead, --since, --until, --resource or --error-contains"
    )]
    NoSelector,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayAction {
    /// Back to pending; the worker will deliver it.
    Replayed,
    /// Replaying would undo a later change; the row is closed as superseded.
    Superseded,
    /// Left as it is (see the reason).
    Skipped,
}

impl ReplayAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayAction::Replayed => "replayed",
            ReplayAction::Superseded => "superseded",
            ReplayAction::Skipped => "skipped",
        }
    }
}

/// What replay did (or, in a dry run, would do) with one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayedRow {
    pub id: i64,
    /// `TYPE:ID`.
    pub resource: String,
    pub operation: String,
    pub action: ReplayAction,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub rows: Vec<ReplayedRow>,
}

impl ReplayReport {
    pub fn count(&self, action: ReplayAction) -> usize {
        self.rows.iter().filter(|r| r.action == action).count()
    }
}

/// A selected row with the facts the decision needs, read under the lock.
#[derive(Debug, sqlx::FromRow)]
struct Candidate {
    id: i64,
    resource_type: String,
    resource_id: String,
    operation: String,
    state: String,
    has_creator: bool,
    row_exists: bool,
    later_deregister: Option<i64>,
    later_register: Option<i64>,
}

/// Replays the selected rows in one transaction. Run again from the start
/// when a selected row was moved between a day's halves meanwhile (a worker
/// finished it as replay reached for it, [`super::moved`]): the next run
/// sees it finished and decides again.
pub async fn replay(pool: &PgPool, options: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    super::moved::retry_when(
        |e: &ReplayError| matches!(e, ReplayError::Database(d) if super::moved::is_moved(d)),
        || replay_once(pool, options),
    )
    .await
}

async fn replay_once(pool: &PgPool, options: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    // The selected rows are locked; the facts about later rows and the
    // resource's row are read in the same statement, after the lock.
    const SELECT: &str = r#"
        SELECT o.id, o.resource_type, o.resource_id, o.operation, o.state,
               authz_outbox_has_creator(o.principal) AS has_creator,
               authz_outbox_resource_live(o.resource_type, o.resource_id, o.parent_id) AS row_exists,
               (SELECT l.id FROM authz_outbox l
                WHERE l.resource_type = o.resource_type AND l.resource_id = o.resource_id
                  AND l.id > o.id AND l.operation = 'deregister'
                ORDER BY l.id LIMIT 1) AS later_deregister,
               (SELECT l.id FROM authz_outbox l
                WHERE l.resource_type = o.resource_type AND l.resource_id = o.resource_id
                  AND l.id > o.id AND l.operation = 'register'
                  AND l.state IN ('delivered', 'pending')
                ORDER BY l.id LIMIT 1) AS later_register
        FROM authz_outbox o
        WHERE (cardinality($1::bigint[]) = 0 OR o.id = ANY($1))
          AND (cardinality($1::bigint[]) > 0 OR o.state = 'dead')
          AND ($2::timestamptz IS NULL OR o.finished_at >= $2)
          AND ($3::timestamptz IS NULL OR o.finished_at <= $3)
          AND ($4::text IS NULL OR (o.resource_type = $4 AND o.resource_id = $5))
          AND ($6::text IS NULL OR strpos(lower(coalesce(o.last_error, '')), lower($6)) > 0)
        ORDER BY o.id
        FOR UPDATE OF o
    "#;
    // Fresh attempts and no lease; `last_error` stays as history until the
    // next attempt overwrites it.
    const REVIVE: &str = r#"
        UPDATE authz_outbox
        SET state = 'pending', attempts = 0, next_attempt_at = now(),
            locked_by = NULL, locked_until = NULL, lease_token = NULL, finished_at = NULL,
            principal = coalesce($2, principal),
            -- A principal given to replay is replay's word, not the writer's.
            principal_source = CASE WHEN $2 IS NULL THEN principal_source ELSE 'replay' END
        WHERE id = ANY($1) AND state = 'dead'
    "#;
    const SUPERSEDE: &str = r#"
        UPDATE authz_outbox o
        SET state = 'superseded', finished_at = now(),
            locked_by = NULL, locked_until = NULL, lease_token = NULL,
            last_error = 'replay: ' || u.reason
        FROM unnest($1::bigint[], $2::text[]) AS u(id, reason)
        WHERE o.id = u.id AND o.state = 'dead'
    "#;
    let s = &options.selector;
    if s.is_empty() {
        return Err(ReplayError::NoSelector);
    }
    let mut tx = pool.begin().await?;
    let candidates: Vec<Candidate> = sqlx::query_as(SELECT)
        .bind(&s.ids)
        .bind(s.since)
        .bind(s.until)
        .bind(s.resource.as_ref().map(|r| r.kind.as_str()))
        .bind(s.resource.as_ref().map(|r| r.selector.as_str()))
        .bind(s.error_contains.as_deref())
        .fetch_all(&mut *tx)
        .await?;

    let mut report = ReplayReport {
        dry_run: options.dry_run,
        rows: Vec::with_capacity(candidates.len()),
    };
    let mut revive = Vec::new();
    let mut revive_with_principal = Vec::new();
    let mut supersede: Vec<(i64, String)> = Vec::new();
    for c in &candidates {
        let (action, reason) = decide(c, options.principal.is_some());
        match action {
            ReplayAction::Replayed if !c.has_creator => revive_with_principal.push(c.id),
            ReplayAction::Replayed => revive.push(c.id),
            ReplayAction::Superseded => supersede.push((c.id, reason.clone())),
            ReplayAction::Skipped => {}
        }
        report.rows.push(ReplayedRow {
            id: c.id,
            resource: format!("{}:{}", c.resource_type, c.resource_id),
            operation: c.operation.clone(),
            action,
            reason,
        });
    }
    if options.dry_run {
        tx.rollback().await?;
        return Ok(report);
    }
    sqlx::query(REVIVE)
        .bind(&revive)
        .bind(None::<Value>)
        .execute(&mut *tx)
        .await?;
    if !revive_with_principal.is_empty() {
        sqlx::query(REVIVE)
            .bind(&revive_with_principal)
            .bind(options.principal.as_ref().map(Principal::as_value))
            .execute(&mut *tx)
            .await?;
    }
    let (ids, reasons): (Vec<i64>, Vec<String>) = supersede.into_iter().unzip();
    sqlx::query(SUPERSEDE)
        .bind(&ids)
        .bind(&reasons)
        .execute(&mut *tx)
        .await?;
    if !revive.is_empty() || !revive_with_principal.is_empty() {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(super::NOTIFY_CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// The rules, in order: only dead rows; never undo a later change; a row
/// without a creator needs `--principal`.
fn decide(c: &Candidate, have_principal: bool) -> (ReplayAction, String) {
    if c.state != "dead" {
        return (
            ReplayAction::Skipped,
            format!("row is {}, not dead", c.state),
        );
    }
    match c.operation.as_str() {
        // Judged by the resource's mapping (`authz_outbox_resource_live`):
        // a soft-deleted agent, task or schedule is as gone as a deleted key.
        "register" if !c.row_exists => {
            return (
                ReplayAction::Superseded,
                format!(
                    "resource is not live by its {} mapping (deleted, soft-deleted or moved to \
                     another parent); refusing to register it again",
                    c.resource_type
                ),
            );
        }
        "register" => {
            if let Some(later) = c.later_deregister {
                return (
                    ReplayAction::Superseded,
                    format!("overtaken by later deregister #{later}"),
                );
            }
        }
        "deregister" => {
            if let Some(later) = c.later_register {
                return (
                    ReplayAction::Superseded,
                    format!("overtaken by later register #{later}"),
                );
            }
        }
        _ => {}
    }
    if !c.has_creator {
        if have_principal {
            return (
                ReplayAction::Replayed,
                "no creator resolvable; principal set from --principal".into(),
            );
        }
        return (
            ReplayAction::Skipped,
            "no creator resolvable; pass --principal".into(),
        );
    }
    (ReplayAction::Replayed, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(operation: &str) -> Candidate {
        Candidate {
            id: 1,
            resource_type: "api_key".into(),
            resource_id: "k".into(),
            operation: operation.into(),
            state: "dead".into(),
            has_creator: true,
            row_exists: true,
            later_deregister: None,
            later_register: None,
        }
    }

    #[test]
    fn register_of_a_gone_key_or_overtaken_is_superseded() {
        let mut c = candidate("register");
        assert_eq!(decide(&c, false).0, ReplayAction::Replayed);
        c.later_deregister = Some(7);
        assert_eq!(
            decide(&c, false),
            (
                ReplayAction::Superseded,
                "overtaken by later deregister #7".into()
            )
        );
        c.row_exists = false;
        assert_eq!(decide(&c, false).0, ReplayAction::Superseded);
    }

    #[test]
    fn deregister_overtaken_by_register_is_superseded() {
        let mut c = candidate("deregister");
        c.row_exists = false;
        assert_eq!(decide(&c, false).0, ReplayAction::Replayed);
        c.later_register = Some(9);
        assert_eq!(decide(&c, false).0, ReplayAction::Superseded);
    }

    #[test]
    fn no_creator_needs_a_principal() {
        let mut c = candidate("register");
        c.has_creator = false;
        assert_eq!(decide(&c, false).0, ReplayAction::Skipped);
        assert_eq!(decide(&c, true).0, ReplayAction::Replayed);
    }

    #[test]
    fn rows_that_are_not_dead_are_skipped() {
        let mut c = candidate("register");
        c.state = "delivered".into();
        assert_eq!(
            decide(&c, false),
            (ReplayAction::Skipped, "row is delivered, not dead".into())
        );
    }
}
