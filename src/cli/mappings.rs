//! `authz-outbox mappings list | check | init`, and the `--mappings` setting that
//! `migrate` shares.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{DbArgs, Format, TargetKind};
use crate::display::{self, Escaped};
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
        if let Some(path) = &self.file {
            require_regular_file(path)?;
        }
        let mappings = Mappings::load(self.file.as_deref())?;
        match self.target {
            TargetKind::AgentexAuth => mappings.require_agentex_types()?,
            TargetKind::SpiceDb => mappings.require_one_relationship_set_per_type()?,
        }
        Ok(mappings)
    }
}

/// Refuses a mappings path that is not a regular file, before anything
/// opens it: opening a FIFO blocks until some writer appears (a `migrate`
/// hung at start, holding no lock but doing nothing), and a device
/// (`/dev/zero`, `/dev/stdin`) is read without end or answers something
/// else each time. `stat` does not open, so it cannot block.
fn require_regular_file(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let shown = display::escape(&path.display().to_string()).into_owned();
    let kind = std::fs::metadata(path)
        .with_context(|| format!("reading the mappings file {shown}"))?
        .file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a file"
    };
    anyhow::bail!("the mappings file {shown} is {what}; --mappings takes a regular TOML file")
}

/// How long `mappings check` waits for the trigger locks of its trial
/// install (a host transaction holding one makes the check say so).
const TRIAL_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

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
        /// PEM file of extra CA certificates trusted for an https://
        /// SPICEDB_ENDPOINT (the system's roots are always trusted), as `run` takes it.
        #[arg(long, env = "SPICEDB_CA_FILE")]
        spicedb_ca_file: Option<PathBuf>,
    },
    /// Print a starting mapping file (TOML) read from existing tables, to
    /// edit: the primary key as selector, a foreign key as parent, a
    /// nullable `deleted_at` as the live predicate.
    Init {
        #[command(flatten)]
        db: DbArgs,
        /// A table to map (`table`, or `schema.table`); repeat for more.
        #[arg(long = "table", value_name = "TABLE", required = true)]
        tables: Vec<String>,
        /// The delivery target the file is for: with spicedb, relationships
        /// and switching off the built-ins whose table is missing.
        #[arg(
            long,
            env = "AUTHZ_OUTBOX_TARGET",
            value_enum,
            default_value = "agentex-auth"
        )]
        target: TargetKind,
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
                    // Definitions are read back from the database, where
                    // any writer could have put them.
                    for m in &installed {
                        println!("{}", display::escape(&describe(m)));
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
            spicedb_ca_file,
        } => {
            let mappings = mappings.load()?;
            if let Some(endpoint) = &spicedb_endpoint {
                let ca = spicedb_ca_file
                    .as_deref()
                    .map(crate::spicedb_client::read_ca_file)
                    .transpose()?;
                let token =
                    spicedb_token.and_then(|t| crate::spicedb_client::SpiceDbToken::new(t.0));
                super::warn_if_sent_in_clear(
                    token.is_some(),
                    "SPICEDB_ENDPOINT",
                    "preshared key",
                    endpoint,
                );
                let client = crate::spicedb_client::SpiceDbClient::with_ca(
                    endpoint,
                    token,
                    std::time::Duration::from_secs(10),
                    ca.as_deref(),
                )?;
                let schema = client.read_schema().await.map_err(|e| {
                    anyhow::anyhow!("reading the schema from {}: {e}", client.endpoint())
                })?;
                mappings.check_schema(&schema)?;
            }
            let pool = db.connect(1).await?;
            let mut tx = pool.begin().await?;
            // Catalog reads and compiling expressions only: no lock a host
            // writer would wait for, and nothing is kept.
            let (resolved, skipped) = install::resolve_all(&mut tx, &mappings).await?;
            tx.rollback().await?;
            // Everything `migrate` would run, run and rolled back: once
            // this release's migrations are applied (the capture calls
            // what they create; before, the checks above are the check).
            let mut conn = pool.acquire().await?;
            let trial = if crate::migrate::all_applied(&mut conn).await? {
                install::trial_install(&mut conn, &mappings, TRIAL_LOCK_TIMEOUT)
                    .await
                    .map(|_| ())
            } else {
                eprintln!(
                    "note: not tried as `migrate` would install it: authz-outbox's own migrations are not all applied here yet"
                );
                Ok(())
            };
            match trial {
                Ok(()) => {}
                Err(install::InstallError::Statement { message, .. })
                    if message.contains("permission denied")
                        || message.contains("must be owner") =>
                {
                    eprintln!(
                        "note: not tried as `migrate` would run it: this role may not install triggers ({})",
                        display::escape(&message)
                    );
                }
                Err(e) => return Err(e.into()),
            }
            for r in &resolved {
                println!(
                    "ok      {} ({} on {})",
                    Escaped(&r.mapping.name),
                    r.mapping.resource_type,
                    Escaped(&r.table.name)
                );
            }
            if let Some(endpoint) = &spicedb_endpoint {
                println!(
                    "ok      relationships fit the schema at {}",
                    display::redact_url(endpoint)
                );
            }
            for name in skipped {
                println!(
                    "skipped {} (built-in; its table does not exist here)",
                    Escaped(&name)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        MappingsCommand::Init { db, tables, target } => {
            let pool = db.connect(1).await?;
            let mut conn = pool.acquire().await?;
            let text = crate::mapping::init::init(
                &mut conn,
                &tables,
                matches!(target, TargetKind::SpiceDb),
            )
            .await?;
            print!("{text}");
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
