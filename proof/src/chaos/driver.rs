//! The random operations: what a host does to `agent_api_keys`, over a fixed
//! set of key slots, with an exact record of what should exist at the end.
//!
//! Each driver task owns the slots `i` with `i % tasks == task`, so the
//! operations on one key are sequential (and the expected state exact) while
//! the tasks interleave with each other, the workers and the kills.
//!
//! A host retries a write that failed because PostgreSQL went away; so does
//! the driver. A failed commit is ambiguous (it may have committed), so every
//! retry is written to be safe either way: creates look their unique name up
//! before trying again, deletes and re-parents are idempotent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use authz_outbox::capture::{self, NewApiKey};
use authz_outbox::domain::{ApiKeyType, Principal};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sqlx::PgPool;

/// The kinds of operation, as counted in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Create,
    CreateThenDelete,
    DeleteById,
    DeleteByName,
    DeleteSql,
    Reparent,
}

const KEY_TYPES: [ApiKeyType; 4] = [
    ApiKeyType::Internal,
    ApiKeyType::External,
    ApiKeyType::Github,
    ApiKeyType::Slack,
];

/// A key the driver believes exists.
#[derive(Debug, Clone)]
pub struct LiveKey {
    pub id: String,
    pub agent_id: String,
    pub name: String,
    pub key_type: ApiKeyType,
    pub creator: String,
}

/// A key the driver deleted, with whoever created it.
#[derive(Debug, Clone)]
pub struct DeletedKey {
    pub id: String,
    pub creator: String,
}

/// What one driver task did.
#[derive(Debug, Default)]
pub struct DriverOutcome {
    pub ops: BTreeMap<OpKind, u64>,
    pub live: Vec<LiveKey>,
    pub deleted: Vec<DeletedKey>,
    /// Statements retried after a database error (the PostgreSQL restart).
    pub retries: u64,
}

/// Settings shared by the driver tasks.
pub struct DriverPlan {
    pub pool: PgPool,
    pub tasks: usize,
    pub ops: u64,
    pub slots: usize,
    pub agents: usize,
    pub users: usize,
    pub seed: u64,
    /// Operations done so far, by every task (the PG restart waits on it).
    pub done: Arc<AtomicU64>,
    /// How long one statement is retried before the run fails.
    pub retry_for: Duration,
    /// Operations per second over all tasks (0: as fast as possible). A
    /// paced storm lasts long enough for kills and the restart to land
    /// among the writes.
    pub rate: f64,
}

pub fn agent_id(i: usize) -> String {
    format!("chaos-agent-{i}")
}

pub fn user(i: usize) -> String {
    format!("u{i}")
}

pub fn principal(user: &str) -> Principal {
    Principal::parse(&serde_json::json!({ "user_id": user }).to_string())
        .expect("a user_id principal is valid")
}

/// Runs one task's share of the operations.
pub async fn drive(plan: Arc<DriverPlan>, task: usize) -> anyhow::Result<DriverOutcome> {
    let mut rng =
        StdRng::seed_from_u64(plan.seed.wrapping_mul(1_000_003).wrapping_add(task as u64));
    let my_slots: Vec<usize> = (0..plan.slots).filter(|s| s % plan.tasks == task).collect();
    let my_ops =
        plan.ops / plan.tasks as u64 + u64::from((task as u64) < plan.ops % plan.tasks as u64);
    let mut slots: Vec<Option<LiveKey>> = vec![None; my_slots.len()];
    let mut out = DriverOutcome::default();
    if my_slots.is_empty() {
        return Ok(out);
    }
    let mut counter = 0u64;
    let started = tokio::time::Instant::now();
    let interval =
        (plan.rate > 0.0).then(|| Duration::from_secs_f64(plan.tasks as f64 / plan.rate));
    for n in 0..my_ops {
        if let Some(interval) = interval {
            tokio::time::sleep_until(started + interval * n as u32).await;
        }
        let s = rng.random_range(0..slots.len());
        let kind = match &slots[s] {
            None if rng.random_bool(0.15) => OpKind::CreateThenDelete,
            None => OpKind::Create,
            Some(_) => match rng.random_range(0..100) {
                0..30 => OpKind::DeleteById,
                30..42 => OpKind::DeleteByName,
                42..55 => OpKind::DeleteSql,
                _ => OpKind::Reparent,
            },
        };
        match kind {
            OpKind::Create | OpKind::CreateThenDelete => {
                counter += 1;
                let key = LiveKey {
                    id: String::new(),
                    agent_id: agent_id(rng.random_range(0..plan.agents)),
                    name: format!("chaos-t{task}-k{counter}"),
                    key_type: KEY_TYPES[rng.random_range(0..KEY_TYPES.len())],
                    creator: user(rng.random_range(0..plan.users)),
                };
                let key = create(&plan, key, &mut out.retries).await?;
                if kind == OpKind::CreateThenDelete {
                    delete_by_id(&plan, &key, &mut out.retries).await?;
                    out.deleted.push(DeletedKey {
                        id: key.id,
                        creator: key.creator,
                    });
                } else {
                    slots[s] = Some(key);
                }
            }
            OpKind::DeleteById | OpKind::DeleteByName | OpKind::DeleteSql => {
                let key = slots[s].take().expect("a full slot");
                match kind {
                    OpKind::DeleteById => delete_by_id(&plan, &key, &mut out.retries).await?,
                    OpKind::DeleteByName => delete_by_name(&plan, &key, &mut out.retries).await?,
                    _ => delete_sql(&plan, &key, &mut out.retries).await?,
                }
                out.deleted.push(DeletedKey {
                    id: key.id,
                    creator: key.creator,
                });
            }
            OpKind::Reparent => {
                let key = slots[s].as_mut().expect("a full slot");
                let mut to = agent_id(rng.random_range(0..plan.agents));
                while to == key.agent_id && plan.agents > 1 {
                    to = agent_id(rng.random_range(0..plan.agents));
                }
                reparent(&plan, key, &to, &mut out.retries).await?;
                key.agent_id = to;
            }
        }
        *out.ops.entry(kind).or_default() += 1;
        plan.done.fetch_add(1, Ordering::Relaxed);
    }
    out.live = slots.into_iter().flatten().collect();
    Ok(out)
}

/// Retries `attempt` on database errors (PostgreSQL restarting) for up to
/// `plan.retry_for`, as a host would.
async fn retrying<T, F, Fut>(
    plan: &DriverPlan,
    retries: &mut u64,
    what: &str,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + plan.retry_for;
    let mut pause = Duration::from_millis(50);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() < deadline => {
                *retries += 1;
                tracing::debug!(error = %e, what, "retrying after a database error");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(e.context(format!("{what}: still failing after {:?}", plan.retry_for)));
            }
        }
    }
}

async fn create(plan: &DriverPlan, key: LiveKey, retries: &mut u64) -> anyhow::Result<LiveKey> {
    let who = principal(&key.creator);
    let mut first = true;
    let what = format!("create {}", key.name);
    let (id, agent) = retrying(plan, retries, &what, || {
        let (key, who, retry) = (&key, &who, !first);
        first = false;
        async move {
            // A commit that failed on the wire may have happened: adopt it.
            if retry
                && let Some(found) = sqlx::query_as::<_, (String, String)>(
                    "SELECT id, agent_id FROM agent_api_keys WHERE name = $1",
                )
                .bind(&key.name)
                .fetch_optional(&plan.pool)
                .await?
            {
                return Ok(found);
            }
            let new = NewApiKey {
                agent_id: key.agent_id.clone(),
                name: key.name.clone(),
                key_type: key.key_type,
                secret: None,
            };
            let created = capture::create_api_key(&plan.pool, new, Some(who)).await?;
            Ok((created.id, created.agent_id))
        }
    })
    .await?;
    Ok(LiveKey {
        id,
        agent_id: agent,
        ..key
    })
}

async fn delete_by_id(plan: &DriverPlan, key: &LiveKey, retries: &mut u64) -> anyhow::Result<()> {
    let who = principal(&key.creator);
    let who = &who;
    retrying(
        plan,
        retries,
        &format!("delete {}", key.id),
        || async move {
            capture::delete_api_key(&plan.pool, &key.id, Some(who)).await?;
            Ok(())
        },
    )
    .await
}

async fn delete_by_name(plan: &DriverPlan, key: &LiveKey, retries: &mut u64) -> anyhow::Result<()> {
    let who = principal(&key.creator);
    let who = &who;
    retrying(
        plan,
        retries,
        &format!("delete by name {}", key.name),
        || async move {
            capture::delete_api_key_by_name(
                &plan.pool,
                &key.agent_id,
                &key.name,
                key.key_type,
                Some(who),
            )
            .await?;
            Ok(())
        },
    )
    .await
}

/// A hand-written DELETE with no principal: the trigger's deregister borrows
/// the creator recorded at registration.
async fn delete_sql(plan: &DriverPlan, key: &LiveKey, retries: &mut u64) -> anyhow::Result<()> {
    retrying(
        plan,
        retries,
        &format!("sql delete {}", key.id),
        || async move {
            sqlx::query("DELETE FROM agent_api_keys WHERE id = $1")
                .bind(&key.id)
                .execute(&plan.pool)
                .await?;
            Ok(())
        },
    )
    .await
}

/// Moves a key to another agent; the trigger enqueues a deregister and a
/// register under the new parent, with the key's creator as principal.
async fn reparent(
    plan: &DriverPlan,
    key: &LiveKey,
    to: &str,
    retries: &mut u64,
) -> anyhow::Result<()> {
    let who = principal(&key.creator);
    let who = &who;
    retrying(
        plan,
        retries,
        &format!("reparent {}", key.id),
        || async move {
            let mut tx = plan.pool.begin().await?;
            capture::set_principal(&mut tx, Some(who)).await?;
            sqlx::query("UPDATE agent_api_keys SET agent_id = $2 WHERE id = $1")
                .bind(&key.id)
                .bind(to)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        },
    )
    .await
}
