//! The gRPC socket's connections, bounded: at most `limit` at once (a connection holds a permit
//! until it closes; more wait in the kernel's backlog), and an accept that fails (out of file
//! descriptors, say) pauses before the next try. tonic's own loop retries a failed accept at
//! once, which spins a core for as long as the descriptors are gone.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// Pause after a failed accept before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type PermitFuture = Pin<Box<dyn Future<Output = OwnedSemaphorePermit> + Send>>;

/// Accepted connections, as tonic's `serve_with_incoming` takes them.
pub struct Incoming {
    listener: UnixListener,
    permits: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    waiting_permit: Option<PermitFuture>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("available", &self.permits.available_permits())
            .finish()
    }
}

impl Incoming {
    pub fn new(listener: UnixListener, limit: usize) -> Incoming {
        Incoming {
            listener,
            permits: Arc::new(Semaphore::new(limit.max(1))),
            permit: None,
            waiting_permit: None,
            pause: None,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = &mut this.pause {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            if this.permit.is_none() {
                let permits = this.permits.clone();
                let waiting = this.waiting_permit.get_or_insert_with(|| {
                    Box::pin(async move { permits.acquire_owned().await.expect("never closed") })
                });
                match waiting.as_mut().poll(cx) {
                    Poll::Ready(permit) => {
                        this.permit = Some(permit);
                        this.waiting_permit = None;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => {
                    let permit = this.permit.take().expect("taken above");
                    return Poll::Ready(Some(Ok(Connection {
                        stream,
                        _permit: permit,
                    })));
                }
                Poll::Ready(Err(e)) => {
                    tracing::warn!("accepting a gRPC connection failed: {e}; retrying shortly");
                    this.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A connection, holding its permit until it closes.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Connection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
