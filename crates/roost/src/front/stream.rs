//! A response streamed from the worker to the client.
//!
//! A pump task reads the worker's frames, whether or not the client reads: hyper polls
//! a body only when the client can take more (on HTTP/2, flow control may mean never),
//! so the exchange's deadlines are kept here, not in the body. What the client has not
//! taken yet is held in memory, within a node-wide budget, so the worker finishes at
//! its own pace and its slot serves the next request while a slow client downloads (as
//! nginx buffers its upstreams' responses). A full budget makes the pump wait for the
//! client, which then holds the worker; a client that takes nothing for the send
//! timeout is left, and the exchange salvaged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::Frame as BodyFrame;
use roost_wire::Frame;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout_at, Instant};

use super::body::{BodyError, PendingAccess, ResponseBody};
use super::exchange::Exchange;
use crate::worker::ConnError;

/// Most bytes one response may hold for its client: a large download to a slow client
/// cannot take the whole budget.
const RESPONSE_HOLD_MAX: usize = 32 << 20;

/// How the front streams responses; shared by every request.
#[derive(Debug)]
pub struct StreamPolicy {
    /// Longest time a client may take nothing of a response that is ready for it.
    pub send_timeout: Duration,
    /// Bytes held for slow clients, all responses together.
    held: AtomicUsize,
    held_max: usize,
}

impl StreamPolicy {
    pub fn new(send_timeout: Duration, held_max: usize) -> StreamPolicy {
        StreamPolicy {
            send_timeout,
            held: AtomicUsize::new(0),
            held_max,
        }
    }

    /// Bytes of responses the node holds for their clients now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// What the pump hands to the client's side.
enum Piece {
    Data(Bytes),
    End,
    Fail(BodyError),
}

/// The response's bytes read from the worker and not yet taken by the client.
struct Held<'a> {
    pieces: VecDeque<Bytes>,
    bytes: usize,
    policy: &'a StreamPolicy,
}

impl<'a> Held<'a> {
    fn new(policy: &'a StreamPolicy) -> Held<'a> {
        Held {
            pieces: VecDeque::new(),
            bytes: 0,
            policy,
        }
    }

    /// Whether another frame may be read from the worker into this. One always may:
    /// the one handed on next (with a full budget the response still streams, at the
    /// client's pace).
    fn has_room(&self) -> bool {
        self.pieces.is_empty()
            || (self.bytes < RESPONSE_HOLD_MAX
                && self.policy.held.load(Ordering::Relaxed) < self.policy.held_max)
    }

    fn push(&mut self, data: Bytes) {
        self.bytes += data.len();
        self.policy.held.fetch_add(data.len(), Ordering::Relaxed);
        self.pieces.push_back(data);
    }

    fn pop(&mut self) -> Option<Bytes> {
        let data = self.pieces.pop_front()?;
        self.bytes -= data.len();
        self.policy.held.fetch_sub(data.len(), Ordering::Relaxed);
        Some(data)
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.policy.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The response, its body fed by a pump task from the exchange. `pending` was read
/// with the head; `next` is what followed it, if that was no body frame.
pub(super) fn stream(
    ex: Exchange,
    mut response: Response<ResponseBody>,
    pending: VecDeque<Bytes>,
    next: Option<Result<Frame, ConnError>>,
    access: &mut Option<PendingAccess>,
    policy: &Arc<StreamPolicy>,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(pump(ex, pending, next, tx, policy.clone()));
    let body = WorkerBody {
        status: response.status().as_u16(),
        rx,
        ended: false,
        sent: 0,
        access: access.take(),
    };
    *response.body_mut() = ResponseBody::Worker(Box::new(body));
    response
}

async fn pump(
    mut ex: Exchange,
    pending: VecDeque<Bytes>,
    mut next: Option<Result<Frame, ConnError>>,
    tx: mpsc::Sender<Piece>,
    policy: Arc<StreamPolicy>,
) {
    let deadline = ex.deadline;
    let gone = ex.gone();
    let mut held = Held::new(&policy);
    for chunk in pending.into_iter().filter(|c| !c.is_empty()) {
        held.push(chunk);
    }
    // Since when the client has had something to take and taken nothing.
    let mut waiting_since = Instant::now();
    // How the response ended, once the worker has ended it; sent after what is held.
    let mut last = None;
    loop {
        let open = last.is_none();
        if !open && held.is_empty() {
            let by = Instant::now() + policy.send_timeout;
            let _ = timeout_at(by, tx.send(last.expect("checked above"))).await;
            return;
        }
        let frame = match next.take() {
            Some(frame) => frame,
            None => {
                let reading = async {
                    match ex.reader.as_mut() {
                        Some(reader) => reader.next_frame().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    // The client's side is gone; an open exchange is salvaged.
                    _ = tx.closed() => return,
                    permit = tx.reserve(), if !held.is_empty() => match permit {
                        Ok(permit) => {
                            permit.send(Piece::Data(held.pop().expect("not empty")));
                            waiting_since = Instant::now();
                            continue;
                        }
                        // The client's side is gone; an open exchange is salvaged.
                        Err(_) => return,
                    },
                    frame = reading, if open && held.has_room() => frame,
                    // The worker died while a child of its kept the socket open.
                    _ = gone.cancelled(), if open => Err(ConnError::Closed),
                    _ = sleep_until(deadline), if open => {
                        ex.kill("it overran request_timeout while streaming".into());
                        let _ = tx.try_send(Piece::Fail(BodyError::Timeout));
                        return;
                    }
                    _ = sleep_until(waiting_since + policy.send_timeout), if !held.is_empty() => {
                        // The client took nothing for the send timeout: leave it.
                        return;
                    }
                }
            }
        };
        last = Some(match frame {
            Ok(Frame::ResponseBody(data)) => {
                if held.is_empty() {
                    waiting_since = Instant::now();
                }
                if !data.is_empty() {
                    held.push(data);
                }
                continue;
            }
            // The slot goes back now, whatever the client still has to take.
            Ok(Frame::ResponseEnd) => {
                ex.finish();
                Piece::End
            }
            Ok(Frame::ResponseAbort) => {
                ex.finish();
                Piece::Fail(BodyError::AppAborted)
            }
            Ok(other) => {
                ex.kill(format!("sent {:?} inside a response body", other.kind()));
                Piece::Fail(BodyError::Protocol)
            }
            Err(ConnError::Closed) => {
                ex.lose();
                Piece::Fail(BodyError::WorkerGone)
            }
            Err(e) => {
                ex.kill(crate::error_chain(&e));
                Piece::Fail(BodyError::Protocol)
            }
        });
    }
}

/// A response body streamed from the worker as the client reads it.
pub struct WorkerBody {
    status: u16,
    rx: mpsc::Receiver<Piece>,
    ended: bool,
    sent: u64,
    access: Option<PendingAccess>,
}

impl WorkerBody {
    pub fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let result = match ready!(self.rx.poll_recv(cx)) {
            Some(Piece::Data(data)) => {
                self.sent += data.len() as u64;
                return Poll::Ready(Some(Ok(BodyFrame::data(data))));
            }
            Some(Piece::End) => None,
            Some(Piece::Fail(e)) => Some(Err(e)),
            // The pump left: this client took nothing for the send timeout.
            None => Some(Err(BodyError::ClientTooSlow)),
        };
        self.ended = true;
        self.log();
        Poll::Ready(result)
    }

    fn log(&mut self) {
        if let Some(access) = self.access.take() {
            access.finish(self.status, self.sent);
        }
    }
}

impl Drop for WorkerBody {
    fn drop(&mut self) {
        self.log();
    }
}
