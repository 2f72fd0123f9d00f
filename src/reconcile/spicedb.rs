//! Reading relationships straight from SpiceDB over gRPC.
//!
//! Reconcile does not trust agentex-auth to tell it what it holds: it reads
//! SpiceDB itself, read-only: one fully consistent `ReadRelationships` pins a
//! revision, then `ExportBulkRelationships` streams the whole type at exactly
//! that revision, so nothing written before the read began can be missed and
//! the batches add up to one view.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
use spicedb_grpc_tonic::v1::{
    Consistency, Cursor, ExportBulkRelationshipsRequest, ExportBulkRelationshipsResponse,
    ReadRelationshipsRequest, ReadRelationshipsResponse, Relationship, RelationshipFilter,
    ZedToken, consistency::Requirement,
};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::display;
use crate::spicedb_client::{check_ca_pem, tls_config};

/// Where SpiceDB is and how to authenticate to it.
#[derive(Clone)]
pub struct SpiceDbConfig {
    /// e.g. `http://127.0.0.1:50051`, or `https://spicedb:50051` (TLS,
    /// verified against the system's roots and `ca_pem`).
    pub endpoint: String,
    /// The preshared key, sent as `authorization: Bearer …`.
    pub token: Option<String>,
    /// Relationships per batch of the export stream.
    pub page_size: u32,
    /// PEM certificates trusted for an `https://` endpoint besides the
    /// system's roots (`SPICEDB_CA_FILE`).
    pub ca_pem: Option<Vec<u8>>,
    /// Deadline of the whole read (every type, from connect to the last
    /// batch): a server that keeps a stream open without finishing it
    /// cannot keep reconcile running forever.
    pub read_timeout: Duration,
    /// Longest wait for a call's answer or a stream's next message.
    pub message_timeout: Duration,
}

impl fmt::Debug for SpiceDbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiceDbConfig")
            .field("endpoint", &display::redact_url(&self.endpoint))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("page_size", &self.page_size)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("read_timeout", &self.read_timeout)
            .field("message_timeout", &self.message_timeout)
            .finish()
    }
}

impl SpiceDbConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        SpiceDbConfig {
            endpoint: endpoint.into(),
            token: None,
            page_size: 1000,
            ca_pem: None,
            read_timeout: Duration::from_secs(30 * 60),
            message_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpiceDbError {
    #[error("invalid SpiceDB endpoint {endpoint:?}: {error}")]
    BadEndpoint { endpoint: String, error: String },
    #[error("cannot connect to SpiceDB at {endpoint}: {error}")]
    Connect { endpoint: String, error: String },
    #[error("the SpiceDB token is not a valid header value")]
    BadToken,
    #[error("SpiceDB ReadRelationships failed: {0}")]
    Read(String),
    #[error("SpiceDB read timed out: {0}")]
    Timeout(String),
    #[error("invalid SpiceDB TLS settings: {0}")]
    Tls(String),
}

/// One relationship, flattened: `resource_type:resource_id#relation@subject_type:subject_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple {
    pub resource_type: String,
    pub resource_id: String,
    pub relation: String,
    pub subject_type: String,
    pub subject_id: String,
}

/// A connected, read-only SpiceDB client.
#[derive(Clone)]
pub struct SpiceDbReader {
    client: PermissionsServiceClient<Channel>,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    page_size: u32,
    /// When the whole read must be over.
    deadline: Instant,
    read_timeout: Duration,
    message_timeout: Duration,
}

impl SpiceDbReader {
    /// Connects; `https://` with TLS (never downgraded to clear text),
    /// `http://` in clear. The read deadline starts now.
    pub async fn connect(config: &SpiceDbConfig) -> Result<Self, SpiceDbError> {
        let started = Instant::now();
        let shown = display::redact_url(&config.endpoint);
        let bad = |error: String| SpiceDbError::BadEndpoint {
            endpoint: shown.clone(),
            error,
        };
        let uri: tonic::transport::Uri =
            config.endpoint.parse().map_err(|e| bad(format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("expected http://host:port or https://host:port".into())),
        };
        let mut endpoint = Endpoint::from(uri)
            .connect_timeout(config.message_timeout.min(Duration::from_secs(10)));
        if tls {
            if let Some(pem) = &config.ca_pem {
                check_ca_pem(pem).map_err(|e| SpiceDbError::Tls(format!("the CA file: {e}")))?;
            }
            endpoint = endpoint
                .tls_config(tls_config(config.ca_pem.as_deref()))
                .map_err(|e| SpiceDbError::Tls(error_chain(&e)))?;
        } else if config.ca_pem.is_some() {
            // A CA file says the operator expects TLS: refuse rather than
            // dial in clear.
            return Err(SpiceDbError::Tls(format!(
                "a CA file is set but the endpoint {shown} is http://; use https://"
            )));
        }
        let channel = within(started + config.read_timeout, endpoint.connect())
            .await
            .map_err(|_| SpiceDbError::Timeout(format!("connecting to {shown}")))?
            .map_err(|e| SpiceDbError::Connect {
                endpoint: shown.clone(),
                error: error_chain(&e),
            })?;
        let authorization = match &config.token {
            Some(token) if !token.is_empty() => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| SpiceDbError::BadToken)?,
            ),
            _ => None,
        };
        Ok(SpiceDbReader {
            client: PermissionsServiceClient::new(channel),
            authorization,
            page_size: config.page_size.max(1),
            deadline: started
                .checked_add(config.read_timeout)
                .unwrap_or(started + Duration::from_secs(24 * 3600)),
            read_timeout: config.read_timeout,
            message_timeout: config.message_timeout,
        })
    }

    /// Runs one step of the read (a call, a stream's next message) within
    /// the message timeout and the whole read's deadline.
    async fn step<T>(
        &self,
        what: &str,
        step: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<Result<T, tonic::Status>, SpiceDbError> {
        let by = Instant::now()
            .checked_add(self.message_timeout)
            .map_or(self.deadline, |at| at.min(self.deadline));
        within(by, step).await.map_err(|_| {
            SpiceDbError::Timeout(if by >= self.deadline {
                format!(
                    "the whole read took longer than {:?} (--spicedb-read-timeout) at {what}",
                    self.read_timeout
                )
            } else {
                format!(
                    "no answer for {:?} (--spicedb-message-timeout) at {what}",
                    self.message_timeout
                )
            })
        })
    }

    /// The pages of every relationship whose resource has type `resource_type`.
    pub fn pages(&self, resource_type: &str) -> Pages {
        Pages {
            reader: self.clone(),
            resource_type: resource_type.to_string(),
            snapshot: None,
            stream: None,
            export_supported: true,
            cursor: None,
            returned_any: false,
            resumes: 0,
            done: false,
        }
    }

    /// A request carrying the bearer token, if any.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

/// How many times in a row one read may resume from its last cursor after
/// the stream broke (a SpiceDB restart, a proxy timeout) without reading
/// anything in between, before giving up.
const MAX_RESUMES: u32 = 3;

/// All relationships of one resource type, read at one snapshot.
///
/// The first call pins a revision (one fully consistent `ReadRelationships`
/// of a single relationship names it); the relationships are then streamed
/// at exactly that revision in one call: `ExportBulkRelationships`, the API
/// SpiceDB provides for reading a whole type (batches of `page_size`, a
/// cursor after each), or, where a server does not implement it, one
/// `ReadRelationships` without a limit. Paging with repeated limited
/// `ReadRelationships` calls instead costs the datastore a fresh query per
/// page (with the in-memory datastore, a scan of the whole type per page:
/// quadratic). Memory is bounded by one batch plus the stream's flow-control
/// window; a broken stream resumes from the last cursor at the same
/// snapshot, so nothing is read twice or skipped.
pub struct Pages {
    reader: SpiceDbReader,
    resource_type: String,
    snapshot: Option<ZedToken>,
    stream: Option<Stream>,
    /// Cleared when the server answers `ExportBulkRelationships` with
    /// UNIMPLEMENTED (older SpiceDB; the embedded engine).
    export_supported: bool,
    cursor: Option<Cursor>,
    /// Whether any batch has been handed out.
    returned_any: bool,
    resumes: u32,
    done: bool,
}

enum Stream {
    Export(tonic::Streaming<ExportBulkRelationshipsResponse>),
    Read(tonic::Streaming<ReadRelationshipsResponse>),
}

impl Pages {
    /// The next batch, or `None` when the type is exhausted.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Tuple>>, SpiceDbError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let batch = match &mut self.stream {
                Some(stream) => {
                    let reader = &self.reader;
                    next_batch(reader, stream, reader.page_size as usize).await?
                }
                None => {
                    let Some(snapshot) = self.pin_snapshot().await? else {
                        self.done = true;
                        return Ok(None);
                    };
                    match self.open(snapshot).await? {
                        Ok(stream) => self.stream = Some(stream),
                        Err(status) => self.broke(status)?,
                    }
                    continue;
                }
            };
            match batch {
                Ok(Some((tuples, cursor))) => {
                    if cursor.is_some() {
                        self.cursor = cursor;
                    }
                    if !tuples.is_empty() {
                        self.resumes = 0;
                        self.returned_any = true;
                        return Ok(Some(tuples));
                    }
                }
                Ok(None) => {
                    self.done = true;
                    self.stream = None;
                }
                Err(status) => self.broke(status)?,
            }
        }
    }

    /// A failed call or a broken stream: fall back from the export, resume
    /// from the last cursor, or give up.
    fn broke(&mut self, status: tonic::Status) -> Result<(), SpiceDbError> {
        self.stream = None;
        if status.code() == tonic::Code::Unimplemented && self.export_supported {
            tracing::info!(
                "SpiceDB does not implement ExportBulkRelationships; reading with ReadRelationships"
            );
            self.export_supported = false;
            return Ok(());
        }
        // Without a cursor a resumed read starts over, which is only right
        // while nothing has been handed out yet (some servers send no cursor
        // on unlimited reads).
        let can_resume = self.cursor.is_some() || !self.returned_any;
        if resumable(&status) && can_resume && self.resumes < MAX_RESUMES {
            self.resumes += 1;
            tracing::warn!(
                resource_type = %self.resource_type,
                error = %status_line(&status),
                "SpiceDB read stream broke; resuming from the last cursor"
            );
            return Ok(());
        }
        Err(SpiceDbError::Read(status_line(&status)))
    }

    /// The revision every batch is read at: named once by a fully
    /// consistent read, so the batches add up to one consistent view that
    /// includes everything written before the read began. `None` when the
    /// type holds nothing at all.
    async fn pin_snapshot(&mut self) -> Result<Option<ZedToken>, SpiceDbError> {
        if let Some(token) = &self.snapshot {
            return Ok(Some(token.clone()));
        }
        let mut request = self.reader.request(ReadRelationshipsRequest {
            consistency: Some(Consistency {
                requirement: Some(Requirement::FullyConsistent(true)),
            }),
            relationship_filter: Some(self.filter()),
            optional_limit: 1,
            optional_cursor: None,
        });
        request.set_timeout(Duration::from_secs(30));
        let mut client = self.reader.client.clone();
        let mut stream = self
            .reader
            .step("the snapshot read", client.read_relationships(request))
            .await?
            .map_err(|s| SpiceDbError::Read(status_line(&s)))?
            .into_inner();
        let mut read_at = None;
        while let Some(item) = self
            .reader
            .step("the snapshot read", stream.message())
            .await?
            .map_err(|s| SpiceDbError::Read(status_line(&s)))?
        {
            if read_at.is_none() {
                read_at = item.read_at;
            }
        }
        self.snapshot = read_at.clone();
        Ok(read_at)
    }

    /// Opens (or re-opens, after the last cursor) the stream at `snapshot`.
    async fn open(
        &self,
        snapshot: ZedToken,
    ) -> Result<Result<Stream, tonic::Status>, SpiceDbError> {
        let consistency = Some(Consistency {
            requirement: Some(Requirement::AtExactSnapshot(snapshot)),
        });
        let mut client = self.reader.client.clone();
        if self.export_supported {
            let request = self.reader.request(ExportBulkRelationshipsRequest {
                consistency,
                optional_limit: self.reader.page_size,
                optional_cursor: self.cursor.clone(),
                optional_relationship_filter: Some(self.filter()),
            });
            let opened = self
                .reader
                .step(
                    "opening the export",
                    client.export_bulk_relationships(request),
                )
                .await?;
            Ok(opened.map(|stream| Stream::Export(stream.into_inner())))
        } else {
            let request = self.reader.request(ReadRelationshipsRequest {
                consistency,
                relationship_filter: Some(self.filter()),
                optional_limit: 0,
                optional_cursor: self.cursor.clone(),
            });
            let opened = self
                .reader
                .step("opening the read", client.read_relationships(request))
                .await?;
            Ok(opened.map(|stream| Stream::Read(stream.into_inner())))
        }
    }

    fn filter(&self) -> RelationshipFilter {
        RelationshipFilter {
            resource_type: self.resource_type.clone(),
            ..Default::default()
        }
    }
}

/// The next batch of a stream and the cursor after it; `None` at its end.
/// A `ReadRelationships` stream answers one relationship per message, so up
/// to `size` of them are gathered into one batch.
/// Each message is awaited within the reader's timeouts: a stream that
/// stalls ends the read with [`SpiceDbError::Timeout`] (the outer error);
/// a stream that breaks returns its status (the inner one) to resume from.
type Batch = Option<(Vec<Tuple>, Option<Cursor>)>;

async fn next_batch(
    reader: &SpiceDbReader,
    stream: &mut Stream,
    size: usize,
) -> Result<Result<Batch, tonic::Status>, SpiceDbError> {
    match stream {
        Stream::Export(stream) => {
            let message = match reader.step("the export stream", stream.message()).await? {
                Ok(message) => message,
                Err(status) => return Ok(Err(status)),
            };
            Ok(Ok(message.map(|batch| {
                let tuples = batch
                    .relationships
                    .into_iter()
                    .filter_map(flatten)
                    .collect();
                (tuples, batch.after_result_cursor)
            })))
        }
        Stream::Read(stream) => {
            let mut tuples = Vec::with_capacity(size);
            let mut cursor = None;
            while tuples.len() < size {
                let item = match reader.step("the read stream", stream.message()).await? {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(status) => return Ok(Err(status)),
                };
                cursor = item.after_result_cursor;
                tuples.extend(item.relationship.and_then(flatten));
            }
            if tuples.is_empty() && cursor.is_none() {
                return Ok(Ok(None));
            }
            Ok(Ok(Some((tuples, cursor))))
        }
    }
}

/// `future`, unless `deadline` passes first.
async fn within<F: Future>(
    deadline: Instant,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout_at(deadline, future).await
}

/// Errors after which the same read at the same snapshot can succeed.
fn resumable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted | Code::Cancelled
    )
}

fn flatten(r: Relationship) -> Option<Tuple> {
    let (Some(resource), Some(subject)) = (r.resource, r.subject.and_then(|s| s.object)) else {
        return None;
    };
    Some(Tuple {
        resource_type: resource.object_type,
        resource_id: resource.object_id,
        relation: r.relation,
        subject_type: subject.object_type,
        subject_id: subject.object_id,
    })
}

/// SpiceDB's (or a proxy's) own text, escaped and bounded: it reaches the
/// terminal and the log.
fn status_line(status: &tonic::Status) -> String {
    display::error_line(&format!("{:?}: {}", status.code(), status.message()))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    display::error_line(&chain(error))
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
