//! The random operations: what a host does to its four registered resource
//! types — api keys (create, delete three ways, re-parent), tasks (created
//! as the host does, status changes between live statuses, soft delete),
//! schedules (created with their own `creator_principal`, touched, soft
//! delete) and agents (soft delete and undelete) — over fixed slots, with an
//! exact record of what should exist at the end.
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
    TaskCreate,
    TaskStatus,
    TaskSoftDelete,
    ScheduleCreate,
    ScheduleTouch,
    ScheduleSoftDelete,
    AgentSoftDelete,
    AgentUndelete,
}

/// One `check` the end state implies: may `user` read `resource_type:selector`?
#[derive(Debug, Clone)]
pub struct Expectation {
    pub user: String,
    pub resource_type: &'static str,
    pub selector: String,
    pub allowed: bool,
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
    /// Tasks, schedules and agents: who may and may not read them at the end.
    pub expectations: Vec<Expectation>,
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
    /// The capture is in WAL mode: keys are written and deleted with the
    /// host's own SQL (the library's outbox ids exist only once relayed).
    pub wal: bool,
    /// Set while the slot dropper takes the relay's slot away: no write
    /// is started meanwhile (see `slot_dropper` for why).
    pub paused: Arc<std::sync::atomic::AtomicBool>,
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
    let mut others = Others::new(task, my_slots.len());
    let started = tokio::time::Instant::now();
    let interval =
        (plan.rate > 0.0).then(|| Duration::from_secs_f64(plan.tasks as f64 / plan.rate));
    for n in 0..my_ops {
        while plan.paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(interval) = interval {
            tokio::time::sleep_until(started + interval * n as u32).await;
        }
        let family = rng.random_range(0..100);
        if family >= 55 {
            let kind =
                other_resources(&plan, task, &mut rng, &mut others, family, &mut out.retries)
                    .await?;
            *out.ops.entry(kind).or_default() += 1;
            plan.done.fetch_add(1, Ordering::Relaxed);
            continue;
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
            // (Tasks, schedules and agents are chosen above, never here.)
            _ => {
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
    out.expectations.extend(others.expectations(plan.users));
    Ok(out)
}

/// A driver task's tasks, schedules and spare agents (agents no key hangs
/// off, so their soft deletes do not change what the keys' checks expect).
struct Others {
    task: usize,
    counter: u64,
    /// (task id, agent, creator)
    tasks: Vec<Option<(String, String, String)>>,
    /// (schedule id, agent, creator)
    schedules: Vec<Option<(String, String, String)>>,
    /// (agent id, created, live)
    agents: Vec<(String, bool, bool)>,
    deleted: Vec<Expectation>,
}

impl Others {
    fn new(task: usize, slots: usize) -> Self {
        let n = (slots / 4).max(1);
        Others {
            task,
            counter: 0,
            tasks: vec![None; n],
            schedules: vec![None; n],
            agents: (0..2)
                .map(|j| (format!("chaos-spare-t{task}-{j}"), false, false))
                .collect(),
            deleted: Vec::new(),
        }
    }

    fn expectations(self, users: usize) -> Vec<Expectation> {
        let other = |creator: &str| {
            let n = creator
                .trim_start_matches('u')
                .parse::<usize>()
                .unwrap_or(0);
            user((n + 1) % users.max(1))
        };
        let mut out = self.deleted;
        for (id, _, creator) in self.tasks.into_iter().flatten() {
            if users > 1 {
                out.push(Expectation {
                    user: other(&creator),
                    resource_type: "task",
                    selector: id.clone(),
                    allowed: false,
                });
            }
            out.push(Expectation {
                user: creator,
                resource_type: "task",
                selector: id,
                allowed: true,
            });
        }
        for (id, agent, creator) in self.schedules.into_iter().flatten() {
            out.push(Expectation {
                user: creator,
                resource_type: "schedule",
                selector: format!("run-schedule::{agent}::{id}"),
                allowed: true,
            });
        }
        for (id, created, live) in self.agents {
            if created {
                out.push(Expectation {
                    user: "admin".into(),
                    resource_type: "agent",
                    selector: id,
                    allowed: live,
                });
            }
        }
        out
    }
}

/// One operation on a task, a schedule or a spare agent (`family` 55..100).
async fn other_resources(
    plan: &DriverPlan,
    task: usize,
    rng: &mut StdRng,
    o: &mut Others,
    family: u32,
    retries: &mut u64,
) -> anyhow::Result<OpKind> {
    let _ = task;
    if family < 75 {
        let s = rng.random_range(0..o.tasks.len());
        match o.tasks[s].clone() {
            None => {
                o.counter += 1;
                let id = format!("chaos-task-t{}-{}", o.task, o.counter);
                let agent = agent_id(rng.random_range(0..plan.agents));
                let creator = user(rng.random_range(0..plan.users));
                create_task(plan, &id, &agent, &creator, retries).await?;
                o.tasks[s] = Some((id, agent, creator));
                Ok(OpKind::TaskCreate)
            }
            Some((id, _, creator)) if rng.random_bool(0.5) => {
                let status = ["COMPLETED", "FAILED", "RUNNING", "TIMED_OUT", "CANCELED"]
                    [rng.random_range(0..5)];
                let (id, who) = (&id, principal(&creator));
                retrying(plan, retries, "task status", || {
                    let who = &who;
                    async move { host_update(plan, who, "UPDATE tasks SET status = $2::taskstatus, updated_at = now() WHERE id = $1", id, status).await }
                })
                .await?;
                Ok(OpKind::TaskStatus)
            }
            Some((id, _, creator)) => {
                let (idr, who) = (&id, principal(&creator));
                retrying(plan, retries, "task soft delete", || {
                    let who = &who;
                    async move {
                        host_update(
                            plan,
                            who,
                            "UPDATE tasks SET status = $2::taskstatus WHERE id = $1",
                            idr,
                            "DELETED",
                        )
                        .await
                    }
                })
                .await?;
                o.deleted.push(Expectation {
                    user: creator,
                    resource_type: "task",
                    selector: id,
                    allowed: false,
                });
                o.tasks[s] = None;
                Ok(OpKind::TaskSoftDelete)
            }
        }
    } else if family < 90 {
        let s = rng.random_range(0..o.schedules.len());
        match o.schedules[s].clone() {
            None => {
                o.counter += 1;
                let id = format!("chaos-sched-t{}-{}", o.task, o.counter);
                let agent = agent_id(rng.random_range(0..plan.agents));
                let creator = user(rng.random_range(0..plan.users));
                let creator_json = serde_json::json!({ "user_id": creator }).to_string();
                let (idr, agentr, cj) = (&id, &agent, &creator_json);
                retrying(plan, retries, "schedule create", || async move {
                    // No transaction setting: the row's creator_principal is the creator.
                    sqlx::query(
                        "INSERT INTO agent_run_schedules (id, agent_id, name, creator_principal)
                         VALUES ($1, $2, $1, $3::json) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(idr)
                    .bind(agentr)
                    .bind(cj)
                    .execute(&plan.pool)
                    .await?;
                    Ok(())
                })
                .await?;
                o.schedules[s] = Some((id, agent, creator));
                Ok(OpKind::ScheduleCreate)
            }
            Some((id, _, _)) if rng.random_bool(0.4) => {
                let idr = &id;
                retrying(plan, retries, "schedule touch", || async move {
                    sqlx::query("UPDATE agent_run_schedules SET version = version + 1, updated_at = now() WHERE id = $1")
                        .bind(idr)
                        .execute(&plan.pool)
                        .await?;
                    Ok(())
                })
                .await?;
                Ok(OpKind::ScheduleTouch)
            }
            Some((id, agent, creator)) => {
                let idr = &id;
                retrying(plan, retries, "schedule soft delete", || async move {
                    sqlx::query("UPDATE agent_run_schedules SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL")
                        .bind(idr)
                        .execute(&plan.pool)
                        .await?;
                    Ok(())
                })
                .await?;
                o.deleted.push(Expectation {
                    user: creator,
                    resource_type: "schedule",
                    selector: format!("run-schedule::{agent}::{id}"),
                    allowed: false,
                });
                o.schedules[s] = None;
                Ok(OpKind::ScheduleSoftDelete)
            }
        }
    } else {
        let a = rng.random_range(0..o.agents.len());
        let (id, created, live) = o.agents[a].clone();
        let admin = principal("admin");
        let idr = &id;
        let kind = if !created || !live {
            retrying(plan, retries, "agent undelete", || {
                let admin = &admin;
                async move {
                    let mut tx = plan.pool.begin().await?;
                    capture::set_principal(&mut tx, Some(admin)).await?;
                    sqlx::query(
                        "INSERT INTO agents (id, name, description, status) VALUES ($1, $1, '', 'READY')
                         ON CONFLICT (id) DO UPDATE SET status = 'READY'",
                    )
                    .bind(idr)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(())
                }
            })
            .await?;
            o.agents[a] = (id, true, true);
            OpKind::AgentUndelete
        } else {
            retrying(plan, retries, "agent soft delete", || {
                let admin = &admin;
                async move { host_update(plan, admin, "UPDATE agents SET status = $2::agentstatus, updated_at = now() WHERE id = $1", idr, "DELETED").await }
            })
            .await?;
            o.agents[a] = (id, true, false);
            OpKind::AgentSoftDelete
        };
        Ok(kind)
    }
}

/// One UPDATE in its own transaction, with the principal set (idempotent).
async fn host_update(
    plan: &DriverPlan,
    who: &Principal,
    sql: &'static str,
    id: &str,
    value: &str,
) -> anyhow::Result<()> {
    let mut tx = plan.pool.begin().await?;
    capture::set_principal(&mut tx, Some(who)).await?;
    sqlx::query(sql)
        .bind(id)
        .bind(value)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// A task created as the host creates it: tasks, task_agents,
/// agent_task_tracker, one transaction. A retry after an ambiguous commit
/// adopts the task if it is there.
async fn create_task(
    plan: &DriverPlan,
    id: &str,
    agent: &str,
    creator: &str,
    retries: &mut u64,
) -> anyhow::Result<()> {
    let who = principal(creator);
    retrying(plan, retries, "task create", || {
        let who = &who;
        async move {
            let mut tx = plan.pool.begin().await?;
            capture::set_principal(&mut tx, Some(who)).await?;
            let inserted = sqlx::query(
                "INSERT INTO tasks (id, name, status, params) VALUES ($1, $1, 'RUNNING', '{}')
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 1 {
                sqlx::query("INSERT INTO task_agents (task_id, agent_id) VALUES ($1, $2)")
                    .bind(id)
                    .bind(agent)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO agent_task_tracker (id, agent_id, task_id, status) VALUES ('tr-' || $1, $2, $1, 'ACTIVE')",
                )
                .bind(id)
                .bind(agent)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }
    })
    .await
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
            if plan.wal {
                let mut tx = plan.pool.begin().await?;
                capture::set_principal(&mut tx, Some(who)).await?;
                let id = uuid::Uuid::new_v4().to_string();
                sqlx::query(
                    "INSERT INTO agent_api_keys (id, agent_id, name, api_key_type, api_key)
                     VALUES ($1, $2, $3, $4::agentapikeytype, $5)",
                )
                .bind(&id)
                .bind(&new.agent_id)
                .bind(&new.name)
                .bind(new.key_type.as_db())
                .bind(format!("agx_chaos_{id}"))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok((id, new.agent_id));
            }
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
            if plan.wal {
                let mut tx = plan.pool.begin().await?;
                capture::set_principal(&mut tx, Some(who)).await?;
                sqlx::query("DELETE FROM agent_api_keys WHERE id = $1")
                    .bind(&key.id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                return Ok(());
            }
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
            if plan.wal {
                let mut tx = plan.pool.begin().await?;
                capture::set_principal(&mut tx, Some(who)).await?;
                sqlx::query(
                    "DELETE FROM agent_api_keys
                     WHERE agent_id = $1 AND name = $2 AND api_key_type = $3::agentapikeytype",
                )
                .bind(&key.agent_id)
                .bind(&key.name)
                .bind(key.key_type.as_db())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(());
            }
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
