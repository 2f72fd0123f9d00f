//! The agentex-auth client against raw HTTP servers, for what a well-behaved
//! test server never does: bodies that never end, and https answered by a
//! plain TCP socket.

use std::time::{Duration, Instant};

use authz_outbox::auth_client::{AuthAnswer, AuthClient, AuthRequest, BearerToken};
use authz_outbox::domain::ResourceRef;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TOKEN: &str = "svc-token-never-in-clear";

fn client(url: &str) -> AuthClient {
    AuthClient::new(url, BearerToken::new(TOKEN), Duration::from_secs(5), 1).expect("client")
}

async fn send(client: &AuthClient) -> AuthAnswer {
    let principal = json!({"user_id": "u"});
    let resource = ResourceRef::new("task", "t1").expect("valid");
    client
        .send(
            &AuthRequest::Deregister {
                principal: &principal,
                resource: &resource,
            },
            "authz-outbox-1",
        )
        .await
}

/// Answers every connection with `head` and then a chunked body that never
/// ends (16 KiB chunks, as fast as the client takes them).
async fn endless_body(head: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("4000\r\n{}\r\n", "a".repeat(0x4000));
                while socket.write_all(chunk.as_bytes()).await.is_ok() {}
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_endless_success_body_is_cut_off_and_not_counted() {
    let url = endless_body(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    let started = Instant::now();
    let answer = send(&client(&url)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "read only the first KiB, not until the timeout: {:?}",
        started.elapsed()
    );
    match answer {
        AuthAnswer::NotTheContract {
            status: 200,
            reason,
        } => {
            assert!(reason.contains("larger"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_endless_error_body_is_cut_off() {
    let url = endless_body(
        "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n",
    )
    .await;
    let started = Instant::now();
    let answer = send(&client(&url)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "read only the first KiB, not until the timeout: {:?}",
        started.elapsed()
    );
    match answer {
        AuthAnswer::Status {
            status: 500,
            message,
            ..
        } => assert!(
            message.len() <= 200 && message.starts_with("aaa"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
}

/// A plain TCP socket behind an `https://` URL: the client must fail the
/// TLS handshake, never send the request (or the token) in clear.
#[tokio::test]
async fn https_is_never_spoken_in_clear() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("a connection");
        let mut bytes = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(3), socket.read(&mut bytes))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        bytes.truncate(n);
        // Not a TLS server: hang up.
        bytes
    });
    let answer = send(&client(&format!("https://{addr}"))).await;
    let bytes = received.await.expect("listener");
    let text = String::from_utf8_lossy(&bytes);
    assert!(!bytes.is_empty(), "the client connected");
    assert_eq!(bytes[0], 0x16, "a TLS handshake record, not HTTP: {text:?}");
    assert!(!text.contains(TOKEN) && !text.contains("POST"), "{text:?}");
    assert!(matches!(answer, AuthAnswer::Network(_)), "{answer:?}");
}
