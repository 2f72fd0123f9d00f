use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::{DbArgs, Secret, duration_up_to, parse_principal, parse_secret};
use crate::capture::{self, DeliveryState, NewApiKey};
use crate::domain::{ApiKeyType, Principal};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key. Prints its id and outbox id; a generated secret is printed once.
    Create {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        agent_id: String,
        #[arg(long)]
        name: String,
        /// internal, external, github or slack.
        #[arg(long = "type", value_name = "TYPE")]
        key_type: ApiKeyType,
        /// The creator, e.g. '{"user_id":"u1"}'. Only identity fields are kept.
        #[arg(long, env = "AUTHZ_OUTBOX_PRINCIPAL", value_parser = parse_principal)]
        principal: Option<Principal>,
        /// The secret to store; generated when absent. Prefer the environment:
        /// a flag's value is visible in `ps`.
        #[arg(long, env = "AUTHZ_OUTBOX_KEY_SECRET", hide_env_values = true, value_parser = parse_secret)]
        secret: Option<Secret>,
        /// Wait up to this long for the register to be delivered.
        #[arg(long, value_parser = duration_up_to(crate::config::limits::WAIT))]
        wait: Option<Duration>,
    },
    /// Delete a key by id, or by agent, name and type.
    Delete {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long, conflicts_with_all = ["agent_id", "name", "key_type"], required_unless_present = "agent_id")]
        id: Option<String>,
        #[arg(long, requires_all = ["name", "key_type"])]
        agent_id: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "type", value_name = "TYPE")]
        key_type: Option<ApiKeyType>,
        /// Who deletes; defaults to the creator recorded at registration.
        #[arg(long, env = "AUTHZ_OUTBOX_PRINCIPAL", value_parser = parse_principal)]
        principal: Option<Principal>,
        #[arg(long, value_parser = duration_up_to(crate::config::limits::WAIT))]
        wait: Option<Duration>,
    },
}

pub async fn keys(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Create {
            db,
            agent_id,
            name,
            key_type,
            principal,
            secret,
            wait,
        } => {
            let pool = db.connect(2).await?;
            let generated = secret.is_none();
            let key = NewApiKey {
                agent_id,
                name,
                key_type,
                secret: secret.map(|s| s.0),
            };
            let created = capture::create_api_key(&pool, key, principal.as_ref()).await?;
            println!("key_id={} outbox_id={}", created.id, created.outbox_id);
            if generated {
                println!("secret={}  (shown once; store it now)", created.secret);
            }
            if principal.is_none() {
                eprintln!(
                    "warning: no --principal; unless a role default sets authz_outbox.principal the register is dead (no creator resolvable)"
                );
            }
            wait_for(&pool, &[created.outbox_id], wait).await
        }
        KeysCommand::Delete {
            db,
            id,
            agent_id,
            name,
            key_type,
            principal,
            wait,
        } => {
            let pool = db.connect(2).await?;
            let outbox_ids = match (id, agent_id, name, key_type) {
                (Some(id), ..) => capture::delete_api_key(&pool, &id, principal.as_ref()).await?,
                (None, Some(agent), Some(name), Some(key_type)) => {
                    capture::delete_api_key_by_name(
                        &pool,
                        &agent,
                        &name,
                        key_type,
                        principal.as_ref(),
                    )
                    .await?
                }
                _ => anyhow::bail!("give --id, or --agent-id with --name and --type"),
            };
            if outbox_ids.is_empty() {
                anyhow::bail!("no such key");
            }
            for id in &outbox_ids {
                println!("outbox_id={id}");
            }
            wait_for(&pool, &outbox_ids, wait).await
        }
    }
}

async fn wait_for(
    pool: &sqlx::PgPool,
    outbox_ids: &[i64],
    wait: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let Some(timeout) = wait else {
        return Ok(ExitCode::SUCCESS);
    };
    let mut code = ExitCode::SUCCESS;
    for id in outbox_ids {
        match capture::wait_until_delivered(pool, *id, timeout).await? {
            DeliveryState::Delivered => println!("outbox_id={id} delivered"),
            DeliveryState::Superseded => println!("outbox_id={id} superseded"),
            DeliveryState::Dead { error } => {
                println!("outbox_id={id} dead: {error}");
                code = ExitCode::from(1);
            }
        }
    }
    Ok(code)
}
