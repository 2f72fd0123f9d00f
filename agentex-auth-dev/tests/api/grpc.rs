//! The SpiceDB gRPC endpoint on TCP, read with the stock tonic client as
//! from a real SpiceDB.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use spicedb_grpc_tonic::v1::permissions_service_client::PermissionsServiceClient;
use spicedb_grpc_tonic::v1::{
    Consistency, Cursor, LookupResourcesRequest, ObjectReference, ReadRelationshipsRequest,
    RelationshipFilter, SubjectReference, consistency::Requirement,
};
use tonic::transport::Channel;

use crate::helpers::{TestServer, resource, spawn, user};

async fn client(t: &TestServer) -> PermissionsServiceClient<Channel> {
    PermissionsServiceClient::connect(t.server.grpc_endpoint())
        .await
        .expect("connect to the gRPC endpoint")
}

fn fully_consistent() -> Option<Consistency> {
    Some(Consistency {
        requirement: Some(Requirement::FullyConsistent(true)),
    })
}

/// Every relationship of `type:id`, as `relation@subject_type:subject_id`.
pub async fn relationships_of(t: &TestServer, ty: &str, id: &str) -> Vec<String> {
    read(t, ty, id).await
}

/// Every relationship of every resource of type `ty`.
pub async fn relationships_of_type(t: &TestServer, ty: &str) -> Vec<String> {
    read(t, ty, "").await
}

/// The distinct resource object ids of type `ty`, as SpiceDB stores them.
pub async fn resource_ids_of_type(t: &TestServer, ty: &str) -> Vec<String> {
    let request = ReadRelationshipsRequest {
        consistency: fully_consistent(),
        relationship_filter: Some(RelationshipFilter {
            resource_type: ty.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client(t)
        .await
        .read_relationships(request)
        .await
        .expect("read")
        .into_inner();
    let mut ids = BTreeSet::new();
    while let Some(item) = stream.message().await.expect("stream") {
        let resource = item
            .relationship
            .and_then(|r| r.resource)
            .expect("resource");
        ids.insert(resource.object_id);
    }
    ids.into_iter().collect()
}

async fn read(t: &TestServer, ty: &str, id: &str) -> Vec<String> {
    let request = ReadRelationshipsRequest {
        consistency: fully_consistent(),
        relationship_filter: Some(RelationshipFilter {
            resource_type: ty.into(),
            optional_resource_id: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client(t)
        .await
        .read_relationships(request)
        .await
        .expect("read")
        .into_inner();
    let mut out = Vec::new();
    while let Some(item) = stream.message().await.expect("stream") {
        let r = item.relationship.expect("relationship");
        let s = r.subject.and_then(|s| s.object).expect("subject");
        out.push(format!("{}@{}:{}", r.relation, s.object_type, s.object_id));
    }
    out.sort();
    out
}

#[tokio::test]
async fn read_relationships_pages_through_exactly_the_registered_keys() {
    let t = spawn().await;
    let alice = user("alice");
    t.register(&alice, resource("agent", "agent-1"), None).await;
    let keys: BTreeSet<String> = (0..7).map(|i| format!("key-{i}")).collect();
    for key in &keys {
        let status = t
            .register(
                &alice,
                resource("api_key", key),
                Some(resource("agent", "agent-1")),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    t.register(
        &alice,
        resource("api_key", "gone"),
        Some(resource("agent", "agent-1")),
    )
    .await;
    t.deregister(&alice, resource("api_key", "gone")).await;

    let mut client = client(&t).await;
    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        let request = ReadRelationshipsRequest {
            consistency: fully_consistent(),
            relationship_filter: Some(RelationshipFilter {
                resource_type: "api_key".into(),
                optional_relation: "owner".into(),
                ..Default::default()
            }),
            optional_limit: 3,
            optional_cursor: cursor.take(),
        };
        let mut stream = client
            .read_relationships(request)
            .await
            .expect("read")
            .into_inner();
        let mut in_page = 0;
        while let Some(item) = stream.message().await.expect("stream") {
            in_page += 1;
            let relationship = item.relationship.expect("relationship");
            seen.push(relationship.resource.expect("resource").object_id);
            cursor = item.after_result_cursor;
        }
        pages += 1;
        assert!(in_page <= 3, "a page holds at most the limit");
        if in_page < 3 {
            break;
        }
        assert!(pages < 10, "paging must end");
    }
    assert_eq!(pages, 3, "7 keys in pages of 3");
    assert_eq!(seen.len(), keys.len(), "no key twice: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), keys);
    t.shutdown().await;
}

#[tokio::test]
async fn lookup_resources_works_and_bearer_tokens_are_ignored() {
    let t = spawn().await;
    let alice = user("alice");
    t.register(&alice, resource("agent", "agent-1"), None).await;
    t.register(
        &alice,
        resource("api_key", "k1"),
        Some(resource("agent", "agent-1")),
    )
    .await;
    t.register(&alice, resource("api_key", "k2"), None).await;

    let mut request = tonic::Request::new(LookupResourcesRequest {
        consistency: fully_consistent(),
        resource_object_type: "api_key".into(),
        permission: "read".into(),
        subject: Some(SubjectReference {
            object: Some(ObjectReference {
                object_type: "user".into(),
                object_id: "alice".into(),
            }),
            optional_relation: String::new(),
        }),
        ..Default::default()
    });
    // A client configured for a real SpiceDB sends its preshared key; the
    // embedded engine requires none and ignores it.
    request.metadata_mut().insert(
        "authorization",
        "Bearer anything".parse().expect("metadata"),
    );
    let mut stream = client(&t)
        .await
        .lookup_resources(request)
        .await
        .expect("lookup")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(item) = stream.message().await.expect("stream") {
        ids.push(item.resource_object_id);
    }
    assert_eq!(ids, vec!["k1"], "k2 has no parent edge");
    t.shutdown().await;
}

#[tokio::test]
async fn bulk_touch_writes_more_than_one_request_and_is_idempotent() {
    let t = spawn().await;
    let tuples: Vec<(String, String, String, String, String)> = (0..2500)
        .map(|i| {
            (
                "api_key".into(),
                format!("bulk-{i}"),
                "owner".into(),
                "user".into(),
                "alice".into(),
            )
        })
        .collect();
    t.server
        .bulk_touch(tuples.clone())
        .await
        .expect("bulk touch");
    t.server
        .bulk_touch(tuples)
        .await
        .expect("touching again is not an error");
    assert_eq!(
        relationships_of(&t, "api_key", "bulk-2499").await,
        vec!["owner@user:alice".to_string()]
    );
    let request = ReadRelationshipsRequest {
        consistency: fully_consistent(),
        relationship_filter: Some(RelationshipFilter {
            resource_type: "api_key".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client(&t)
        .await
        .read_relationships(request)
        .await
        .expect("read")
        .into_inner();
    let mut count = 0;
    while stream.message().await.expect("stream").is_some() {
        count += 1;
    }
    assert_eq!(count, 2500);
}
