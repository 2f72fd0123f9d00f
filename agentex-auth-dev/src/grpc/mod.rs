//! The SpiceDB gRPC endpoint on TCP: the whole `PermissionsService` and
//! `SchemaService`, so a stock SpiceDB client can do everything here that it
//! does against a real SpiceDB.
//!
//! The embedded library serves only the streaming RPCs as real gRPC (on its
//! unix socket) and the unary ones only through its FFI. This endpoint joins
//! the two behind one port:
//!
//! - **unary calls** (`WriteRelationships`, `DeleteRelationships`,
//!   `CheckPermission`, `CheckBulkPermissions`, `ExpandPermissionTree`,
//!   `ReadSchema`, `WriteSchema`) are decoded, sent through the FFI as
//!   protobuf bytes, and answered with the library's response, or with the
//!   status SpiceDB returned (see [`status::from_engine`]);
//! - **streaming calls** (`ReadRelationships`, `LookupResources`,
//!   `LookupSubjects`) are forwarded to the engine's socket with a tonic
//!   client, and the stream is relayed as it comes;
//! - **anything else** (`WatchService`, `ExperimentalService`, the bulk
//!   import/export calls, the other `SchemaService` calls) is forwarded to the
//!   socket as it is, request and response bodies streamed through, so it
//!   behaves exactly as the engine makes it: `Watch` works, and
//!   `ExportBulkRelationships` answers `UNIMPLEMENTED`, on which the product's
//!   reconcile falls back to `ReadRelationships`.
//!
//! Writes go through the engine's one-writer lock, the same as the HTTP API's
//! (see [`Engine`]): the embedded engine loses concurrent writes otherwise.
//! `WriteRelationships` and `DeleteRelationships` take the same injected
//! faults as the HTTP endpoints (endpoints `write_relationships` and
//! `delete_relationships`, or `all`), in gRPC terms (see [`status::injected`]).
//! With a token configured, every call must carry `authorization: Bearer
//! <token>` (else `UNAUTHENTICATED`); without one, every caller is accepted.
//! A client's `grpc-timeout` is honoured: past it the call answers
//! `DEADLINE_EXCEEDED` (a write already sent to the engine still commits,
//! as on a real server).

pub mod status;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::AUTHORIZATION;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use prost::Message;
use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
use spicedb_grpc_tonic::v1::{
    CheckBulkPermissionsRequest, CheckBulkPermissionsResponse, CheckPermissionRequest,
    CheckPermissionResponse, DeleteRelationshipsRequest, DeleteRelationshipsResponse,
    ExpandPermissionTreeRequest, ExpandPermissionTreeResponse, LookupResourcesRequest,
    LookupResourcesResponse, LookupSubjectsRequest, LookupSubjectsResponse,
    ReadRelationshipsRequest, ReadRelationshipsResponse, ReadSchemaRequest, ReadSchemaResponse,
    WriteRelationshipsRequest, WriteRelationshipsResponse, WriteSchemaRequest, WriteSchemaResponse,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::{Status, Streaming};
use tonic_prost::ProstCodec;
use tower::ServiceExt;

use crate::engine::Engine;
use crate::faults::{Endpoint, Fault, FaultInjector};
use crate::ffi::Rpc;
use crate::schema::{LiveSchema, Schema};
use crate::stats::StatsRecorder;
use crate::token::BearerToken;

/// The largest message decoded or encoded: gRPC's customary 4 MiB, what a
/// real SpiceDB accepts by default. Bodies forwarded untouched are bounded
/// by the engine's own gRPC server, which has the same default.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// What every call shares.
#[derive(Clone)]
pub struct GrpcState {
    pub engine: Engine,
    pub schema: LiveSchema,
    pub faults: Arc<FaultInjector>,
    pub stats: Arc<StatsRecorder>,
    pub token: BearerToken,
    /// Turns true at shutdown, cutting injected sleeps short.
    pub shutdown: watch::Receiver<bool>,
}

/// Serves HTTP/2 gRPC on `listener` until `shutdown` turns true. Open
/// connections are cut when it stops, so no call outlives the engine by more
/// than the call itself.
pub fn spawn(
    listener: TcpListener,
    state: GrpcState,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Owning the connection tasks here means dropping the set at shutdown
        // aborts them.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        let service = TowerToHyperService::new(GrpcService {
                            state: state.clone(),
                        });
                        connections.spawn(async move {
                            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tcp), service)
                                .await;
                            if let Err(error) = served {
                                tracing::debug!(%peer, %error, "grpc: connection ended");
                            }
                        });
                    }
                    Err(error) => tracing::warn!(%error, "grpc: accept failed"),
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}

/// One gRPC call: authenticate, route by path, answer within the client's
/// deadline. Errors are gRPC statuses in the response, never a failed
/// service, so the connection keeps serving.
#[derive(Clone)]
struct GrpcService {
    state: GrpcState,
}

type Answer = http::Response<Body>;

impl tower::Service<http::Request<Incoming>> for GrpcService {
    type Response = Answer;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            if !state.token.accepts(request.headers().get(AUTHORIZATION)) {
                return Ok(Status::unauthenticated("missing or invalid bearer token").into_http());
            }
            let answer = match status::deadline(request.headers()) {
                Some(deadline) => tokio::time::timeout(deadline, state.route(request))
                    .await
                    .unwrap_or_else(|_| Status::deadline_exceeded("deadline exceeded").into_http()),
                None => state.route(request).await,
            };
            Ok(answer)
        })
    }
}

impl GrpcState {
    async fn route(self, request: http::Request<Incoming>) -> Answer {
        let path = request.uri().path().to_owned();
        let Some(method) = path.strip_prefix("/authzed.api.v1.") else {
            return self.forward(request).await;
        };
        match method {
            "PermissionsService/WriteRelationships" => {
                unary(
                    self,
                    request,
                    |state, call: WriteRelationshipsRequest| async move {
                        state
                            .faulted_write(Endpoint::WriteRelationships, || {
                                state.ffi::<_, WriteRelationshipsResponse>(
                                    Rpc::WriteRelationships,
                                    call,
                                )
                            })
                            .await
                    },
                )
                .await
            }
            "PermissionsService/DeleteRelationships" => {
                unary(
                    self,
                    request,
                    |state, call: DeleteRelationshipsRequest| async move {
                        state
                            .faulted_write(Endpoint::DeleteRelationships, || {
                                state.ffi::<_, DeleteRelationshipsResponse>(
                                    Rpc::DeleteRelationships,
                                    call,
                                )
                            })
                            .await
                    },
                )
                .await
            }
            "PermissionsService/CheckPermission" => {
                unary(
                    self,
                    request,
                    |state, call: CheckPermissionRequest| async move {
                        state
                            .ffi::<_, CheckPermissionResponse>(Rpc::CheckPermission, call)
                            .await
                    },
                )
                .await
            }
            "PermissionsService/CheckBulkPermissions" => {
                unary(
                    self,
                    request,
                    |state, call: CheckBulkPermissionsRequest| async move {
                        state
                            .ffi::<_, CheckBulkPermissionsResponse>(Rpc::CheckBulkPermissions, call)
                            .await
                    },
                )
                .await
            }
            "PermissionsService/ExpandPermissionTree" => {
                unary(
                    self,
                    request,
                    |state, call: ExpandPermissionTreeRequest| async move {
                        state
                            .ffi::<_, ExpandPermissionTreeResponse>(Rpc::ExpandPermissionTree, call)
                            .await
                    },
                )
                .await
            }
            "SchemaService/ReadSchema" => {
                unary(self, request, |state, call: ReadSchemaRequest| async move {
                    state
                        .ffi::<_, ReadSchemaResponse>(Rpc::ReadSchema, call)
                        .await
                })
                .await
            }
            "SchemaService/WriteSchema" => {
                unary(
                    self,
                    request,
                    |state, call: WriteSchemaRequest| async move {
                        let text = call.schema.clone();
                        let response = state
                            .ffi::<_, WriteSchemaResponse>(Rpc::WriteSchema, call)
                            .await?;
                        // The HTTP API judges types and operations by this.
                        state.schema.replace(Schema::parse(&text));
                        Ok(response)
                    },
                )
                .await
            }
            "PermissionsService/ReadRelationships" => {
                relay::<ReadRelationshipsRequest, ReadRelationshipsResponse, _, _>(
                    self,
                    request,
                    |mut client, call| async move { client.read_relationships(call).await },
                )
                .await
            }
            "PermissionsService/LookupResources" => {
                relay::<LookupResourcesRequest, LookupResourcesResponse, _, _>(
                    self,
                    request,
                    |mut client, call| async move { client.lookup_resources(call).await },
                )
                .await
            }
            "PermissionsService/LookupSubjects" => {
                relay::<LookupSubjectsRequest, LookupSubjectsResponse, _, _>(
                    self,
                    request,
                    |mut client, call| async move { client.lookup_subjects(call).await },
                )
                .await
            }
            _ => self.forward(request).await,
        }
    }

    /// One unary call through the FFI.
    async fn ffi<Req: Message, Resp: Message + Default>(
        &self,
        rpc: Rpc,
        call: Req,
    ) -> Result<Resp, Status> {
        let bytes = self
            .engine
            .call(rpc, call.encode_to_vec())
            .await
            .map_err(status::from_engine)?;
        Resp::decode(bytes.as_slice())
            .map_err(|error| Status::internal(format!("cannot decode SpiceDB response: {error}")))
    }

    /// A write under fault injection, drawing once per call as the HTTP side
    /// does: the fault answers before anything is written, except
    /// applied-then-503, which writes and then answers `UNAVAILABLE`.
    /// Every outcome is counted under `endpoint` by its code name (`"OK"`,
    /// `"UNAVAILABLE"`, ...), the two faults that are not plain answers by
    /// kind (`"hang"`, `"applied_then_503"`), as on HTTP.
    async fn faulted_write<Resp, F, Fut>(
        &self,
        endpoint: Endpoint,
        write: F,
    ) -> Result<Resp, Status>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Resp, Status>>,
    {
        let decision = self.faults.decide(endpoint);
        let record = |outcome: &str| self.stats.record(endpoint, outcome);
        if decision.unauthorized {
            record(status::code_name(tonic::Code::Unauthenticated));
            return Err(Status::unauthenticated("unauthorized (injected)"));
        }
        self.pause(decision.latency).await;
        match decision.fault {
            Some(Fault::Hang) => {
                // Counted before the sleep: the client's deadline usually
                // ends the call first.
                record("hang");
                self.pause(decision.hang).await;
                return Err(status::injected(Fault::Hang, decision.retry_after_secs));
            }
            Some(
                fault @ (Fault::Status500
                | Fault::Status502
                | Fault::Status503
                | Fault::RateLimited),
            ) => {
                let answer = status::injected(fault, decision.retry_after_secs);
                record(status::code_name(answer.code()));
                return Err(answer);
            }
            Some(Fault::AppliedThen503) | None => {}
        }
        match write().await {
            Ok(_) if decision.fault == Some(Fault::AppliedThen503) => {
                self.stats.write_applied();
                record("applied_then_503");
                Err(status::injected(
                    Fault::AppliedThen503,
                    decision.retry_after_secs,
                ))
            }
            Ok(response) => {
                self.stats.write_applied();
                record(status::code_name(tonic::Code::Ok));
                Ok(response)
            }
            Err(error) => {
                record(status::code_name(error.code()));
                Err(error)
            }
        }
    }

    /// Sleeps, unless the server shuts down first.
    async fn pause(&self, duration: Duration) {
        if duration.is_zero() {
            return;
        }
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
    }

    /// Sends the call to the engine's socket untouched and relays its answer.
    async fn forward(self, request: http::Request<Incoming>) -> Answer {
        let channel = self.engine.streaming_channel();
        match channel.oneshot(request.map(Body::new)).await {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%error, "grpc: cannot reach the SpiceDB socket");
                Status::unavailable(format!("cannot reach SpiceDB: {error}")).into_http()
            }
        }
    }
}

fn codec<Req, Resp>() -> tonic::server::Grpc<ProstCodec<Resp, Req>>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
{
    tonic::server::Grpc::new(ProstCodec::default())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Decodes a unary call, runs `handle`, encodes its answer.
async fn unary<Req, Resp, F, Fut>(
    state: GrpcState,
    request: http::Request<Incoming>,
    handle: F,
) -> Answer
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
    F: FnOnce(GrpcState, Req) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let service = tower::service_fn(move |call: tonic::Request<Req>| {
        let answer = handle.clone()(state.clone(), call.into_inner());
        async move { answer.await.map(tonic::Response::new) }
    });
    codec::<Req, Resp>().unary(service, request).await
}

/// Decodes a server-streaming call, sends it to the engine's socket with
/// `call`, and relays the engine's stream as it comes.
async fn relay<Req, Resp, F, Fut>(
    state: GrpcState,
    request: http::Request<Incoming>,
    call: F,
) -> Answer
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Default + Send + 'static,
    F: FnOnce(PermissionsServiceClient<Channel>, Req) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<tonic::Response<Streaming<Resp>>, Status>> + Send + 'static,
{
    let channel = state.engine.streaming_channel();
    let service = tower::service_fn(move |request: tonic::Request<Req>| {
        let client = PermissionsServiceClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let answer = call.clone()(client, request.into_inner());
        async move {
            answer
                .await
                .map(|response| tonic::Response::new(response.into_inner()))
        }
    });
    codec::<Req, Resp>()
        .server_streaming(service, request)
        .await
}
