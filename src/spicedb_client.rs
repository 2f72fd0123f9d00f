//! The SpiceDB client of the SpiceDB delivery target: the calls it makes
//! (`WriteRelationships`, `DeleteRelationships`, one resource's
//! `ReadRelationships`, `ReadSchema`) and nothing else. What an answer
//! *means* for a row is the delivery module's job (`delivery::spicedb`).
//!
//! Every call is bounded: a deadline per call (sent as `grpc-timeout` and
//! enforced here too), messages of at most 4 MiB each way, and a read of
//! one resource's relationships stops at [`MAX_READ`].

use std::fmt;
use std::time::Duration;

use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
use spicedb_grpc_tonic::v1::schema_service_client::SchemaServiceClient;
use spicedb_grpc_tonic::v1::{
    CheckPermissionRequest, Consistency, DeleteRelationshipsRequest, ObjectReference,
    ReadRelationshipsRequest, ReadSchemaRequest, Relationship, RelationshipFilter,
    RelationshipUpdate, SubjectReference, WriteRelationshipsRequest,
    check_permission_response::Permissionship, consistency::Requirement,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::display;

/// The largest message sent or accepted (SpiceDB's own default).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The most relationships one resource's read returns. A resource with
/// more is not one a mapping describes (shares by the thousand); the read
/// is refused rather than held in memory.
pub const MAX_READ: usize = 10_000;

/// The preshared key. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct SpiceDbToken(String);

impl SpiceDbToken {
    pub fn new(token: impl Into<String>) -> Option<Self> {
        let token = token.into().trim().to_string();
        (!token.is_empty()).then_some(SpiceDbToken(token))
    }
}

impl fmt::Debug for SpiceDbToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpiceDbToken(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpiceDbClientError {
    /// The endpoint is shown redacted ([`display::redact_url`]): a
    /// password in it never reaches a terminal or a log.
    #[error("invalid SpiceDB endpoint {endpoint:?}: {error}")]
    BadEndpoint { endpoint: String, error: String },
    #[error("the SpiceDB token is not a valid header value")]
    BadToken,
    #[error("invalid SpiceDB CA certificates: {0}")]
    BadCa(String),
    #[error("cannot use the SpiceDB CA file {0}: {1}")]
    CaFile(String, String),
}

/// A failed call, before any interpretation.
#[derive(Debug, Clone, PartialEq)]
pub struct CallError {
    pub code: tonic::Code,
    pub message: String,
    /// `grpc-retry-pushback-ms`, when the server sent one.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", code_name(self.code))?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> Self {
        let retry_after = status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis);
        // SpiceDB's (or a proxy's) own text: it reaches `last_error`, a log
        // line and a terminal, so it is escaped and bounded.
        let message = display::line(status.message(), 300);
        CallError {
            code: status.code(),
            message,
            retry_after,
        }
    }
}

/// gRPC's own name of a code (`UNAVAILABLE`), as SpiceDB documents them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A pooled gRPC channel to one SpiceDB.
#[derive(Clone)]
pub struct SpiceDbClient {
    channel: Channel,
    authorization: Option<MetadataValue<Ascii>>,
    timeout: Duration,
    endpoint: String,
}

impl fmt::Debug for SpiceDbClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiceDbClient")
            .field("endpoint", &display::redact_url(&self.endpoint))
            .finish_non_exhaustive()
    }
}

impl SpiceDbClient {
    /// A client for `endpoint` (`http://host:port`, or `https://` for TLS).
    /// Connects lazily, like the agentex-auth client: a worker starts while
    /// SpiceDB is down, and its rows wait behind the circuit.
    pub fn new(
        endpoint: &str,
        token: Option<SpiceDbToken>,
        request_timeout: Duration,
    ) -> Result<Self, SpiceDbClientError> {
        Self::with_ca(endpoint, token, request_timeout, None)
    }

    /// [`SpiceDbClient::new`], trusting `ca_pem` (PEM certificates) for an
    /// `https` endpoint besides the system's roots.
    pub fn with_ca(
        endpoint: &str,
        token: Option<SpiceDbToken>,
        request_timeout: Duration,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, SpiceDbClientError> {
        let bad = |error: String| SpiceDbClientError::BadEndpoint {
            endpoint: display::redact_url(endpoint),
            error: display::error_line(&error),
        };
        let url = url::Url::parse(endpoint).map_err(|e| bad(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(bad("expected http(s)://host:port".into()));
        }
        let builder = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(request_timeout)
            .timeout(request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(request_timeout);
        if url.scheme() == "https"
            && let Some(pem) = ca_pem
        {
            check_ca_pem(pem).map_err(SpiceDbClientError::BadCa)?;
        }
        let builder = tls(builder, &url, ca_pem).map_err(bad)?;
        let channel = builder.connect_lazy();
        let authorization = token
            .map(|t| {
                format!("Bearer {}", t.0)
                    .parse::<MetadataValue<Ascii>>()
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
                    .map_err(|_| SpiceDbClientError::BadToken)
            })
            .transpose()?;
        Ok(SpiceDbClient {
            channel,
            authorization,
            timeout: request_timeout,
            endpoint: endpoint.to_string(),
        })
    }

    /// The endpoint as it may be shown (no user-info, escaped).
    pub fn endpoint(&self) -> String {
        display::redact_url(&self.endpoint)
    }

    /// The deadline of one call (`--request-timeout`).
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    fn permissions(&self) -> PermissionsServiceClient<Channel> {
        PermissionsServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// One `WriteRelationships`: every update applied, or none. Returns the
    /// ZedToken of the write.
    pub async fn write(&self, updates: Vec<RelationshipUpdate>) -> Result<String, CallError> {
        let request = self.request(WriteRelationshipsRequest {
            updates,
            ..Default::default()
        });
        let response = self.permissions().write_relationships(request).await?;
        Ok(response
            .into_inner()
            .written_at
            .map(|t| t.token)
            .unwrap_or_default())
    }

    /// One `DeleteRelationships` by filter (deleting nothing succeeds).
    /// Returns the ZedToken of the delete.
    pub async fn delete(&self, filter: RelationshipFilter) -> Result<String, CallError> {
        let request = self.request(DeleteRelationshipsRequest {
            relationship_filter: Some(filter),
            ..Default::default()
        });
        let response = self.permissions().delete_relationships(request).await?;
        Ok(response
            .into_inner()
            .deleted_at
            .map(|t| t.token)
            .unwrap_or_default())
    }

    /// Every relationship of one resource, fully consistent.
    pub async fn read_resource(
        &self,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Vec<Relationship>, CallError> {
        let request = self.request(ReadRelationshipsRequest {
            consistency: Some(Consistency {
                requirement: Some(Requirement::FullyConsistent(true)),
            }),
            relationship_filter: Some(RelationshipFilter {
                resource_type: resource_type.to_string(),
                optional_resource_id: resource_id.to_string(),
                ..Default::default()
            }),
            optional_limit: 0,
            optional_cursor: None,
        });
        let read = async {
            let mut stream = self
                .permissions()
                .read_relationships(request)
                .await?
                .into_inner();
            let mut out = Vec::new();
            while let Some(item) = stream.message().await? {
                if out.len() >= MAX_READ {
                    return Err(CallError {
                        code: tonic::Code::OutOfRange,
                        message: format!(
                            "{resource_type}:{resource_id} holds more than {MAX_READ} relationships"
                        ),
                        retry_after: None,
                    });
                }
                out.extend(item.relationship);
            }
            Ok(out)
        };
        // The deadline covers the whole stream, not only its first message.
        match tokio::time::timeout(self.timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(CallError {
                code: tonic::Code::DeadlineExceeded,
                message: "reading the resource's relationships timed out".into(),
                retry_after: None,
            }),
        }
    }

    /// Whether `subject` has `permission` on `resource`, fully consistent.
    /// A conditional answer (a caveat missing its context) is not a yes.
    pub async fn check(
        &self,
        resource: ObjectReference,
        permission: &str,
        subject: ObjectReference,
    ) -> Result<bool, CallError> {
        let request = self.request(CheckPermissionRequest {
            consistency: Some(Consistency {
                requirement: Some(Requirement::FullyConsistent(true)),
            }),
            resource: Some(resource),
            permission: permission.to_string(),
            subject: Some(SubjectReference {
                object: Some(subject),
                optional_relation: String::new(),
            }),
            ..Default::default()
        });
        let response = self.permissions().check_permission(request).await?;
        Ok(response.into_inner().permissionship == Permissionship::HasPermission as i32)
    }

    /// The schema text SpiceDB holds.
    pub async fn read_schema(&self) -> Result<String, CallError> {
        let request = self.request(ReadSchemaRequest {});
        let response = SchemaServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .read_schema(request)
            .await?;
        Ok(response.into_inner().schema_text)
    }
}

/// TLS for an `https` endpoint (the same set-up as reconcile's reader);
/// a CA file with an `http` endpoint is refused rather than dialled in clear.
fn tls(builder: Endpoint, url: &url::Url, ca_pem: Option<&[u8]>) -> Result<Endpoint, String> {
    match url.scheme() {
        "https" => builder
            .tls_config(tls_config(ca_pem))
            .map_err(|e| format!("TLS: {e}")),
        _ if ca_pem.is_some() => {
            Err("a CA file is set but the endpoint is http://; use https://".into())
        }
        _ => Ok(builder),
    }
}

/// The TLS every SpiceDB client of this crate uses (this one, reconcile's
/// reader): the system's roots, plus `ca_pem` (checked with
/// [`check_ca_pem`] by whoever read it).
pub fn tls_config(ca_pem: Option<&[u8]>) -> ClientTlsConfig {
    let mut tls_config = ClientTlsConfig::new().with_native_roots();
    if let Some(pem) = ca_pem {
        tls_config = tls_config.ca_certificate(Certificate::from_pem(pem));
    }
    tls_config
}

/// How many PEM certificates `pem` holds, refusing none. A CA file with no
/// certificate in it (an empty file, a key, the wrong file mounted) would
/// otherwise be accepted silently and trust nothing beyond the system's
/// roots, so a private CA's server fails every handshake with a message
/// that does not name the file.
pub fn check_ca_pem(pem: &[u8]) -> Result<usize, String> {
    match reqwest::Certificate::from_pem_bundle(pem) {
        Ok(certificates) if !certificates.is_empty() => Ok(certificates.len()),
        Ok(_) => Err("no PEM certificate in it".into()),
        Err(e) => Err(display::error_line(&e.to_string())),
    }
}

/// Reads a SpiceDB CA file (`SPICEDB_CA_FILE`) and checks that it holds a
/// certificate.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, SpiceDbClientError> {
    let shown = display::escape(&path.display().to_string()).into_owned();
    let pem = std::fs::read(path)
        .map_err(|e| SpiceDbClientError::CaFile(shown.clone(), e.to_string()))?;
    check_ca_pem(&pem).map_err(|reason| SpiceDbClientError::CaFile(shown, reason))?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_redacted_and_pushback_read() {
        assert!(!format!("{:?}", SpiceDbToken::new("s3cr3t")).contains("s3cr3t"));
        assert!(SpiceDbToken::new(" ").is_none());
        let mut status = tonic::Status::resource_exhausted("slow\ndown");
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", "1500".parse().expect("ascii"));
        let e = CallError::from(status);
        assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));
        assert_eq!(e.to_string(), "RESOURCE_EXHAUSTED: slow\\ndown");
        let e = CallError::from(tonic::Status::invalid_argument(
            "bad \u{1b}[2J\u{202e}id\r\n",
        ));
        assert_eq!(e.message, "bad \\u{1b}[2J\\u{202e}id");
    }

    #[tokio::test]
    async fn https_means_tls_and_a_ca_file_never_goes_out_in_clear() {
        let t = Duration::from_secs(1);
        assert!(SpiceDbClient::new("https://spicedb.example:50051", None, t).is_ok());
        let err = SpiceDbClient::with_ca("http://h:1", None, t, Some(b"pem"))
            .expect_err("CA file with http")
            .to_string();
        assert!(err.contains("use https://"), "{err}");
    }

    #[tokio::test]
    async fn a_ca_without_a_certificate_is_refused() {
        let t = Duration::from_secs(1);
        for pem in [
            &b""[..],
            b"not a certificate\n",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            let err = SpiceDbClient::with_ca("https://h:1", None, t, Some(pem))
                .expect_err("no certificate")
                .to_string();
            assert!(err.contains("no PEM certificate"), "{err}");
        }
    }

    #[tokio::test]
    async fn the_endpoint_is_shown_without_its_password() {
        let t = Duration::from_secs(1);
        let err = SpiceDbClient::new("http://svc:pa55word@spicedb:notaport", None, t)
            .expect_err("bad port")
            .to_string();
        assert!(!err.contains("pa55word"), "{err}");
        let client = SpiceDbClient::new("http://svc:pa55word@spicedb:50051", None, t)
            .expect("valid endpoint");
        assert!(!format!("{client:?}").contains("pa55word"));
        assert_eq!(client.endpoint(), "http://spicedb:50051/");
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        let t = Duration::from_secs(1);
        assert!(SpiceDbClient::new("localhost:50051", None, t).is_err());
        assert!(SpiceDbClient::new("grpc://h:1", None, t).is_err());
    }
}
