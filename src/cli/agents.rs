use std::process::ExitCode;

use clap::Subcommand;

use super::{DbArgs, parse_principal};
use crate::capture;
use crate::domain::Principal;

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Create an agent (registered in agentex-auth with its creator as owner).
    Create {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long, env = "AUTHZ_OUTBOX_PRINCIPAL", value_parser = parse_principal)]
        principal: Option<Principal>,
    },
}

pub async fn agents(command: AgentsCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentsCommand::Create {
            db,
            id,
            name,
            principal,
        } => {
            let pool = db.connect(2).await?;
            let outbox_id = capture::create_agent(&pool, &id, &name, principal.as_ref()).await?;
            println!("agent_id={id} outbox_id={outbox_id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
