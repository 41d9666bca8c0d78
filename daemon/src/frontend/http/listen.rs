//! The HTTP listeners and their connections: HTTP/1.1 on a Unix socket and on loopback TCP.
//!
//! Bounds, so that slow or idle clients cannot pile up: at most `max_connections` connections
//! are served at once (more wait in the kernel's backlog), a request's headers must arrive
//! within [`HEADER_TIMEOUT`], bodies are limited by the handlers, and an accept that fails
//! (out of file descriptors, say) is retried after a pause instead of spinning.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

use super::error::{ApiError, Dialect};
use super::Peer;

/// Longest a client may take to send a request's headers (slow-header attacks hold
/// connections open this long at most).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed accept (EMFILE and the like) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The listeners the front end serves; either may be absent.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
}

/// Serves `app` on the listeners until `shutdown` completes, then lets open connections
/// finish for a few seconds.
pub async fn serve(
    listeners: Listeners,
    app: Router,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = Arc::new(GracefulShutdown::new());
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let own_uid = rustix::process::getuid().as_raw();
    let tcp = async {
        let Some(listener) = &listeners.tcp else {
            return std::future::pending().await;
        };
        loop {
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            match listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = connection(stream, app.clone(), Peer::Tcp(addr), &graceful);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _ = conn.await;
                    });
                }
                Err(e) => accept_failed(e).await,
            }
        }
    };
    let unix = async {
        let Some(listener) = &listeners.unix else {
            return std::future::pending().await;
        };
        loop {
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            match listener.accept().await {
                Ok((stream, _)) => {
                    let cred = stream.peer_cred().ok();
                    let uid = cred.as_ref().map(|c| c.uid());
                    let peer = Peer::Unix {
                        uid: uid.unwrap_or(u32::MAX),
                        pid: cred.and_then(|c| c.pid()),
                    };
                    let service = if uid == Some(own_uid) {
                        app.clone()
                    } else {
                        refuse_peer(own_uid, uid)
                    };
                    let conn = connection(stream, service, peer, &graceful);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _ = conn.await;
                    });
                }
                Err(e) => accept_failed(e).await,
            }
        }
    };
    tokio::select! {
        () = tcp => {}
        () = unix => {}
        () = shutdown => {}
    }
    drop(listeners);
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| GracefulShutdown::new());
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP clients still connected after {SHUTDOWN_GRACE:?}; closing");
    }
}

/// One HTTP/1.1 connection serving `app`, every request tagged with how the peer reached us.
fn connection<S>(
    stream: S,
    app: Router,
    peer: Peer,
    graceful: &GracefulShutdown,
) -> impl Future<Output = hyper::Result<()>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(peer.clone());
        request
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    graceful.watch(conn)
}

/// A service that answers every request on a connection from another user with 403.
fn refuse_peer(own: u32, peer: Option<u32>) -> Router {
    let message = match peer {
        Some(uid) => format!("egpud serves uid {own} only; this client runs as uid {uid}"),
        None => "egpud could not read the peer's credentials".to_owned(),
    };
    Router::new().fallback(move |request: Request<Body>| {
        let message = message.clone();
        async move {
            ApiError::new(
                Dialect::of_path(request.uri().path()),
                StatusCode::FORBIDDEN,
                message,
            )
        }
    })
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!("accepting an HTTP connection failed: {e}; retrying shortly");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// The loopback TCP address to listen on, or why not; `port_taken` failures are reported by
/// the caller as one line and egpud goes on without TCP.
pub async fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
