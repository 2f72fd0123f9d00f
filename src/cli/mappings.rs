//! `authz-outbox mappings list | check`, and the `--mappings` setting that
//! `migrate` shares.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{DbArgs, Format, TargetKind};
use crate::mapping::Mappings;
use crate::mapping::install;

/// Where the mappings come from: the built-ins, changed by an optional file.
#[derive(Debug, clap::Args)]
pub struct MappingArgs {
    /// A TOML file that adds, replaces or removes (`enabled = false`)
    /// mappings on top of the built-in agentex ones.
    #[arg(long = "mappings", env = "AUTHZ_OUTBOX_MAPPINGS", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The delivery target the mappings are for: agentex-auth accepts only
    /// the types agent, task, api_key and schedule; spicedb any SpiceDB
    /// definition, with one relationship set per type.
    #[arg(
        long,
        env = "AUTHZ_OUTBOX_TARGET",
        value_enum,
        default_value = "agentex-auth"
    )]
    pub target: TargetKind,
}

impl MappingArgs {
    pub fn load(&self) -> anyhow::Result<Mappings> {
        let mappings = Mappings::load(self.file.as_deref())?;
        match self.target {
            TargetKind::AgentexAuth => mappings.require_agentex_types()?,
            TargetKind::SpiceDb => mappings.require_one_relationship_set_per_type()?,
        }
        Ok(mappings)
    }
}

#[derive(Debug, Subcommand)]
pub enum MappingsCommand {
    /// Show the mappings installed in the database (what capture follows).
    List {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Validate the mappings (built-ins + `--mappings`) against the live
    /// database without changing it; exit 2 naming the first bad mapping.
    Check {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        mappings: MappingArgs,
        /// Also check every mapping's relationships against this SpiceDB's
        /// schema (definitions, relations, subject types).
        #[arg(long, env = "SPICEDB_ENDPOINT")]
        spicedb_endpoint: Option<String>,
        /// SpiceDB preshared key, sent as a bearer token.
        #[arg(long, env = "SPICEDB_TOKEN", hide_env_values = true, value_parser = super::parse_secret)]
        spicedb_token: Option<super::Secret>,
    },
}

pub async fn mappings(command: MappingsCommand) -> anyhow::Result<ExitCode> {
    match command {
        MappingsCommand::List { db, format } => {
            let pool = db.connect(1).await?;
            let installed = install::installed(&pool)
                .await
                .context("reading authz_outbox_mappings (has `authz-outbox migrate` run?)")?;
            match format {
                Format::Json => super::print_json(&installed)?,
                Format::Table => {
                    if installed.is_empty() {
                        println!("no mappings installed (run `authz-outbox migrate`)");
                    }
                    for m in &installed {
                        println!("{}", describe(m));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MappingsCommand::Check {
            db,
            mappings,
            spicedb_endpoint,
            spicedb_token,
        } => {
            let mappings = mappings.load()?;
            if let Some(endpoint) = &spicedb_endpoint {
                let client = crate::spicedb_client::SpiceDbClient::new(
                    endpoint,
                    spicedb_token.and_then(|t| crate::spicedb_client::SpiceDbToken::new(t.0)),
                    std::time::Duration::from_secs(10),
                )?;
                let schema = client
                    .read_schema()
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the schema from {endpoint}: {e}"))?;
                mappings.check_schema(&schema)?;
            }
            let pool = db.connect(1).await?;
            let mut tx = pool.begin().await?;
            // Catalog reads and compiling expressions only: no lock a host
            // writer would wait for, and nothing is kept.
            let (resolved, skipped) = install::resolve_all(&mut tx, &mappings).await?;
            tx.rollback().await?;
            for r in &resolved {
                println!(
                    "ok      {} ({} on {})",
                    r.mapping.name, r.mapping.resource_type, r.table.name
                );
            }
            if let Some(endpoint) = &spicedb_endpoint {
                println!("ok      relationships fit the schema at {endpoint}");
            }
            for name in skipped {
                println!("skipped {name} (built-in; its table does not exist here)");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn describe(m: &install::Installed) -> String {
    let d = &m.definition;
    let field = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let parent = match d.get("parent") {
        Some(p) => {
            let kind = p.get("type").and_then(|v| v.as_str()).unwrap_or("?");
            let column = p.get("column").and_then(|v| v.as_str()).unwrap_or("?");
            match p.get("join") {
                Some(j) => format!(
                    "{kind} from {}.{column} (on {} = {})",
                    j.get("table").and_then(|v| v.as_str()).unwrap_or("?"),
                    j.get("on").and_then(|v| v.as_str()).unwrap_or("?"),
                    j.get("references").and_then(|v| v.as_str()).unwrap_or("?"),
                ),
                None => format!("{kind} from {column}"),
            }
        }
        None => "none".into(),
    };
    let creator = d
        .get("creator")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" > ")
        })
        .unwrap_or_default();
    // The relationships the SpiceDB target writes (stated, or the defaults).
    let relationships = serde_json::from_value::<crate::mapping::MappingSpec>(d.clone())
        .ok()
        .and_then(|spec| crate::mapping::Mapping::from_spec(spec).ok())
        .map(|m| {
            let list: Vec<String> = m.relationships.iter().map(|r| r.to_string()).collect();
            format!(
                " relationships=[{}] deregister={}",
                list.join(", "),
                m.deregister
            )
        })
        .unwrap_or_default();
    format!(
        "{name}: type={kind} table={table} selector={selector} parent={parent} live={live} creator={creator}{relationships}",
        name = m.name,
        kind = m.resource_type,
        table = m.table_name,
        selector = field("selector"),
        live = d
            .get("live")
            .and_then(|v| v.as_str())
            .unwrap_or("every row"),
    )
}
