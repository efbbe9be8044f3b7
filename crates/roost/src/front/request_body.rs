//! The client's request body, as the front reads it: its first bytes before any worker
//! is involved, the rest (if any) streamed to the worker, and a client that stops
//! sending for too long is treated as gone.
//!
//! Reading ahead is the defence against slow uploads ("slow POST"): a client
//! dribbling a form post a byte at a time holds only its connection, not one of the
//! site's slots, as nginx's request buffering protects its upstreams. What is read
//! ahead counts against a node-wide budget (a site: a quarter of it); when that is full,
//! a body goes to its worker as it arrives.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::slow_clients::{Claim, SiteHold, SlowClients};
use super::FrontError;

/// Bytes of a body read before a slot is checked out (a little more when a frame
/// straddles it). Bodies up to this size (most form posts and API calls) reach the
/// worker whole, in one write.
pub const READ_AHEAD: usize = 64 << 10;

/// A request body still arriving from the client.
pub struct ClientBody {
    incoming: Incoming,
    /// Longest wait for the next bytes.
    idle: Duration,
}

/// Why the rest of a body will not come.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error("the client sent no byte of its request body for {0:?}")]
    Idle(Duration),
    #[error("the request body broke off")]
    Broken(#[source] hyper::Error),
}

impl ClientBody {
    pub fn new(incoming: Incoming, idle: Duration) -> ClientBody {
        ClientBody { incoming, idle }
    }

    /// The next bytes of the body; `None` at its end. Trailers are not passed on.
    pub async fn next(&mut self) -> Result<Option<Bytes>, BodyReadError> {
        loop {
            let frame = tokio::time::timeout(self.idle, self.incoming.frame())
                .await
                .map_err(|_| BodyReadError::Idle(self.idle))?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(BodyReadError::Broken(e)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }
}

/// A request body as it is when the front checks out a slot for it.
pub enum RequestBody {
    /// All of it (possibly nothing).
    Whole(Bytes),
    /// Its first [`READ_AHEAD`] bytes or more, and the rest still to come.
    Partial { first: Bytes, rest: ClientBody },
}

/// Reads up to [`READ_AHEAD`] bytes of the body, fewer when the read-ahead budget is
/// full; more than `limit` in all is refused (413) before any worker sees the request.
pub async fn read_ahead(
    incoming: Incoming,
    limit: u64,
    idle: Duration,
    budget: &SlowClients,
    site: &SiteHold,
) -> Result<RequestBody, FrontError> {
    if http_body::Body::is_end_stream(&incoming) {
        return Ok(RequestBody::Whole(Bytes::new()));
    }
    let mut body = ClientBody::new(incoming, idle);
    let mut first = BytesMut::new();
    // Held only while the client sends: the queue for a slot is bounded on its own.
    let mut claim = Claim::new(&budget.read_ahead, &site.read_ahead);
    while first.len() < READ_AHEAD && claim.has_room() {
        let Some(data) = body.next().await? else {
            return Ok(RequestBody::Whole(first.freeze()));
        };
        if (first.len() + data.len()) as u64 > limit {
            return Err(FrontError::BodyTooLarge { limit });
        }
        first.extend_from_slice(&data);
        claim.add(data.len() as u64);
    }
    Ok(RequestBody::Partial {
        first: first.freeze(),
        rest: body,
    })
}
