//! `authz-outbox ui`: the operator page without a worker, read-only, and
//! the page's settings that `run` shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{DbArgs, Secret, TargetKind, parse_secret};
use crate::reconcile::{SelectorEncoding, SpiceDbConfig, Writer};
use crate::ui::{UiConfig, UiState, UiToken};

/// The page `run` serves under /ui/ beside /metrics.
#[derive(Debug, clap::Args)]
pub struct WorkerUiArgs {
    /// Token that opens the page's actions (replay, reconcile) after a
    /// sign-in; without it the page is read-only. Compared in constant
    /// time, never logged or shown.
    #[arg(long, env = "AUTHZ_OUTBOX_UI_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub ui_token: Option<Secret>,
    /// Serve no page under /ui/ at all.
    #[arg(long, env = "AUTHZ_OUTBOX_UI_DISABLED")]
    pub no_ui: bool,
}

impl WorkerUiArgs {
    /// The page's settings, or `None` when it is switched off.
    pub fn config(
        &self,
        spicedb: Option<SpiceDbConfig>,
        target: TargetKind,
        health: Arc<crate::delivery::worker::Health>,
    ) -> Option<UiConfig> {
        if self.no_ui {
            return None;
        }
        Some(UiConfig {
            token: self
                .ui_token
                .as_ref()
                .and_then(|t| UiToken::new(t.0.clone())),
            spicedb,
            selector_encoding: SelectorEncoding::default(),
            writer: writer(target),
            health: Some(health),
        })
    }
}

pub(crate) fn writer(target: TargetKind) -> Writer {
    match target {
        TargetKind::AgentexAuth => Writer::AgentexAuth,
        TargetKind::SpiceDb => Writer::SpiceDb,
    }
}

#[derive(Debug, clap::Args)]
pub struct UiArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Address to serve the page on; loopback by default (reach it through
    /// an SSH or kubectl port-forward).
    #[arg(long, env = "AUTHZ_OUTBOX_UI_LISTEN", default_value = "127.0.0.1:9465")]
    listen: SocketAddr,
    /// SpiceDB's gRPC endpoint, read to show what it holds for a resource
    /// (optional).
    #[arg(long, env = "SPICEDB_ENDPOINT")]
    spicedb_endpoint: Option<String>,
    /// SpiceDB preshared key. Prefer the environment: a flag's value is
    /// visible in `ps`.
    #[arg(long, env = "SPICEDB_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    spicedb_token: Option<Secret>,
    /// PEM file of CA certificates trusted for an https:// SpiceDB endpoint.
    #[arg(long, env = "SPICEDB_CA_FILE")]
    spicedb_ca_file: Option<PathBuf>,
    /// How object ids in SpiceDB encode selectors (as for reconcile).
    #[arg(
        long,
        value_enum,
        env = "AUTHZ_OUTBOX_SELECTOR_ENCODING",
        default_value = "authz-outbox"
    )]
    selector_encoding: SelectorEncoding,
}

/// Serves the read-only page until SIGINT / SIGTERM. Actions are never
/// offered here: they belong to a worker started with a UI token.
pub async fn ui_command(args: UiArgs) -> anyhow::Result<ExitCode> {
    let ca_pem = args
        .spicedb_ca_file
        .as_deref()
        .map(crate::spicedb_client::read_ca_file)
        .transpose()?;
    let spicedb = args.spicedb_endpoint.as_ref().map(|endpoint| {
        let mut config = SpiceDbConfig::new(endpoint.clone());
        config.token = args.spicedb_token.as_ref().map(|t| t.0.clone());
        config.ca_pem = ca_pem.clone();
        config
    });
    let pool = crate::db::connect_page(&args.db.database_url.0, 4).await?;
    let mut config = UiConfig::read_only(spicedb);
    config.selector_encoding = args.selector_encoding;
    let listener = crate::http::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let app = crate::ui::router(UiState::new(pool, config));
    let cancel = CancellationToken::new();
    tokio::spawn(super::signal::cancel_on_signal(
        cancel.clone(),
        "shutdown requested; the page stops",
    ));
    tracing::info!(addr = %args.listen, "operator page (read-only) at http://{}/ui/", args.listen);
    crate::http::serve(listener, app, cancel).await;
    Ok(ExitCode::SUCCESS)
}
