//! A batch of decoded transactions into the outbox: one statement per
//! batch that inserts the captured rows in commit order and records where
//! the slot may move (`applied_lsn`), once the batch's source transactions
//! are visible. The streaming and the polling turns both end here.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::postgres::PgConnection;

use super::{RelayError, pgoutput};
use crate::mapping::core::NO_CREATOR_ERROR;
use crate::mapping::ddl::NO_CREATOR_NEEDED;

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
pub(super) async fn applied_lsn(conn: &mut PgConnection, slot: &str) -> Result<u64, sqlx::Error> {
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

pub(super) fn lsn_text(lsn: u64) -> String {
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
        // sets it for its session (`relay_connection`).
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
///
/// `visible`: whether every source transaction in `$13` (32-bit xids, as
/// pgoutput sends them) is visible to the statement's snapshot; a 32-bit
/// xid above the snapshot's xmax (mod 2^32) is from the previous epoch.
const INSERT_SQL: &str = r#"
    WITH visible AS (
        SELECT NOT EXISTS (
            SELECT 1
            FROM unnest($13::bigint[]) AS x(xid),
                 (SELECT pg_current_snapshot() AS snap,
                         pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax) s
            WHERE NOT pg_visible_in_snapshot(
                (((s.xmax >> 32) - (x.xid > (s.xmax & 4294967295))::int) << 32 | x.xid)::text::xid8,
                s.snap)
        ) AS yes
    ),
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
"#;
