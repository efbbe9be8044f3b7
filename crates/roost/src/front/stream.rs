//! A response streamed from the worker to the client.
//!
//! A pump task reads the worker's frames, whether or not the client reads: hyper polls
//! a body only when the client can take more (on HTTP/2, flow control may mean never),
//! so the exchange's deadlines are kept here, not in the body. What the client has not
//! taken yet is held in memory, then in an unlinked temporary file, each within a
//! node-wide budget, so the worker finishes at its own pace and its slot serves the
//! next request while a slow client downloads (as nginx buffers its upstreams'
//! responses). Full budgets make the pump wait for the client, which then holds the
//! worker; a client that takes nothing for the send timeout is left, and the exchange
//! salvaged.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Most bytes one response may hold in memory for its client: a large download to a
/// slow client cannot take the whole budget.
const RESPONSE_HOLD_MAX: usize = 32 << 20;

/// Most bytes one response may spool to disk (nginx's `proxy_max_temp_file_size`).
const RESPONSE_SPOOL_MAX: u64 = 1 << 30;

/// The share of each budget one site's responses may hold: one site's slow clients
/// leave room for the others'.
const SITE_SHARE: u64 = 4;

/// What one site's responses hold for their clients now.
#[derive(Debug, Default)]
pub struct SiteHold {
    memory: AtomicUsize,
    disk: AtomicU64,
}

/// How the front streams responses; shared by every request.
#[derive(Debug)]
pub struct StreamPolicy {
    /// Longest time a client may take nothing of a response that is ready for it.
    pub send_timeout: Duration,
    /// Bytes held in memory for slow clients, all responses together.
    held: AtomicUsize,
    held_max: usize,
    /// Where responses beyond memory are spooled, and how many bytes at most.
    spool: Option<(PathBuf, u64)>,
    spooled: AtomicU64,
}

impl StreamPolicy {
    /// `spool`: a folder for temporary files and the most bytes in them, all responses
    /// together; `None` holds responses in memory only.
    pub fn new(send_timeout: Duration, held_max: usize, spool: Option<(PathBuf, u64)>) -> Self {
        StreamPolicy {
            send_timeout,
            held: AtomicUsize::new(0),
            held_max,
            spool,
            spooled: AtomicU64::new(0),
        }
    }
}

/// The part of a response kept on disk: an unlinked temporary file, written at its
/// end and read from its start.
struct Spool {
    file: Arc<File>,
    written: u64,
    read: u64,
}

/// Most bytes read back from a spool for the client at once.
const SPOOL_READ: u64 = 1 << 20;

/// What the pump hands to the client's side.
enum Piece {
    Data(Bytes),
    End,
    Fail(BodyError),
}

/// The response's bytes read from the worker and not yet taken by the client: in
/// memory, then (once memory is full) in a spool, which then takes everything after
/// them until the client has caught up.
struct Held<'a> {
    pieces: VecDeque<Bytes>,
    bytes: usize,
    spool: Option<Spool>,
    /// A spool failed (a full disk): memory only from then on.
    no_spool: bool,
    policy: &'a StreamPolicy,
    site: &'a SiteHold,
}

impl<'a> Held<'a> {
    fn new(policy: &'a StreamPolicy, site: &'a SiteHold) -> Held<'a> {
        Held {
            pieces: VecDeque::new(),
            bytes: 0,
            spool: None,
            no_spool: false,
            policy,
            site,
        }
    }

    fn memory_has_room(&self) -> bool {
        let max = self.policy.held_max;
        self.bytes < RESPONSE_HOLD_MAX
            && self.policy.held.load(Ordering::Relaxed) < max
            && self.site.memory.load(Ordering::Relaxed) < max / SITE_SHARE as usize
    }

    fn add_memory(&mut self, n: usize) {
        self.bytes += n;
        self.policy.held.fetch_add(n, Ordering::Relaxed);
        self.site.memory.fetch_add(n, Ordering::Relaxed);
    }

    fn sub_memory(&mut self, n: usize) {
        self.bytes -= n;
        self.policy.held.fetch_sub(n, Ordering::Relaxed);
        self.site.memory.fetch_sub(n, Ordering::Relaxed);
    }

    fn add_disk(&self, n: u64) {
        self.policy.spooled.fetch_add(n, Ordering::Relaxed);
        self.site.disk.fetch_add(n, Ordering::Relaxed);
    }

    fn sub_disk(&self, n: u64) {
        self.policy.spooled.fetch_sub(n, Ordering::Relaxed);
        self.site.disk.fetch_sub(n, Ordering::Relaxed);
    }

    fn spool_has_room(&self) -> bool {
        let Some((_, max)) = &self.policy.spool else {
            return false;
        };
        let mine = self.spool.as_ref().map_or(0, |s| s.written - s.read);
        !self.no_spool
            && mine < RESPONSE_SPOOL_MAX
            && self.policy.spooled.load(Ordering::Relaxed) < *max
            && self.site.disk.load(Ordering::Relaxed) < *max / SITE_SHARE
    }

    /// Whether another frame may be read from the worker into this. One always may:
    /// the one handed on next (with full budgets the response still streams, at the
    /// client's pace).
    fn has_room(&self) -> bool {
        self.is_empty() || self.memory_has_room() || self.spool_has_room()
    }

    /// Holds `data` after what is held. Fails when the spool, holding bytes that come
    /// first, cannot take it: in memory it would be handed on before them.
    async fn push(&mut self, data: Bytes) -> std::io::Result<()> {
        if self.spool.is_some() || (!self.memory_has_room() && self.spool_has_room()) {
            match self.spool_write(&data).await {
                Ok(()) => return Ok(()),
                Err(e) if self.spool.as_ref().is_some_and(|s| s.written > s.read) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot spool a response for a slow client; holding it in memory");
                    self.no_spool = true;
                    self.spool = None;
                }
            }
        }
        self.add_memory(data.len());
        self.pieces.push_back(data);
        Ok(())
    }

    async fn spool_write(&mut self, data: &Bytes) -> std::io::Result<()> {
        let spool = match &mut self.spool {
            Some(spool) => spool,
            None => {
                let (dir, _) = self.policy.spool.as_ref().expect("spool_has_room checked");
                let dir = dir.clone();
                let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
                    .await
                    .map_err(std::io::Error::other)??;
                self.spool.insert(Spool {
                    file: Arc::new(file),
                    written: 0,
                    read: 0,
                })
            }
        };
        let len = data.len() as u64;
        let (file, at, data) = (spool.file.clone(), spool.written, data.clone());
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .map_err(std::io::Error::other)??;
        spool.written += len;
        self.add_disk(len);
        Ok(())
    }

    /// The next bytes for the client, memory first; `None` when nothing is held.
    async fn pop(&mut self) -> std::io::Result<Option<Bytes>> {
        if let Some(data) = self.pieces.pop_front() {
            self.sub_memory(data.len());
            return Ok(Some(data));
        }
        let Some(spool) = &mut self.spool else {
            return Ok(None);
        };
        let n = (spool.written - spool.read).min(SPOOL_READ);
        let (file, at) = (spool.file.clone(), spool.read);
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; n as usize];
            file.read_exact_at(&mut buf, at).map(|()| buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        spool.read += n;
        if spool.read == spool.written {
            self.spool = None; // caught up: the file goes, memory again
        }
        self.sub_disk(n);
        Ok(Some(data.into()))
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.spool.is_none()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.sub_memory(self.bytes);
        if let Some(spool) = &self.spool {
            self.sub_disk(spool.written - spool.read);
        }
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
    site: &Arc<SiteHold>,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(pump(ex, pending, next, tx, policy.clone(), site.clone()));
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
    site: Arc<SiteHold>,
) {
    let deadline = ex.deadline;
    let gone = ex.gone();
    let mut held = Held::new(&policy, &site);
    for chunk in pending.into_iter().filter(|c| !c.is_empty()) {
        if let Err(e) = held.push(chunk).await {
            return cut_off(&tx, e);
        }
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
                            match held.pop().await {
                                Ok(Some(data)) => permit.send(Piece::Data(data)),
                                Ok(None) => unreachable!("not empty"),
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot read back a spooled response");
                                    permit.send(Piece::Fail(BodyError::Spool));
                                    return;
                                }
                            }
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
                    if let Err(e) = held.push(data).await {
                        return cut_off(&tx, e);
                    }
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

/// The spool failed with bytes still to hand on: the response cannot go on in order,
/// so it ends broken (an open exchange is then salvaged).
fn cut_off(tx: &mpsc::Sender<Piece>, e: std::io::Error) {
    tracing::warn!(error = %e, "cannot spool a response for a slow client; it is cut off");
    let _ = tx.try_send(Piece::Fail(BodyError::Spool));
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
