//! `agentex-auth-dev`: a stand-in for agentex-auth backed by a real SpiceDB
//! engine, with fault injection.
//!
//! It speaks the agentex-auth HTTP contract (`/v1/authz/register`,
//! `deregister`, `check`, `search`, `grant`, `revoke`) on top of an embedded,
//! in-memory SpiceDB: the real server, built as a C shared library
//! (`libspicedb.so`) and loaded at run time, so the product binary never links
//! it. On a TCP endpoint it also serves SpiceDB's own gRPC API, the whole
//! `PermissionsService` and `SchemaService`, as any SpiceDB would. Faults
//! (5xx, 429, hangs, writes that commit but answer 503, latency, 401) are
//! injected from a seeded RNG on the HTTP endpoints and the gRPC writes, so a
//! failing run can be replayed. An optional bearer token guards both ports.
//! Selectors are stored in the `authz-outbox` object-id encoding (see the
//! README), so `run-schedule::a1::s1` is a valid selector.
//!
//! The library comes from `scripts/fetch-spicedb.sh`:
//!
//! ```sh
//! export SPICEDB_LIBRARY_PATH=$(scripts/fetch-spicedb.sh)
//! ```
//!
//! # In a test
//!
//! ```no_run
//! use agentex_auth_dev::{DevServer, DevServerConfig, Fault, FaultRates, Faults};
//!
//! # async fn demo() -> Result<(), agentex_auth_dev::DevServerError> {
//! let server = DevServer::start(DevServerConfig::ephemeral()).await?;
//! let register = format!("{}/v1/authz/register", server.base_url());
//! // ... drive the code under test against `register` ...
//!
//! // Then make every register commit but answer 503:
//! server.set_faults(Faults {
//!     seed: Some(42),
//!     all: FaultRates::always(Fault::AppliedThen503),
//!     ..Faults::none()
//! });
//! assert_eq!(server.stats().writes_applied, 0);
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Each [`DevServer`] runs its own engine (its own datastore and socket);
//! several can run in one process. The library itself is loaded once per
//! process and never unloaded.

mod engine;
mod faults;
mod ffi;
mod grpc;
mod http;
mod schema;
mod stats;
mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::engine::EngineError;
pub use crate::faults::{Endpoint, Fault, FaultRates, Faults};
pub use crate::ffi::{FfiError, LIBRARY_PATH_ENV, SETUP_COMMAND};
pub use crate::grpc::MAX_MESSAGE_BYTES;
pub use crate::http::MAX_BODY_BYTES;
pub use crate::schema::DEFAULT_SCHEMA;
pub use crate::stats::Stats;

use crate::engine::{Engine, Object, Tuple, WriteKind};
use crate::faults::FaultInjector;
use crate::ffi::Library;
use crate::schema::{LiveSchema, Schema};
use crate::stats::StatsRecorder;
use crate::token::BearerToken;

/// How to start a [`DevServer`].
#[derive(Clone)]
pub struct DevServerConfig {
    /// The HTTP (agentex-auth contract) address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The SpiceDB gRPC address; port 0 picks a free one.
    pub grpc_listen: SocketAddr,
    /// `libspicedb.so`; `None` reads `SPICEDB_LIBRARY_PATH`. Only the first
    /// server of a process loads the library; later ones reuse it.
    pub library_path: Option<PathBuf>,
    /// The SpiceDB schema text; defaults to `agentex-auth-dev/schema.zed`.
    pub schema: String,
    pub faults: Faults,
    /// The bearer token every authz request (HTTP `Authorization: Bearer
    /// …`) and every gRPC call (`authorization: Bearer …` metadata) must
    /// carry; refused with 401 / `UNAUTHENTICATED`. `None` (or empty)
    /// accepts every caller. `/healthz` and `/_dev` never ask for it.
    pub token: Option<String>,
}

/// Never prints the token.
impl std::fmt::Debug for DevServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevServerConfig")
            .field("listen", &self.listen)
            .field("grpc_listen", &self.grpc_listen)
            .field("library_path", &self.library_path)
            .field("schema", &self.schema)
            .field("faults", &self.faults)
            .field("token", &BearerToken::new(self.token.as_deref()))
            .finish()
    }
}

impl Default for DevServerConfig {
    /// The binary's defaults: HTTP on 127.0.0.1:8181, gRPC on 127.0.0.1:50051.
    fn default() -> Self {
        DevServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8181)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            library_path: None,
            schema: DEFAULT_SCHEMA.to_string(),
            faults: Faults::none(),
            token: None,
        }
    }
}

impl DevServerConfig {
    /// Both endpoints on 127.0.0.1 with ports the OS picks: for tests.
    pub fn ephemeral() -> Self {
        DevServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..DevServerConfig::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    /// The library is missing or unusable; the message names the setup
    /// command.
    #[error(transparent)]
    Library(#[from] FfiError),
    // Causes below are part of the message, not a `source` as well, so a
    // chain printer (`{:#}`) says each thing once.
    #[error("cannot start SpiceDB: {0}")]
    Engine(EngineError),
    #[error("cannot listen on {addr} ({what}): {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("invalid fault configuration: {0}")]
    Faults(String),
}

impl From<EngineError> for DevServerError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Ffi(error) => DevServerError::Library(error),
            error => DevServerError::Engine(error),
        }
    }
}

/// A running agentex-auth stand-in. Stop it with [`DevServer::shutdown`];
/// dropping it leaves the server running until the tokio runtime ends.
pub struct DevServer {
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    faults: Arc<FaultInjector>,
    stats: Arc<StatsRecorder>,
    shutdown: watch::Sender<bool>,
    http_task: JoinHandle<()>,
    grpc_task: JoinHandle<()>,
    engine: Engine,
}

impl DevServer {
    /// Loads the library (once per process), starts an in-memory SpiceDB,
    /// writes the schema, and serves HTTP and gRPC.
    pub async fn start(cfg: DevServerConfig) -> Result<DevServer, DevServerError> {
        cfg.faults.validate().map_err(DevServerError::Faults)?;
        let library = {
            let path = cfg.library_path.clone();
            tokio::task::spawn_blocking(move || Library::get(path.as_deref()))
                .await
                .map_err(EngineError::from)??
        };
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|error| DevServerError::Bind { what, addr, error })
        };
        let http_listener = bind("http", cfg.listen).await?;
        let grpc_listener = bind("grpc", cfg.grpc_listen).await?;
        let local = |listener: &TcpListener, what, addr| {
            listener
                .local_addr()
                .map_err(|error| DevServerError::Bind { what, addr, error })
        };
        let http_addr = local(&http_listener, "http", cfg.listen)?;
        let grpc_addr = local(&grpc_listener, "grpc", cfg.grpc_listen)?;

        let engine = Engine::start(library, &cfg.schema).await?;
        let faults = Arc::new(FaultInjector::new(cfg.faults));
        let stats = Arc::new(StatsRecorder::default());
        let (shutdown, shutdown_rx) = watch::channel(false);

        let schema = LiveSchema::new(Schema::parse(&cfg.schema));
        let token = BearerToken::new(cfg.token.as_deref());
        let grpc_task = grpc::spawn(
            grpc_listener,
            grpc::GrpcState {
                engine: engine.clone(),
                schema: schema.clone(),
                faults: Arc::clone(&faults),
                stats: Arc::clone(&stats),
                token: token.clone(),
                shutdown: shutdown_rx.clone(),
            },
            shutdown_rx.clone(),
        );
        let app = http::router(http::AppState {
            engine: engine.clone(),
            schema,
            token,
            faults: Arc::clone(&faults),
            stats: Arc::clone(&stats),
            shutdown: shutdown_rx.clone(),
        });
        let http_task = tokio::spawn(async move {
            let mut stop = shutdown_rx;
            let result = axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "http server failed");
            }
        });
        tracing::info!(
            http = %http_addr,
            grpc = %grpc_addr,
            library = %library.path().display(),
            "agentex-auth-dev listening"
        );
        Ok(DevServer {
            http_addr,
            grpc_addr,
            faults,
            stats,
            shutdown,
            http_task,
            grpc_task,
            engine,
        })
    }

    /// `http://127.0.0.1:PORT`: the agentex-auth base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// `http://127.0.0.1:PORT`: the SpiceDB gRPC endpoint (`PermissionsService`,
    /// `SchemaService`, and whatever else the engine serves, `Watch` included).
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Replaces the fault configuration; a `seed` in it reseeds the RNG.
    /// An invalid configuration (probabilities outside 0..=1 or summing to
    /// more than 1) is rejected.
    pub fn try_set_faults(&self, faults: Faults) -> Result<(), DevServerError> {
        faults.validate().map_err(DevServerError::Faults)?;
        self.faults.set(faults);
        Ok(())
    }

    /// Replaces the fault configuration; a `seed` in it reseeds the RNG.
    ///
    /// # Panics
    /// On an invalid configuration: this is for tests, where a typo in the
    /// rates should fail loudly. Use [`DevServer::try_set_faults`] otherwise.
    pub fn set_faults(&self, faults: Faults) {
        if let Err(error) = self.try_set_faults(faults) {
            panic!("{error}");
        }
    }

    pub fn faults(&self) -> Faults {
        self.faults.get()
    }

    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    pub fn reset_stats(&self) {
        self.stats.reset();
    }

    /// Touches many relationships fast, for loading large fixtures (e.g. a
    /// million tuples for a reconcile benchmark): one `WriteRelationships`
    /// per 1,000 (SpiceDB's default limit per request), straight into the
    /// engine, bypassing HTTP, faults and stats. Each item is
    /// `(resource_type, resource_id, relation, subject_type, subject_id)`.
    pub async fn bulk_touch(
        &self,
        relationships: Vec<(String, String, String, String, String)>,
    ) -> Result<(), EngineError> {
        const PER_WRITE: usize = 1000;
        let tuples: Vec<Tuple> = relationships
            .into_iter()
            .map(|(rt, rid, relation, st, sid)| Tuple {
                resource: Object::new(rt, rid),
                relation,
                subject: Object::new(st, sid),
            })
            .collect();
        for chunk in tuples.chunks(PER_WRITE) {
            self.engine.write(WriteKind::Touch, chunk).await?;
        }
        Ok(())
    }

    /// Makes every write wait until the returned guard drops, as behind a
    /// slow transaction. A write whose caller stops waiting meanwhile (its
    /// `grpc-timeout` passes, or it goes away) is then never applied, as in
    /// SpiceDB, where a write runs under its request's context.
    pub fn hold_writes(&self) -> WritesHeld<'_> {
        WritesHeld {
            _held: self.engine.hold_writes(),
        }
    }

    /// Stops serving (in-flight injected hangs end at once), then disposes
    /// the engine.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.http_task.await;
        let _ = self.grpc_task.await;
        // Disposing blocks on the engine; do it off the async threads.
        let engine = self.engine;
        let _ = tokio::task::spawn_blocking(move || drop(engine)).await;
    }

    /// Serves until `signal` completes, then shuts down: for the binary.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// See [`DevServer::hold_writes`].
pub struct WritesHeld<'a> {
    _held: std::sync::MutexGuard<'a, ()>,
}
