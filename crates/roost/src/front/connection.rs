//! One client connection, from its first byte to its close: the timeouts hyper does not
//! keep itself.
//!
//! - A connection that sends no byte at all is closed at the header timeout (hyper's
//!   header timer starts at a request's first byte).
//! - A client that stops reading gets a write timeout (the send timeout), so it cannot
//!   hold its response's worker for long.
//! - A connection on which nothing is read or written for the keep-alive timeout is
//!   closed gracefully. hyper closes an idle HTTP/1.1 connection at the header timeout
//!   already; an idle HTTP/2 connection it keeps for ever, one file descriptor each.
//!   Requests in flight finish first (HTTP/2: GOAWAY names the last stream served).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

use super::environ::ConnInfo;
use super::Front;

/// Serves one accepted connection until it ends; `closing` asks it to finish what is in
/// flight and close (the node stops).
pub(super) async fn serve(
    stream: TcpStream,
    front: Arc<Front>,
    conn: Arc<ConnInfo>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    closing: CancellationToken,
) {
    let config = &front.config;
    let (first_byte, send, keep_alive) = (
        config.header_read_timeout,
        config.send_timeout,
        config.keepalive_timeout,
    );
    let mut byte = [0];
    let first = tokio::select! {
        first = timeout(first_byte, stream.peek(&mut byte)) => first,
        () = closing.cancelled() => return,
    };
    if !matches!(first, Ok(Ok(_))) {
        return;
    }
    let peer = conn.peer;
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(send));
    let activity = Arc::new(AtomicU64::new(0));
    let io = Counted {
        inner: Box::pin(stream),
        activity: activity.clone(),
    };
    let service = service_fn(move |req| {
        let front = front.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(front.handle(req, &conn).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    // Idle, or the node stops: finish what is in flight, then close.
    let mut end = std::pin::pin!(async {
        tokio::select! {
            () = quiet_for(&activity, keep_alive) => {}
            () = closing.cancelled() => {}
        }
    });
    let mut ending = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = &mut end, if !ending => {
                connection.as_mut().graceful_shutdown();
                ending = true;
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Resolves once nothing has been read or written for `limit` (checked four times per
/// `limit`, so after at most a quarter more).
async fn quiet_for(activity: &AtomicU64, limit: Duration) {
    let mut seen = activity.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        sleep(limit / 4).await;
        let now = activity.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= limit {
            return;
        }
    }
}

/// A connection's stream that counts the reads and writes that moved bytes.
struct Counted {
    inner: Pin<Box<TimeoutStream<TcpStream>>>,
    activity: Arc<AtomicU64>,
}

impl Counted {
    fn moved(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = self.inner.as_mut().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = self.inner.as_mut().poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = self.inner.as_mut().poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}
