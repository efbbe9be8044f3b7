//! The front: the node's HTTP side. It accepts connections, lets hyper parse HTTP/1.1
//! and HTTP/2 (cleartext), enforces the limits, routes by Host and hands each request
//! to its site's pool. It owns HTTP: workers never see raw HTTP.
//!
//! ```text
//! accept ─► hyper (limits: header size/count → 431, header read timeout, bad HTTP → 400)
//!        ─► handle: Host → route table → 404 | body limit → 413 | environ → exchange
//! ```

mod body;
mod connection;
mod environ;
mod error;
mod exchange;
mod request_body;
mod slow_clients;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{header, Method, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use ipnet::IpNet;
use roost_registry::normalize_request_host;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use body::ResponseBody;
pub use error::FrontError;
pub use slow_clients::{SiteHold, SlowClients};

use body::PendingAccess;
use environ::ConnInfo;

use crate::route::Routes;

/// A node at `--max-connections` says so in its log at most this often.
const FULL_NOTE_EVERY: Duration = Duration::from_secs(60);

/// The front's settings (see `docs/configure.md`).
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Peers whose X-Forwarded-For / X-Forwarded-Proto are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Longest time a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Longest wait for the next bytes of a request body.
    pub body_read_timeout: Duration,
    /// Longest time a client may leave a response unread: then its connection closes,
    /// and the worker's slot is freed (not the worker killed).
    pub send_timeout: Duration,
    /// Longest time a connection may stay open with no request begun on it; then it
    /// is closed gracefully.
    pub keepalive_timeout: Duration,
    /// Most client connections open at once, all listeners together; past it new ones
    /// wait in the listen backlog. `None`: half the open file limit.
    pub max_connections: Option<usize>,
    /// Most bytes of request bodies read ahead (before a slot is taken), all requests
    /// together.
    pub request_buffer: u64,
    /// Most bytes of responses the node holds in memory for clients slower than their
    /// workers, all responses together.
    pub response_buffer: u64,
    /// Most bytes of such responses spooled to disk beyond memory, all together; 0 is
    /// none.
    pub response_spool: u64,
    /// Where the spool's temporary files are made (unlinked at once).
    pub spool_dir: std::path::PathBuf,
    /// Most bytes of request line and headers (HTTP/1: read buffer; HTTP/2: header list).
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// How long in-flight requests may take to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            trusted_proxies: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            max_connections: None,
            request_buffer: 64 << 20,
            response_buffer: 256 << 20,
            response_spool: 4 << 30,
            // On a disk by convention, where /tmp may be a tmpfs (memory).
            spool_dir: Some(std::path::PathBuf::from("/var/tmp"))
                .filter(|d| d.is_dir())
                .unwrap_or_else(std::env::temp_dir),
            max_header_bytes: 64 << 10,
            max_headers: 100,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

struct Front {
    routes: Routes,
    config: FrontConfig,
    slow_clients: Arc<SlowClients>,
}

/// Serves one listener until `shutdown` turns true, then lets open requests finish
/// (up to the grace period).
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    config: FrontConfig,
    slow_clients: Arc<SlowClients>,
    connection_permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no local address");
            return;
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .max_headers(config.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32)
        // Each stream may hold a small response beyond the budgets
        // (stream::UNCOUNTED_MAX); 100 as Apache and h2o (nginx: 128).
        .max_concurrent_streams(100);
    let builder = Arc::new(builder);
    let grace = config.shutdown_grace;
    let front = Arc::new(Front {
        routes,
        config,
        slow_clients,
    });
    // Every connection's task, told to finish when the node stops.
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    let mut said_full: Option<Instant> = None;
    loop {
        if connection_permits.available_permits() == 0
            && said_full.is_none_or(|at| at.elapsed() >= FULL_NOTE_EVERY)
        {
            tracing::warn!(
                "at --max-connections: new connections wait in the listen backlog until some close"
            );
            said_full = Some(Instant::now());
        }
        let permit = tokio::select! {
            permit = connection_permits.clone().acquire_owned() => {
                permit.expect("the connection semaphore is never closed")
            }
            _ = crate::stopping(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::stopping(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ConnInfo { peer, local });
        connections.spawn(connection::serve(
            stream,
            front.clone(),
            conn,
            builder.clone(),
            closing.clone(),
            permit,
        ));
    }
    tracing::info!(%local, "listener closed; finishing open requests");
    closing.cancel();
    connections.close();
    if timeout(grace, connections.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "requests still open after the shutdown grace period"
        );
    }
}

/// The listener's address as the tests and the start line print it.
pub fn describe(addr: &SocketAddr) -> String {
    format!("http://{addr}")
}

impl Front {
    async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ResponseBody> {
        let host = match check_target(&req).and_then(|()| request_host(&req)) {
            Ok(h) => h,
            Err(e) => return e.response(),
        };
        // `OPTIONS *` asks about the server, not a resource: the front answers it, as
        // Apache does (an app would get "*" as its PATH_INFO).
        if req.uri().path() == "*" {
            return Response::new(ResponseBody::Full(None));
        }
        let Some(route) = self.routes.load().lookup(&host).cloned() else {
            return FrontError::UnknownHost(host).response();
        };
        let began = Instant::now();
        let (parts, body) = req.into_parts();
        let client = environ::client(&parts, conn, &self.config.trusted_proxies);
        let mut access = Some(PendingAccess {
            log: route.logs.access_target(),
            peer: client.addr,
            method: parts.method.clone(),
            target: parts.uri.path_and_query().cloned(),
            version: environ::protocol(parts.version),
            referer: parts.headers.get(header::REFERER).cloned(),
            user_agent: parts.headers.get(header::USER_AGENT).cloned(),
            start: SystemTime::now(),
            began,
            worker_pid: None,
        });
        let result = async {
            let declared = content_length(&parts)?;
            if declared.is_some_and(|n| n > route.site.pool.body_max) {
                return Err(FrontError::BodyTooLarge {
                    limit: route.site.pool.body_max,
                });
            }
            let head = environ::build(&parts, &host, conn, &client)?;
            let body = request_body::read_ahead(
                body,
                route.site.pool.body_max,
                self.config.body_read_timeout,
                &self.slow_clients,
                &route.hold,
            )
            .await?;
            let policy = &self.slow_clients;
            exchange::forward(&route, &parts.method, head, body, &mut access, policy).await
        }
        .await;
        let response = result.unwrap_or_else(|e| {
            match e.status().as_u16() {
                500.. => {
                    tracing::error!(site = %route.site.name, %host, error = %e, "request failed")
                }
                _ => tracing::debug!(site = %route.site.name, %host, error = %e, "request refused"),
            }
            e.response()
        });
        if let Some(access) = access {
            let bytes = http_body::Body::size_hint(response.body())
                .exact()
                .unwrap_or(0);
            access.finish(response.status().as_u16(), bytes);
        }
        response
    }
}

/// The request target's forms that belong to one method (RFC 9112 §3.2): CONNECT's
/// (a tunnel, which no WSGI app can serve) and OPTIONS' asterisk.
fn check_target(req: &Request<Incoming>) -> Result<(), FrontError> {
    if req.method() == Method::CONNECT {
        return Err(FrontError::NotImplemented("CONNECT"));
    }
    let uri = req.uri();
    if uri.authority().is_some() && uri.scheme().is_none() {
        return Err(FrontError::BadRequest(
            "a request target of only host and port is for CONNECT".into(),
        ));
    }
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return Err(FrontError::BadRequest(
            "the request target \"*\" is for OPTIONS".into(),
        ));
    }
    Ok(())
}

/// The request's host, normalised; a missing or malformed one is a client error, and
/// so is a request target naming a host other than the Host header's: the front and
/// anything before it (a load balancer, a firewall) must agree on the site.
fn request_host(req: &Request<Incoming>) -> Result<String, FrontError> {
    let authority = req.uri().authority();
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => {
            return Err(FrontError::BadRequest("more than one Host header".into()))
        }
        (Some(h), None) => Some(
            h.to_str()
                .map_err(|_| FrontError::BadRequest("the Host header is not ASCII".into()))?,
        ),
        (None, _) => None,
    };
    let normalize =
        |raw: &str| normalize_request_host(raw).map_err(|e| FrontError::BadRequest(e.to_string()));
    match (header, authority) {
        (Some(header), None) => normalize(header),
        // RFC 9112 §3.2: the Host header of an absolute-form request must be the
        // target's authority (without user information); like HAProxy, refuse it
        // otherwise rather than pick one.
        (header, Some(authority)) => {
            let target = normalize(authority.host())?;
            if header.is_some_and(|h| normalize(h).ok().as_ref() != Some(&target)) {
                return Err(FrontError::BadRequest(
                    "the Host header does not match the request target's host".into(),
                ));
            }
            Ok(target)
        }
        (None, None) => Err(FrontError::BadRequest(
            "the request has no Host header".into(),
        )),
    }
}

/// The declared body length; several different values are a smuggling attempt.
/// (A length beside Transfer-Encoding never gets here: hyper drops the length, frames
/// the body by the encoding and closes the connection after it, as RFC 9112 §6.3 says.)
fn content_length(parts: &http::request::Parts) -> Result<Option<u64>, FrontError> {
    let mut found = None;
    for value in parts.headers.get_all(header::CONTENT_LENGTH) {
        let n: u64 = value
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| FrontError::BadRequest("invalid Content-Length".into()))?;
        if found.is_some_and(|f| f != n) {
            return Err(FrontError::BadRequest(
                "conflicting Content-Length headers".into(),
            ));
        }
        found = Some(n);
    }
    Ok(found)
}
