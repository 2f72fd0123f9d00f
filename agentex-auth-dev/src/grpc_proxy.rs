//! The SpiceDB gRPC endpoint on TCP: a byte-level proxy to the engine's
//! streaming unix socket.
//!
//! The socket already speaks real gRPC (HTTP/2), so copying bytes both ways is
//! enough for other programs to call `ReadRelationships`, `LookupResources`
//! and `Watch` exactly as against a real SpiceDB. The socket asks for no
//! preshared key: clients connect without a token, and a bearer token they
//! send anyway is ignored. Unary RPCs are not served there (the library
//! answers them `UNIMPLEMENTED`); they go through the HTTP API or the FFI.

use std::path::PathBuf;

use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Accepts connections on `listener` until `shutdown` turns true, proxying
/// each to `socket`. Open connections are cut when the proxy stops.
pub fn spawn(
    listener: TcpListener,
    socket: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Owning the connection tasks here means dropping the set at shutdown
        // aborts them, so no proxied stream outlives the engine.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        connections.spawn(proxy(tcp, socket.clone(), peer));
                    }
                    Err(error) => tracing::warn!(%error, "grpc proxy: accept failed"),
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}

async fn proxy(mut tcp: TcpStream, socket: PathBuf, peer: std::net::SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let mut unix = match UnixStream::connect(&socket).await {
        Ok(unix) => unix,
        Err(error) => {
            tracing::warn!(%error, socket = %socket.display(), "grpc proxy: cannot reach SpiceDB socket");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut tcp, &mut unix).await {
        Ok((up, down)) => tracing::debug!(%peer, up, down, "grpc proxy: connection closed"),
        Err(error) => tracing::debug!(%peer, %error, "grpc proxy: connection ended"),
    }
}
