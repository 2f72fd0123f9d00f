//! The agentex-auth client against raw HTTP servers, for what a well-behaved
//! test server never does: bodies that never end, stall or stop half-way,
//! no answer at all, and https answered by a plain TCP socket.

use std::time::{Duration, Instant};

use authz_outbox::auth_client::{AuthAnswer, AuthClient, AuthRequest, BearerToken, MAX_BODY_BYTES};
use authz_outbox::domain::ResourceRef;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TOKEN: &str = "svc-token-never-in-clear";

fn client(url: &str) -> AuthClient {
    client_with_timeout(url, Duration::from_secs(5))
}

fn client_with_timeout(url: &str, request_timeout: Duration) -> AuthClient {
    AuthClient::new(url, BearerToken::new(TOKEN), request_timeout, 1).expect("client")
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
            message.chars().count() <= 200 && message.starts_with("aaa"),
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

/// What a raw server does once it has written its reply.
#[derive(Clone, Copy)]
enum Then {
    /// Closes the connection.
    HangUp,
    /// Keeps the connection open and sends nothing more.
    Stall,
}

/// Answers every connection with `reply` (possibly nothing), then `then`.
async fn raw_server(reply: Vec<u8>, then: Then) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reply = std::sync::Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(&reply).await;
                if let Then::Stall = then {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A whole 200 answer with `body` as its JSON body.
fn ok_with_body(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The contract's answer, padded with spaces to exactly `len` bytes.
fn success_body(len: usize) -> String {
    let body = r#"{"success": true}"#;
    format!("{body:<len$}")
}

/// The cap is the most the client reads, not a size it refuses: a body of
/// exactly 8 KiB is whole, one byte more is cut off.
#[tokio::test]
async fn a_body_of_exactly_the_cap_is_read_whole() {
    let exact = raw_server(ok_with_body(&success_body(MAX_BODY_BYTES)), Then::HangUp).await;
    assert_eq!(
        send(&client(&exact)).await,
        AuthAnswer::Success {
            consistency_token: None
        },
        "exactly the cap is not over it"
    );
    let over = raw_server(
        ok_with_body(&success_body(MAX_BODY_BYTES + 1)),
        Then::HangUp,
    )
    .await;
    match send(&client(&over)).await {
        AuthAnswer::NotTheContract {
            status: 200,
            reason,
        } => assert!(reason.contains("larger"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// The head of a 200 and the first bytes of its 100-byte body.
const HALF_AN_ANSWER: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                              content-length: 100\r\n\r\n{\"success\"";

/// Timed out is not the same as unreachable: `last_error` tells the
/// operator which (a slow agentex-auth, or none at all).
#[tokio::test]
async fn no_answer_within_the_request_timeout_is_a_timeout() {
    let url = raw_server(Vec::new(), Then::Stall).await;
    let answer = send(&client_with_timeout(&url, Duration::from_millis(300))).await;
    assert_eq!(answer, AuthAnswer::Timeout);
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_a_timeout() {
    let url = raw_server(HALF_AN_ANSWER.into(), Then::Stall).await;
    let answer = send(&client_with_timeout(&url, Duration::from_millis(300))).await;
    assert_eq!(answer, AuthAnswer::Timeout);
}

/// A connection lost mid-body is not a timeout, and the answer says what
/// happened (the cause sits at the end of the error chain).
#[tokio::test]
async fn a_body_cut_off_by_a_hang_up_is_a_network_error() {
    let url = raw_server(HALF_AN_ANSWER.into(), Then::HangUp).await;
    match send(&client(&url)).await {
        AuthAnswer::Network(message) => assert!(
            message.contains("end of file before message length reached"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
}

/// reqwest's own message ("error sending request for url ...") hides the
/// cause; the answer carries the chain, which names it.
#[tokio::test]
async fn a_refused_connection_is_a_network_error_naming_the_cause() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    match send(&client(&format!("http://{addr}"))).await {
        AuthAnswer::Network(message) => {
            assert!(message.contains("Connection refused"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
