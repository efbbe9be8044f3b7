//! One client connection, from its first byte to its close: the timeouts hyper does not
//! keep itself.
//!
//! - A connection that sends no byte at all is closed at the header timeout (hyper's
//!   header timer starts at a request's first byte).
//! - A client that stops reading gets a write timeout (the send timeout), so it cannot
//!   hold its response's worker for long.
//! - A connection on which no request begins for the keep-alive timeout is closed
//!   gracefully: requests in flight finish first (HTTP/2: GOAWAY names the last
//!   stream served). hyper closes an idle HTTP/1.1 connection at the header timeout
//!   already; an idle HTTP/2 connection it keeps for ever, one file descriptor each,
//!   and a client's PINGs would keep it too were bytes the measure of use.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
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
    // One of --max-connections, held while the connection is open.
    _permit: OwnedSemaphorePermit,
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
    let requests = Arc::new(AtomicU64::new(0));
    let begun = requests.clone();
    let service = service_fn(move |req| {
        begun.fetch_add(1, Ordering::Relaxed);
        let front = front.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(front.handle(req, &conn).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(Box::pin(stream)), service);
    let mut connection = std::pin::pin!(connection);
    // Idle, or the node stops: finish what is in flight, then close.
    let mut end = std::pin::pin!(async {
        tokio::select! {
            () = quiet_for(&requests, keep_alive) => {}
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

/// Resolves once no request has begun for `limit` (checked four times per `limit`, so
/// after at most a quarter more).
async fn quiet_for(requests: &AtomicU64, limit: Duration) {
    let mut seen = requests.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        sleep(limit / 4).await;
        let now = requests.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= limit {
            return;
        }
    }
}
