//! Enqueuing rows from Rust (reconcile's fixes), beside the capture triggers.

use sqlx::{Postgres, Transaction};

use crate::domain::{Operation, Principal, ResourceRef};

/// A row to add, as reconcile decides it.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub operation: Operation,
    pub resource: ResourceRef,
    pub parent: Option<ResourceRef>,
    pub principal: Option<Principal>,
    /// Deliver only if the resource's row still does not exist then.
    pub guarded: bool,
    /// The row's columns the SpiceDB target's relationships name (what the
    /// capture records in `attributes`).
    pub attributes: Option<serde_json::Value>,
}

/// Inserts rows in the caller's transaction and wakes the workers on commit.
/// `origin` (`reconcile`) is also each row's `principal_source`: whoever
/// enqueues the row chose its principal, not a writer's setting.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[NewRow],
    origin: &str,
) -> Result<Vec<i64>, sqlx::Error> {
    const SQL: &str = r#"
        INSERT INTO authz_outbox (operation, resource_type, resource_id, parent_type, parent_id,
                                  principal, guarded, origin, attributes, principal_source)
        SELECT u.*, u.origin
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                    $6::jsonb[], $7::bool[], $8::text[], $9::jsonb[])
             AS u(operation, resource_type, resource_id, parent_type, parent_id,
                  principal, guarded, origin, attributes)
        RETURNING id
    "#;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ops: Vec<&str> = rows.iter().map(|r| r.operation.as_str()).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.resource.kind.as_str()).collect();
    let ids: Vec<&str> = rows.iter().map(|r| r.resource.selector.as_str()).collect();
    let ptypes: Vec<Option<&str>> = rows
        .iter()
        .map(|r| r.parent.as_ref().map(|p| p.kind.as_str()))
        .collect();
    let pids: Vec<Option<&str>> = rows
        .iter()
        .map(|r| r.parent.as_ref().map(|p| p.selector.as_str()))
        .collect();
    let principals: Vec<Option<serde_json::Value>> = rows
        .iter()
        .map(|r| r.principal.as_ref().map(Principal::as_value))
        .collect();
    let guarded: Vec<bool> = rows.iter().map(|r| r.guarded).collect();
    let origins: Vec<&str> = rows.iter().map(|_| origin).collect();
    let attributes: Vec<Option<&serde_json::Value>> =
        rows.iter().map(|r| r.attributes.as_ref()).collect();
    let ids = sqlx::query_scalar(SQL)
        .bind(&ops)
        .bind(&types)
        .bind(&ids)
        .bind(&ptypes)
        .bind(&pids)
        .bind(&principals)
        .bind(&guarded)
        .bind(&origins)
        .bind(&attributes)
        .fetch_all(&mut **tx)
        .await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(super::NOTIFY_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(ids)
}
