//! Typed SpiceDB operations over one embedded engine.
//!
//! Unary RPCs (schema write, relationship writes and deletes, checks) go
//! through the library's FFI, which blocks, so each runs on tokio's blocking
//! pool. `LookupResources` streams, and the library serves streaming RPCs only
//! as real gRPC on its unix socket, so it goes through a tonic client
//! connected to that socket.
//!
//! Reads ask for full consistency: this is a test double, and a check that
//! could miss the write the test just made (SpiceDB's default
//! `minimize_latency` reads a quantized, possibly older revision) would make
//! every test flaky for no benefit.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message;
use spicedb_grpc_tonic::v1::{
    CheckPermissionRequest, CheckPermissionResponse, Consistency, DeleteRelationshipsRequest,
    DeleteRelationshipsResponse, LookupResourcesRequest, ObjectReference, Relationship,
    RelationshipFilter, RelationshipUpdate, SubjectReference, WriteRelationshipsRequest,
    WriteRelationshipsResponse, WriteSchemaRequest, check_permission_response::Permissionship,
    consistency::Requirement, permissions_service_client::PermissionsServiceClient,
    relationship_update::Operation,
};
use tonic::transport::{Channel, Endpoint};

use crate::ffi::{FfiError, Instance, Library, Rpc};

/// Each message carries its cause, so none is also a `source` (a chain
/// printer would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Ffi(FfiError),
    #[error("cannot decode SpiceDB response: {0}")]
    Decode(prost::DecodeError),
    #[error("SpiceDB stream: {}", .0.message())]
    Grpc(tonic::Status),
    #[error("SpiceDB call was cancelled: {0}")]
    Join(tokio::task::JoinError),
    #[error("cannot reach the SpiceDB streaming socket: {0}")]
    Connect(tonic::transport::Error),
    #[error("SpiceDB rejected the schema: {0}")]
    Schema(FfiError),
    /// The caller stopped waiting (its deadline passed, or it went away)
    /// before the write reached the engine, so it was never applied.
    #[error("the write was abandoned before it started: the caller stopped waiting")]
    Abandoned,
}

macro_rules! engine_error_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for EngineError {
            fn from(error: $ty) -> Self {
                EngineError::$variant(error)
            }
        }
    )*};
}

engine_error_from!(
    Ffi(FfiError),
    Decode(prost::DecodeError),
    Grpc(tonic::Status),
    Join(tokio::task::JoinError),
    Connect(tonic::transport::Error),
);

/// An object in SpiceDB: `type:id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub object_type: String,
    pub id: String,
}

impl Object {
    pub fn new(object_type: impl Into<String>, id: impl Into<String>) -> Object {
        Object {
            object_type: object_type.into(),
            id: id.into(),
        }
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            object_type: self.object_type.clone(),
            object_id: self.id.clone(),
        }
    }

    fn subject(&self) -> SubjectReference {
        SubjectReference {
            object: Some(self.reference()),
            optional_relation: String::new(),
        }
    }
}

/// One relationship to write: `resource#relation@subject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple {
    pub resource: Object,
    pub relation: String,
    pub subject: Object,
}

/// Whether a write adds or removes its relationships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Upsert: writing an existing relationship is not an error.
    Touch,
    /// Remove: deleting a missing relationship is not an error.
    Delete,
}

/// A running embedded SpiceDB. Cheap to clone; the engine is disposed when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Engine {
    instance: Arc<Instance>,
    streaming: Channel,
    /// Serialises writes. Concurrent WriteRelationships calls through the
    /// embedded library were seen to lose writes (each answered OK, later
    /// reads missed some); one writer at a time is what SpiceDB's own
    /// datastores guarantee per transaction anyway.
    writes: Arc<std::sync::Mutex<()>>,
}

impl Engine {
    /// Starts an in-memory engine and writes `schema` into it.
    pub async fn start(library: &'static Library, schema: &str) -> Result<Engine, EngineError> {
        let instance = tokio::task::spawn_blocking(move || library.start("{}")).await??;
        let streaming = unix_channel(instance.streaming_socket().to_path_buf())?;
        let engine = Engine {
            instance: Arc::new(instance),
            streaming,
            writes: Arc::default(),
        };
        let request = WriteSchemaRequest {
            schema: schema.to_string(),
        };
        match engine.call(Rpc::WriteSchema, request.encode_to_vec()).await {
            Err(EngineError::Ffi(error)) => return Err(EngineError::Schema(error)),
            other => other?,
        };
        Ok(engine)
    }

    /// Holds the one-writer lock until the guard drops: every write waits,
    /// as behind a slow transaction. For tests of writes whose caller gives
    /// up while they wait.
    pub fn hold_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A channel to the engine's streaming socket, for the RPCs the library
    /// serves only there (`ReadRelationships`, `LookupResources`, `Watch`...).
    pub fn streaming_channel(&self) -> Channel {
        self.streaming.clone()
    }

    /// Writes all tuples in one `WriteRelationships` (one transaction) and
    /// returns the ZedToken it was written at.
    pub async fn write(&self, kind: WriteKind, tuples: &[Tuple]) -> Result<String, EngineError> {
        let operation = match kind {
            WriteKind::Touch => Operation::Touch,
            WriteKind::Delete => Operation::Delete,
        };
        let updates = tuples
            .iter()
            .map(|tuple| RelationshipUpdate {
                operation: operation as i32,
                relationship: Some(Relationship {
                    resource: Some(tuple.resource.reference()),
                    relation: tuple.relation.clone(),
                    subject: Some(tuple.subject.subject()),
                    optional_caveat: None,
                    optional_expires_at: None,
                }),
            })
            .collect();
        let request = WriteRelationshipsRequest {
            updates,
            ..Default::default()
        };
        let bytes = self
            .call(Rpc::WriteRelationships, request.encode_to_vec())
            .await?;
        let response = WriteRelationshipsResponse::decode(bytes.as_slice())?;
        Ok(response.written_at.map(|t| t.token).unwrap_or_default())
    }

    /// Deletes every relationship whose resource is `resource` and returns the
    /// ZedToken it was deleted at. Deleting nothing succeeds.
    pub async fn delete_resource(&self, resource: &Object) -> Result<String, EngineError> {
        let request = DeleteRelationshipsRequest {
            relationship_filter: Some(RelationshipFilter {
                resource_type: resource.object_type.clone(),
                optional_resource_id: resource.id.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = self
            .call(Rpc::DeleteRelationships, request.encode_to_vec())
            .await?;
        let response = DeleteRelationshipsResponse::decode(bytes.as_slice())?;
        Ok(response.deleted_at.map(|t| t.token).unwrap_or_default())
    }

    /// Whether `subject` has `permission` on `resource`. A conditional
    /// (caveated) answer counts as denied: this schema has no caveats.
    pub async fn check(
        &self,
        resource: &Object,
        permission: &str,
        subject: &Object,
    ) -> Result<bool, EngineError> {
        let request = CheckPermissionRequest {
            consistency: Some(fully_consistent()),
            resource: Some(resource.reference()),
            permission: permission.to_string(),
            subject: Some(subject.subject()),
            ..Default::default()
        };
        let bytes = self
            .call(Rpc::CheckPermission, request.encode_to_vec())
            .await?;
        let response = CheckPermissionResponse::decode(bytes.as_slice())?;
        Ok(response.permissionship == Permissionship::HasPermission as i32)
    }

    /// The ids of every `resource_type` on which `subject` has `permission`.
    pub async fn lookup(
        &self,
        resource_type: &str,
        permission: &str,
        subject: &Object,
    ) -> Result<Vec<String>, EngineError> {
        let request = LookupResourcesRequest {
            consistency: Some(fully_consistent()),
            resource_object_type: resource_type.to_string(),
            permission: permission.to_string(),
            subject: Some(subject.subject()),
            ..Default::default()
        };
        let mut client = PermissionsServiceClient::new(self.streaming.clone());
        let mut stream = client.lookup_resources(request).await?.into_inner();
        let mut ids = Vec::new();
        while let Some(item) = stream.message().await? {
            ids.push(item.resource_object_id);
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Calls a unary RPC with an encoded request, off the async threads.
    /// Writes (relationships and schema) take the one-writer lock, whoever
    /// sends them: the HTTP API, `bulk_touch` and the gRPC endpoint alike.
    pub async fn call(&self, rpc: Rpc, request: Vec<u8>) -> Result<Vec<u8>, EngineError> {
        let instance = Arc::clone(&self.instance);
        let writes = Arc::clone(&self.writes);
        let is_write = matches!(
            rpc,
            Rpc::WriteRelationships | Rpc::DeleteRelationships | Rpc::WriteSchema
        );
        // Real SpiceDB runs a write under its request's context: once the
        // `grpc-timeout` deadline passes or the client resets the stream, a
        // write that has not started is never applied. Here writes queue
        // for one lock on the blocking pool, which outlives the dropped
        // request; without this check a write whose caller gave up seconds
        // ago could land after the writes that followed it, which no real
        // server does.
        let wanted = Arc::new(AtomicBool::new(true));
        let _abandon_on_drop = AbandonOnDrop(Arc::clone(&wanted));
        let bytes = tokio::task::spawn_blocking(move || {
            let _one_writer = is_write.then(|| writes.lock().unwrap_or_else(|p| p.into_inner()));
            if is_write && !wanted.load(Ordering::SeqCst) {
                return Err(EngineError::Abandoned);
            }
            instance.call(rpc, &request).map_err(EngineError::from)
        })
        .await??;
        Ok(bytes)
    }
}

/// Marks its call abandoned when the future awaiting it is dropped (by a
/// deadline or a client that went away) or has its answer.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn fully_consistent() -> Consistency {
    Consistency {
        requirement: Some(Requirement::FullyConsistent(true)),
    }
}

/// A lazily connecting gRPC channel to a unix socket. The URI is a
/// placeholder: the connector ignores it and always dials the socket.
fn unix_channel(socket: PathBuf) -> Result<Channel, EngineError> {
    let endpoint = Endpoint::try_from("http://[::1]:50051")?;
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })),
    )
}
