//! An in-process HTTP server that plays agentex-auth with scripted answers
//! and records every request, for exact status-code and wire-format cases.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
    pub delay: Duration,
    /// Extra response headers (e.g. `Location`).
    pub headers: Vec<(String, String)>,
    /// A body that is not JSON: (content type, text).
    pub raw: Option<(String, String)>,
}

impl Answer {
    pub fn ok() -> Self {
        Answer::status(200).body(serde_json::json!({"consistency_token": "zed-1"}))
    }
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            body: serde_json::json!({}),
            retry_after: None,
            delay: Duration::ZERO,
            headers: Vec::new(),
            raw: None,
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn raw(mut self, content_type: &str, text: &str) -> Self {
        self.raw = Some((content_type.into(), text.into()));
        self
    }
    pub fn body(mut self, body: Value) -> Self {
        self.body = body;
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Seen, usize) -> Answer + Send + Sync;

#[derive(Clone)]
struct Inner {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Arc<Script>>>,
}

pub struct ScriptedAuth {
    pub addr: SocketAddr,
    inner: Inner,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
    _thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ScriptedAuth {
    fn drop(&mut self) {
        if let Some(stop) = self._stop.take() {
            let _ = stop.send(());
        }
    }
}

impl ScriptedAuth {
    /// Answers every request with `script(request, index_of_request)`.
    ///
    /// The server runs on its own thread and runtime, so it keeps answering
    /// whatever the test's own (current-thread) runtime is doing — a test
    /// that waits on a child process must not starve the server.
    pub async fn start(script: impl Fn(&Seen, usize) -> Answer + Send + Sync + 'static) -> Self {
        let inner = Inner {
            seen: Arc::new(Mutex::new(Vec::new())),
            script: Arc::new(Mutex::new(Arc::new(script))),
        };
        // Anything else (a followed redirect's `GET /login`) is recorded
        // too, and answered the way a single-sign-on page would: 200 HTML.
        let app = Router::new()
            .route("/v1/authz/{op}", post(handle))
            .fallback(login_page)
            .with_state(inner.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ScriptedAuth {
            addr,
            inner,
            _stop: Some(stop),
            _thread: Some(thread),
        }
    }

    pub async fn always(answer: Answer) -> Self {
        Self::start(move |_, _| answer.clone()).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_script(&self, script: impl Fn(&Seen, usize) -> Answer + Send + Sync + 'static) {
        *self.inner.script.lock().expect("lock") = Arc::new(script);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().expect("lock").clone()
    }
}

async fn login_page(
    State(inner): State<Inner>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    inner.seen.lock().expect("lock").push(Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers,
        body: Value::Null,
    });
    (
        StatusCode::OK,
        [("content-type", "text/html")],
        "<html><body>Sign in</body></html>",
    )
        .into_response()
}

async fn handle(
    State(inner): State<Inner>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let (answer, _index) = {
        let mut all = inner.seen.lock().expect("lock");
        let index = all.len();
        all.push(seen.clone());
        let script = inner.script.lock().expect("lock").clone();
        (script(&seen, index), index)
    };
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    let status = StatusCode::from_u16(answer.status).expect("valid status");
    let mut response = match answer.raw {
        Some((content_type, text)) => {
            (status, [("content-type", content_type)], text).into_response()
        }
        None => (status, axum::Json(answer.body)).into_response(),
    };
    for (name, value) in &answer.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            value.parse().expect("header value"),
        );
    }
    if let Some(secs) = answer.retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().expect("header"));
    }
    response
}
