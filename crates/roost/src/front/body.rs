//! The response body type of the front, and the access log line written when a body
//! has been sent (or abandoned).

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::stream::WorkerBody;
use crate::logs::{AccessRecord, AccessTarget};

/// Why a response body ended early; hyper then aborts the connection so the client
/// sees a broken response rather than a short one that looks complete.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the application failed while sending the response")]
    AppAborted,
    #[error("the worker closed its slot mid-response")]
    WorkerGone,
    #[error("the worker broke the protocol mid-response")]
    Protocol,
    #[error("the response overran the site's request_timeout")]
    Timeout,
    #[error("the client took too long to read the response (send timeout or request_timeout)")]
    ClientTooSlow,
    #[error("the part of the response spooled to disk could not be written or read back")]
    Spool,
}

/// What a response's body must come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// None goes out (a HEAD's, a 204's, a 304's), whatever the head declares.
    Bodiless,
    /// What its Content-Length declares.
    Declared(u64),
    /// Whatever the worker sends.
    Open,
}

impl BodyLength {
    /// Whether a body of `n` bytes, all of it, is what was declared.
    pub fn check_whole(self, n: u64) -> Result<(), String> {
        match self {
            BodyLength::Declared(declared) if declared != n => Err(format!(
                "its response declared a Content-Length of {declared} and ended after {n} bytes"
            )),
            _ => Ok(()),
        }
    }

    /// Whether `n` bytes of the body so far stay within what was declared.
    pub fn check_so_far(self, n: u64) -> Result<(), String> {
        match self {
            BodyLength::Declared(declared) if n > declared => Err(format!(
                "its response declared a Content-Length of {declared} and sent more"
            )),
            _ => Ok(()),
        }
    }
}

pub enum ResponseBody {
    Full(Option<Bytes>),
    Worker(Box<WorkerBody>),
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> ResponseBody {
        ResponseBody::Full(Some(bytes).filter(|b| !b.is_empty()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Worker(body) => body.poll_data(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(bytes) => bytes.is_none(),
            ResponseBody::Worker(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Worker(_) => SizeHint::default(),
        }
    }
}

/// What the access log needs, captured when the request arrives.
pub struct PendingAccess {
    pub log: AccessTarget,
    pub peer: IpAddr,
    pub method: Method,
    pub target: Option<PathAndQuery>,
    pub version: &'static str,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub start: SystemTime,
    pub began: Instant,
    /// The worker that served the request, once one was assigned.
    pub worker_pid: Option<u32>,
}

impl PendingAccess {
    pub fn finish(self, status: u16, bytes: u64) {
        self.log.record(AccessRecord {
            peer: self.peer,
            start: self.start,
            method: self.method,
            target: self.target,
            version: self.version,
            status,
            bytes,
            referer: self.referer,
            user_agent: self.user_agent,
            duration: self.began.elapsed(),
            worker_pid: self.worker_pid,
        });
    }
}
