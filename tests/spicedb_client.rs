//! Reconcile's SpiceDB reader against fake gRPC servers: TLS is never
//! downgraded to clear text, and a server that stalls or trickles a stream
//! cannot keep a read running forever.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use authz_outbox::reconcile::{SpiceDbConfig, SpiceDbError, SpiceDbReader};
use bytes::Bytes;
use prost::Message;
use spicedb_grpc_tonic::v1::{
    Cursor, ExportBulkRelationshipsResponse, ObjectReference, ReadRelationshipsResponse,
    Relationship, SubjectReference, ZedToken,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// What the fake does with `ExportBulkRelationships`.
#[derive(Clone, Copy)]
enum Export {
    /// Sends the response headers, then nothing, ever.
    Stall,
    /// Sends an empty batch (with a cursor) every 100 ms, forever.
    Trickle,
}

fn frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    Bytes::from(framed)
}

/// A gRPC server (HTTP/2 by hand) that answers the snapshot read with one
/// relationship and then misbehaves on the export.
async fn fake_spicedb(export: Export) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let path = request.uri().path().to_string();
                    tokio::spawn(async move {
                        let response = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(())
                            .expect("response");
                        let Ok(mut stream) = respond.send_response(response, false) else {
                            return;
                        };
                        if path.ends_with("/ReadRelationships") {
                            let answer = ReadRelationshipsResponse {
                                read_at: Some(ZedToken {
                                    token: "snapshot".into(),
                                }),
                                relationship: Some(Relationship {
                                    resource: Some(ObjectReference {
                                        object_type: "api_key".into(),
                                        object_id: "k1".into(),
                                    }),
                                    relation: "owner".into(),
                                    subject: Some(SubjectReference {
                                        object: Some(ObjectReference {
                                            object_type: "user".into(),
                                            object_id: "u1".into(),
                                        }),
                                        optional_relation: String::new(),
                                    }),
                                    ..Default::default()
                                }),
                                after_result_cursor: None,
                            };
                            let _ = stream.send_data(frame(&answer), false);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().expect("header"));
                            let _ = stream.send_trailers(trailers);
                            return;
                        }
                        match export {
                            Export::Stall => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                drop(stream);
                            }
                            Export::Trickle => loop {
                                let batch = ExportBulkRelationshipsResponse {
                                    after_result_cursor: Some(Cursor {
                                        token: "more".into(),
                                    }),
                                    relationships: Vec::new(),
                                };
                                if stream.send_data(frame(&batch), false).is_err() {
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            },
                        }
                    });
                }
            });
        }
    });
    addr
}

async fn read_all(config: SpiceDbConfig) -> Result<usize, SpiceDbError> {
    let reader = SpiceDbReader::connect(&config).await?;
    let mut pages = reader.pages("api_key");
    let mut n = 0;
    while let Some(page) = pages.next_page().await? {
        n += page.len();
    }
    Ok(n)
}

#[tokio::test]
async fn a_stalled_export_ends_at_the_message_timeout() {
    let addr = fake_spicedb(Export::Stall).await;
    let mut config = SpiceDbConfig::new(format!("http://{addr}"));
    config.message_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), read_all(config))
        .await
        .expect("the read ends by itself");
    match result {
        Err(SpiceDbError::Timeout(message)) => {
            assert!(message.contains("message-timeout"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_trickling_export_ends_at_the_read_deadline() {
    let addr = fake_spicedb(Export::Trickle).await;
    let mut config = SpiceDbConfig::new(format!("http://{addr}"));
    config.message_timeout = Duration::from_secs(1);
    config.read_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(20), read_all(config))
        .await
        .expect("the read ends by itself");
    match result {
        Err(SpiceDbError::Timeout(message)) => {
            assert!(message.contains("read-timeout"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// `https://` in front of a plain TCP socket: a TLS handshake is attempted
/// and fails; neither the HTTP/2 preface nor the token is ever sent in clear.
#[tokio::test]
async fn an_https_endpoint_is_never_dialled_in_clear() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = tokio::spawn(async move {
        let mut all = Vec::new();
        // The client may retry; read every connection it makes for 2 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Ok((mut socket, _))) =
            tokio::time::timeout_at(deadline, listener.accept()).await
        {
            let mut bytes = vec![0u8; 64 * 1024];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), socket.read(&mut bytes)).await
            {
                all.extend_from_slice(&bytes[..n]);
            }
        }
        all
    });
    let mut config = SpiceDbConfig::new(format!("https://{addr}"));
    config.token = Some("psk-never-in-clear".into());
    config.message_timeout = Duration::from_secs(1);
    let result = tokio::time::timeout(Duration::from_secs(10), read_all(config))
        .await
        .expect("the read ends");
    assert!(result.is_err(), "{result:?}");
    let bytes = received.await.expect("listener");
    let text = String::from_utf8_lossy(&bytes);
    assert!(!bytes.is_empty(), "the client connected");
    assert_eq!(bytes[0], 0x16, "a TLS handshake record: {text:?}");
    assert!(
        !text.contains("PRI * HTTP/2.0"),
        "cleartext HTTP/2 preface: {text:?}"
    );
    assert!(
        !text.contains("psk-never-in-clear"),
        "token in clear: {text:?}"
    );
}

#[tokio::test]
async fn a_ca_file_with_an_http_endpoint_is_refused() {
    let mut config = SpiceDbConfig::new("http://127.0.0.1:1");
    config.ca_pem = Some(b"-----BEGIN CERTIFICATE-----\n".to_vec());
    let error = SpiceDbReader::connect(&config)
        .await
        .err()
        .expect("refused");
    assert!(matches!(error, SpiceDbError::Tls(_)), "{error}");
}
