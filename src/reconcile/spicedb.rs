//! Reading relationships straight from SpiceDB over gRPC.
//!
//! Reconcile does not trust agentex-auth to tell it what it holds: it reads
//! SpiceDB itself, read-only, with `ReadRelationships`, page by page with the
//! cursor, every page fully consistent so nothing written before the read
//! began can be missed.

use std::time::Duration;

use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
use spicedb_grpc_tonic::v1::{
    Consistency, Cursor, ReadRelationshipsRequest, RelationshipFilter, ZedToken,
    consistency::Requirement,
};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Where SpiceDB is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct SpiceDbConfig {
    /// e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    /// The preshared key, sent as `authorization: Bearer …`.
    pub token: Option<String>,
    /// Relationships per `ReadRelationships` call.
    pub page_size: u32,
}

impl SpiceDbConfig {
    pub fn new(endpoint: impl Into<String>) -> Self {
        SpiceDbConfig {
            endpoint: endpoint.into(),
            token: None,
            page_size: 1000,
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
}

impl SpiceDbReader {
    pub async fn connect(config: &SpiceDbConfig) -> Result<Self, SpiceDbError> {
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| SpiceDbError::BadEndpoint {
                endpoint: config.endpoint.clone(),
                error: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(10));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| SpiceDbError::Connect {
                endpoint: config.endpoint.clone(),
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
        })
    }

    /// The pages of every relationship whose resource has type `resource_type`.
    pub fn pages(&self, resource_type: &str) -> Pages {
        Pages {
            reader: self.clone(),
            resource_type: resource_type.to_string(),
            cursor: None,
            snapshot: None,
            done: false,
        }
    }
}

/// Cursor paging over one resource type. Each call to [`Pages::next_page`]
/// is one `ReadRelationships` call; memory is bounded by the page size.
pub struct Pages {
    reader: SpiceDbReader,
    resource_type: String,
    cursor: Option<Cursor>,
    /// The revision the first page was read at; later pages read the same
    /// snapshot, so the pages add up to one consistent view.
    snapshot: Option<ZedToken>,
    done: bool,
}

impl Pages {
    /// The next page, or `None` when the type is exhausted.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Tuple>>, SpiceDbError> {
        if self.done {
            return Ok(None);
        }
        let snapshot = match &self.snapshot {
            Some(token) => token.clone(),
            None => {
                // Pin the snapshot: one fully consistent read of a single
                // relationship names the head revision, and every page then
                // reads exactly it. (A cursor must be replayed with the same
                // consistency, so the pages cannot simply all ask for "fully
                // consistent" and stay one view.)
                let probe = self
                    .read(Requirement::FullyConsistent(true), 1, None)
                    .await?;
                match probe.read_at {
                    Some(token) => {
                        self.snapshot = Some(token.clone());
                        token
                    }
                    // Nothing of this type at all.
                    None => {
                        self.done = true;
                        return Ok(None);
                    }
                }
            }
        };
        let cursor = self.cursor.take();
        let page = self
            .read(
                Requirement::AtExactSnapshot(snapshot),
                self.reader.page_size,
                cursor,
            )
            .await?;
        self.cursor = page.cursor;
        // SpiceDB may answer a page shorter than the limit before the end
        // (seen with the in-memory datastore), so only an empty page or a
        // missing cursor ends the read.
        if self.cursor.is_none() || page.tuples.is_empty() {
            self.done = true;
        }
        if page.tuples.is_empty() {
            return Ok(None);
        }
        Ok(Some(page.tuples))
    }

    /// One `ReadRelationships` call.
    async fn read(
        &self,
        requirement: Requirement,
        limit: u32,
        cursor: Option<Cursor>,
    ) -> Result<Page, SpiceDbError> {
        let mut request = tonic::Request::new(ReadRelationshipsRequest {
            consistency: Some(Consistency {
                requirement: Some(requirement),
            }),
            relationship_filter: Some(RelationshipFilter {
                resource_type: self.resource_type.clone(),
                ..Default::default()
            }),
            optional_limit: limit,
            optional_cursor: cursor,
        });
        if let Some(value) = &self.reader.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        let mut stream = self
            .reader
            .client
            .clone()
            .read_relationships(request)
            .await
            .map_err(|s| SpiceDbError::Read(status_line(&s)))?
            .into_inner();
        let mut page = Page {
            tuples: Vec::with_capacity(limit as usize),
            cursor: None,
            read_at: None,
        };
        while let Some(item) = stream
            .message()
            .await
            .map_err(|s| SpiceDbError::Read(status_line(&s)))?
        {
            page.cursor = item.after_result_cursor;
            if page.read_at.is_none() {
                page.read_at = item.read_at;
            }
            let Some(r) = item.relationship else { continue };
            let (Some(resource), Some(subject)) = (r.resource, r.subject.and_then(|s| s.object))
            else {
                continue;
            };
            page.tuples.push(Tuple {
                resource_type: resource.object_type,
                resource_id: resource.object_id,
                relation: r.relation,
                subject_type: subject.object_type,
                subject_id: subject.object_id,
            });
        }
        Ok(page)
    }
}

struct Page {
    tuples: Vec<Tuple>,
    cursor: Option<Cursor>,
    read_at: Option<ZedToken>,
}

fn status_line(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn error_chain(error: &dyn std::error::Error) -> String {
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
