//! An instant SpiceDB read side for the reconcile benchmark and its tests: the two RPCs
//! `authz-outbox reconcile` calls (`ReadRelationships` to pin a revision,
//! `ExportBulkRelationships` to stream a type), answered from relationships
//! computed on the fly, with real cursors.
//!
//! Why: the embedded engine's in-memory datastore scans a whole type for
//! every batch it serves (the cursor is applied as a filter), so reading N
//! relationships costs it O(N²) and a million keys cannot be read from it in
//! reasonable time. Like the ceiling benchmark's instant HTTP sink, this
//! source takes the authorization side out of the figure and leaves what
//! reconcile itself costs: the gRPC stream, staging into PostgreSQL, the
//! classification, the report.
//!
//! The relationships are those `reconcile::run` loads into the real engine
//! at smaller sizes, in the same shape: per key `api_key:rk-N#owner@user:…`
//! and `api_key:rk-N#parent_agent@agent:ra-M`, per task `task:rt-N#owner`
//! and `task:rt-N#parent_agent@agent:ra-M`, per agent `agent:ra-M#owner`.
//! Nothing is held in memory; a cursor is the index of the next one.
//!
//! [`Faults`] let a test break streams midway or play an older SpiceDB
//! without `ExportBulkRelationships`, to check reconcile's resume and
//! fallback paths.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use spicedb_grpc_tonic::v1::{
    Cursor, ExportBulkRelationshipsRequest, ExportBulkRelationshipsResponse, ObjectReference,
    ReadRelationshipsRequest, ReadRelationshipsResponse, Relationship, RelationshipFilter,
    SubjectReference, ZedToken,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{BoxFuture, http};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Status, body::Body};

/// The relationships the source serves.
#[derive(Debug, Clone, Copy)]
pub struct Dataset {
    pub agents: i64,
    /// Keys `rk-1 ..= rk-last_key` may have relationships …
    pub last_key: i64,
    /// … except `rk-first_missing ..= rk-last_missing`.
    pub missing: (i64, i64),
    /// Tasks `rt-1 ..= rt-tasks`, each under agent `ra-(N % agents + 1)`.
    pub tasks: i64,
}

impl Dataset {
    fn keys_with_relationships(&self) -> i64 {
        self.last_key - (self.missing.1 - self.missing.0 + 1).max(0)
    }

    /// How many relationships of `resource_type` exist.
    pub fn len(&self, resource_type: &str) -> i64 {
        match resource_type {
            "agent" => self.agents,
            "api_key" => 2 * self.keys_with_relationships(),
            "task" => 2 * self.tasks,
            _ => 0,
        }
    }

    pub fn total(&self) -> i64 {
        self.len("agent") + self.len("api_key") + self.len("task")
    }

    /// The `index`-th relationship of `resource_type`.
    pub fn get(&self, resource_type: &str, index: i64) -> Relationship {
        match resource_type {
            "agent" => relationship(
                "agent",
                format!("ra-{}", index + 1),
                "owner",
                "user",
                "bench-user".into(),
            ),
            "task" => {
                let task = index / 2 + 1;
                if index % 2 == 0 {
                    relationship(
                        "task",
                        format!("rt-{task}"),
                        "owner",
                        "user",
                        "bench-user".into(),
                    )
                } else {
                    relationship(
                        "task",
                        format!("rt-{task}"),
                        "parent_agent",
                        "agent",
                        format!("ra-{}", task % self.agents + 1),
                    )
                }
            }
            _ => {
                let mut key = index / 2 + 1;
                if key >= self.missing.0 {
                    key += self.missing.1 - self.missing.0 + 1;
                }
                if index % 2 == 0 {
                    relationship(
                        "api_key",
                        format!("rk-{key}"),
                        "owner",
                        "user",
                        "bench-user".into(),
                    )
                } else {
                    let agent = format!("ra-{}", key % self.agents + 1);
                    relationship(
                        "api_key",
                        format!("rk-{key}"),
                        "parent_agent",
                        "agent",
                        agent,
                    )
                }
            }
        }
    }
}

fn relationship(rt: &str, rid: String, relation: &str, st: &str, sid: String) -> Relationship {
    Relationship {
        resource: Some(ObjectReference {
            object_type: rt.into(),
            object_id: rid,
        }),
        relation: relation.into(),
        subject: Some(SubjectReference {
            object: Some(ObjectReference {
                object_type: st.into(),
                object_id: sid,
            }),
            optional_relation: String::new(),
        }),
        optional_caveat: None,
        optional_expires_at: None,
    }
}

const PERMISSIONS_SERVICE: &str = "authzed.api.v1.PermissionsService";
/// The batch size SpiceDB itself uses when the request names none.
const DEFAULT_BATCH: i64 = 1000;
const REVISION: &str = "bench-snapshot";

/// Misbehaviour on request.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer `ExportBulkRelationships` with UNIMPLEMENTED, as SpiceDB
    /// before 1.35 (and the embedded engine) do.
    pub export_unimplemented: bool,
    /// Break each stream with UNAVAILABLE after this many messages …
    pub break_after_messages: Option<u32>,
    /// … this many times in all.
    pub breaks: u32,
    /// Send `ReadRelationships` results without `after_result_cursor`, as
    /// some servers do for reads without a limit.
    pub omit_read_cursors: bool,
}

/// A running source; dropped, it stops serving.
pub struct ExportSource {
    pub addr: SocketAddr,
    breaks_left: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl ExportSource {
    pub async fn start(dataset: Dataset) -> anyhow::Result<ExportSource> {
        Self::start_with(dataset, Faults::default()).await
    }

    pub async fn start_with(dataset: Dataset, faults: Faults) -> anyhow::Result<ExportSource> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let breaks_left = Arc::new(AtomicU32::new(faults.breaks));
        let service = Service {
            dataset,
            export_unimplemented: faults.export_unimplemented,
            omit_read_cursors: faults.omit_read_cursors,
            breaker: Breaker {
                after: faults.break_after_messages,
                left: breaks_left.clone(),
            },
        };
        let task = tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .serve_with_incoming(service, incoming)
                .await
            {
                tracing::error!(error = %e, "bench export source stopped");
            }
        });
        Ok(ExportSource {
            addr,
            breaks_left,
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many of the requested stream breaks have not happened yet.
    pub fn breaks_left(&self) -> u32 {
        self.breaks_left.load(Ordering::SeqCst)
    }
}

/// Decides, per stream, after how many messages it breaks.
#[derive(Clone)]
struct Breaker {
    after: Option<u32>,
    left: Arc<AtomicU32>,
}

impl Breaker {
    /// Whether the stream that has sent `sent` messages breaks now (using up
    /// one of the breaks left).
    fn breaks_at(&self, sent: usize) -> bool {
        self.after
            .is_some_and(|after| sent as u64 >= u64::from(after))
            && self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }
}

/// Sends `items` in order, unless the breaker breaks the stream first.
async fn send_all<T>(
    tx: mpsc::Sender<Result<T, Status>>,
    items: impl Iterator<Item = T>,
    breaker: Breaker,
) {
    for (sent, item) in items.enumerate() {
        if breaker.breaks_at(sent) {
            let broken = Status::unavailable("bench source: stream broken on purpose");
            let _ = tx.send(Err(broken)).await;
            return;
        }
        if tx.send(Ok(item)).await.is_err() {
            return;
        }
    }
}

impl Drop for ExportSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Service {
    dataset: Dataset,
    export_unimplemented: bool,
    omit_read_cursors: bool,
    breaker: Breaker,
}

impl NamedService for Service {
    const NAME: &'static str = PERMISSIONS_SERVICE;
}

impl tower::Service<http::Request<Body>> for Service {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let dataset = self.dataset;
        let omit_cursors = self.omit_read_cursors;
        let breaker = self.breaker.clone();
        match request.uri().path() {
            "/authzed.api.v1.PermissionsService/ReadRelationships" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                let handler =
                    tower::service_fn(move |r: tonic::Request<ReadRelationshipsRequest>| {
                        let breaker = breaker.clone();
                        async move { read(dataset, r.into_inner(), omit_cursors, &breaker) }
                    });
                Ok(grpc.server_streaming(handler, request).await)
            }),
            "/authzed.api.v1.PermissionsService/ExportBulkRelationships"
                if !self.export_unimplemented =>
            {
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                    let handler = tower::service_fn(
                        move |r: tonic::Request<ExportBulkRelationshipsRequest>| {
                            let breaker = breaker.clone();
                            async move { export(dataset, r.into_inner(), &breaker) }
                        },
                    );
                    Ok(grpc.server_streaming(handler, request).await)
                })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("bench source").into_http()) }),
        }
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

fn resource_type(filter: Option<&RelationshipFilter>) -> Result<String, Status> {
    match filter {
        Some(f) if !f.resource_type.is_empty() => Ok(f.resource_type.clone()),
        _ => Err(Status::invalid_argument(
            "the bench source serves type-wide reads only",
        )),
    }
}

fn start_index(cursor: Option<Cursor>) -> Result<i64, Status> {
    match cursor {
        None => Ok(0),
        Some(c) => c
            .token
            .parse()
            .map_err(|_| Status::invalid_argument("bad cursor")),
    }
}

/// `ReadRelationships`: one relationship per message, each with the cursor
/// after it; a limit of 0 reads to the end.
fn read(
    dataset: Dataset,
    request: ReadRelationshipsRequest,
    omit_cursors: bool,
    breaker: &Breaker,
) -> Result<tonic::Response<Stream<ReadRelationshipsResponse>>, Status> {
    let rt = resource_type(request.relationship_filter.as_ref())?;
    let from = start_index(request.optional_cursor)?;
    let len = dataset.len(&rt);
    let end = match request.optional_limit {
        0 => len,
        n => (from + i64::from(n)).min(len),
    };
    let (tx, rx) = mpsc::channel(64);
    let items = (from..end).map(move |index| ReadRelationshipsResponse {
        read_at: Some(ZedToken {
            token: REVISION.into(),
        }),
        relationship: Some(dataset.get(&rt, index)),
        after_result_cursor: (!omit_cursors).then(|| Cursor {
            token: (index + 1).to_string(),
        }),
    });
    tokio::spawn(send_all(tx, items, breaker.clone()));
    Ok(tonic::Response::new(ReceiverStream::new(rx)))
}

/// `ExportBulkRelationships`: the whole type in batches, each with the
/// cursor after it.
fn export(
    dataset: Dataset,
    request: ExportBulkRelationshipsRequest,
    breaker: &Breaker,
) -> Result<tonic::Response<Stream<ExportBulkRelationshipsResponse>>, Status> {
    let rt = resource_type(request.optional_relationship_filter.as_ref())?;
    let from = start_index(request.optional_cursor)?;
    let batch = match request.optional_limit {
        0 => DEFAULT_BATCH,
        n => i64::from(n),
    };
    let len = dataset.len(&rt);
    let (tx, rx) = mpsc::channel(4);
    let starts = (from..len).step_by(batch as usize);
    let items = starts.map(move |start| {
        let end = (start + batch).min(len);
        ExportBulkRelationshipsResponse {
            after_result_cursor: Some(Cursor {
                token: end.to_string(),
            }),
            relationships: (start..end).map(|i| dataset.get(&rt, i)).collect(),
        }
    });
    tokio::spawn(send_all(tx, items, breaker.clone()));
    Ok(tonic::Response::new(ReceiverStream::new(rx)))
}
