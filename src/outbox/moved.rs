//! Rows that move between partitions while a statement reaches for them.
//!
//! A day of the outbox is split by state (migration 20261207000001): a row
//! that finishes moves from the day's `_open` half to its `_done` half.
//! PostgreSQL cannot follow a row across partitions the way it follows an
//! update within one: a statement that waited for, or read before, a row
//! another transaction then moved fails with SQLSTATE 40001 ("tuple to be
//! locked was already moved to another partition due to concurrent
//! update") instead of re-checking it. Run again, the statement sees the
//! row where it now is, finished, and passes over it as it would have had
//! the row been updated in place.
//!
//! That race is ordinary (a worker records a row as another one's claim
//! reads it; an operator supersedes a row a worker holds), so the worker's
//! statements that lock or update outbox rows retry it at once, a few
//! times, instead of counting it as a database failure with a back-off and
//! a warning.

use std::future::Future;

/// How many times a statement is run in all before the conflict is
/// returned to the caller (whose own retry rules then apply).
const ATTEMPTS: u32 = 4;

/// SQLSTATE 40001: what a row moved by a concurrent update raises under
/// READ COMMITTED (the only isolation these statements run at).
pub fn is_moved(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("40001"))
}

/// Runs `statement` again while it fails because a row it reached for was
/// moved meanwhile; any other outcome is returned as it is.
pub async fn retry<T, F, Fut>(statement: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    retry_when(is_moved, statement).await
}

/// [`retry`] for work whose error wraps the database's: `moved` tells
/// which errors are a moved row. The work must be safe to run again from
/// the start (one statement, or one transaction that rolled back).
pub async fn retry_when<T, E, F, Fut>(moved: impl Fn(&E) -> bool, mut statement: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match statement().await {
            Err(e) if moved(&e) && attempt < ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "a row moved to another partition meanwhile; running the statement again");
                attempt += 1;
            }
            other => return other,
        }
    }
}
