//! A trivial agentex-auth stand-in in the bench process: every POST answers
//! 200 `{}` after a fixed delay. With no delay it is the "infinitely fast
//! server" of the worker-ceiling and latency runs; with 5 ms it is the remote
//! call of the seed's inline dual write.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::routing::post;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct Sink {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Sink {
    pub async fn start(delay: Duration) -> anyhow::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route(
            "/{*path}",
            post(move || async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Json(serde_json::json!({}))
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Sink { addr, task })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
