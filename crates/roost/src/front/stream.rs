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
//! salvaged. While the pump waits for the client, the worker's request_timeout stops:
//! a slow client is not the app's fault. The request as a whole still ends at its
//! request_timeout: a client that holds it up past then is left (and the worker gets
//! the rest of its own time to finish).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::Frame as BodyFrame;
use roost_wire::Frame;
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep_until, timeout_at, Instant};

use super::body::{BodyError, BodyLength, PendingAccess, ResponseBody};
use super::exchange::Exchange;
use super::slow_clients::{SiteHold, SlowClients};
use crate::worker::ConnError;

/// Most bytes one response may hold in memory for its client: a large download to a
/// slow client cannot take the whole budget.
const RESPONSE_HOLD_MAX: usize = 32 << 20;

/// Most bytes one response may spool to disk (nginx's `proxy_max_temp_file_size`).
const RESPONSE_SPOOL_MAX: u64 = 1 << 30;

/// The part of a response kept on disk: an unlinked temporary file, written at its
/// end and read from its start.
struct Spool {
    file: Arc<File>,
    written: u64,
    read: u64,
}

/// Most bytes read back from a spool for the client at once.
const SPOOL_READ: u64 = 1 << 20;

/// A response that arrives whole with its head goes to hyper at once, without a pump,
/// if it is at most this big: it is not counted against the budgets, so a client
/// that reads nothing (an HTTP/2 stream with a closed window) holds at most this much
/// of the node per response beyond them.
pub(super) const UNCOUNTED_MAX: usize = 64 << 10;

/// What the pump hands to the client's side.
enum Piece {
    /// Bytes for the client, counted against the memory budget until hyper asks for
    /// the next piece: till then they wait in the channel or in hyper's buffers, which
    /// a client with a closed flow-control window can keep full until the send
    /// timeout (an HTTP/2 connection once per stream).
    Data(Bytes, Release),
    End,
    Fail(BodyError),
}

/// Bytes handed on, given back to the memory budget when dropped.
struct Release {
    bytes: u64,
    in_flight: Arc<InFlight>,
}

impl Drop for Release {
    fn drop(&mut self) {
        let in_flight = &self.in_flight;
        in_flight
            .policy
            .memory
            .sub(&in_flight.site.memory, self.bytes);
        in_flight.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        in_flight.taken.notify_one();
    }
}

/// What one response has handed on and the client's side not yet given back.
struct InFlight {
    bytes: AtomicU64,
    /// Some was given back: the pump may read from the worker again.
    taken: Notify,
    policy: Arc<SlowClients>,
    site: Arc<SiteHold>,
}

impl InFlight {
    /// `bytes` (counted against the memory budget already) handed on.
    fn hand_on(self: &Arc<Self>, bytes: u64) -> Release {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Release {
            bytes,
            in_flight: self.clone(),
        }
    }
}

/// Body frames smaller than this are copied together before they are held. A frame's
/// bytes are a slice of the buffer they were read into, which they keep alive whole,
/// and each held piece is a queue entry (and a write when spooled): a worker sending
/// one-byte frames made the node hold about 40 bytes of memory per byte it counted.
const SMALL_PIECE: usize = 16 << 10;

/// The response's bytes read from the worker and not yet taken by the client: in
/// memory, then (once memory is full) in a spool, which then takes everything after
/// them until the client has caught up. The newest small frames wait in `tail`, after
/// everything else, until they make a piece.
struct Held<'a> {
    pieces: VecDeque<Bytes>,
    tail: BytesMut,
    /// In memory: the pieces and the tail.
    bytes: usize,
    spool: Option<Spool>,
    /// A spool failed (a full disk): memory only from then on.
    no_spool: bool,
    policy: &'a SlowClients,
    site: &'a SiteHold,
}

impl<'a> Held<'a> {
    fn new(policy: &'a SlowClients, site: &'a SiteHold) -> Held<'a> {
        Held {
            pieces: VecDeque::new(),
            tail: BytesMut::new(),
            bytes: 0,
            spool: None,
            no_spool: false,
            policy,
            site,
        }
    }

    fn memory_has_room(&self) -> bool {
        self.bytes < RESPONSE_HOLD_MAX && self.policy.memory.has_room(&self.site.memory)
    }

    fn add_memory(&mut self, n: usize) {
        self.bytes += n;
        self.policy.memory.add(&self.site.memory, n as u64);
    }

    fn sub_memory(&mut self, n: usize) {
        self.bytes -= n;
        self.policy.memory.sub(&self.site.memory, n as u64);
    }

    fn spool_has_room(&self) -> bool {
        let mine = self.spool.as_ref().map_or(0, |s| s.written - s.read);
        !self.no_spool && mine < RESPONSE_SPOOL_MAX && self.policy.disk.has_room(&self.site.disk)
    }

    /// Whether another frame may be read from the worker into this. One always may
    /// once the client has taken everything, handed on or held (with full budgets
    /// the response still streams, at the client's pace).
    fn has_room(&self, in_flight: &InFlight) -> bool {
        (self.is_empty() && in_flight.bytes.load(Ordering::Relaxed) == 0)
            || self.memory_has_room()
            || self.spool_has_room()
    }

    /// Holds `data` after what is held. Fails when the spool, holding bytes that come
    /// first, cannot take it: in memory it would be handed on before them.
    async fn push(&mut self, data: Bytes) -> std::io::Result<()> {
        let small = data.len() < SMALL_PIECE;
        if small {
            self.tail.extend_from_slice(&data);
            self.add_memory(data.len());
            if self.tail.len() < SMALL_PIECE {
                return Ok(());
            }
        }
        // The tail is older than `data`: it goes first.
        if !self.tail.is_empty() {
            let tail = self.tail.split().freeze();
            self.sub_memory(tail.len());
            self.place(tail).await?;
        }
        if small {
            return Ok(());
        }
        self.place(data).await
    }

    /// Holds a piece after the pieces and the spool: in memory while there is room,
    /// else in the spool.
    async fn place(&mut self, data: Bytes) -> std::io::Result<()> {
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
                let dir = self.policy.spool_dir.clone();
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
        self.policy.disk.add(&self.site.disk, len);
        Ok(())
    }

    /// The next bytes for the client: the pieces, the spool, the tail; `None` when
    /// nothing is held. They stay counted against the memory budget: the [`Release`]
    /// that goes with them gives them back.
    async fn pop(&mut self) -> std::io::Result<Option<Bytes>> {
        if let Some(data) = self.pieces.pop_front() {
            self.bytes -= data.len();
            return Ok(Some(data));
        }
        let Some(spool) = &mut self.spool else {
            if self.tail.is_empty() {
                return Ok(None);
            }
            let data = self.tail.split().freeze();
            self.bytes -= data.len();
            return Ok(Some(data));
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
        self.policy.disk.sub(&self.site.disk, n);
        self.policy.memory.add(&self.site.memory, n);
        Ok(Some(data.into()))
    }

    fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.spool.is_none() && self.tail.is_empty()
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.sub_memory(self.bytes);
        if let Some(spool) = &self.spool {
            let n = spool.written - spool.read;
            self.policy.disk.sub(&self.site.disk, n);
        }
    }
}

/// The response, its body fed by a pump task from the exchange. `body` has what was
/// read of it with the head; `next` is what followed, if that was no body frame.
pub(super) fn stream(
    ex: Exchange,
    mut response: Response<ResponseBody>,
    body: BodySoFar,
    next: Option<Result<Frame, ConnError>>,
    access: &mut Option<PendingAccess>,
    policy: &Arc<SlowClients>,
    site: &Arc<SiteHold>,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(pump(ex, body, next, tx, policy.clone(), site.clone()));
    let body = WorkerBody {
        status: response.status().as_u16(),
        rx,
        ended: false,
        sent: 0,
        handed: None,
        access: access.take(),
    };
    *response.body_mut() = ResponseBody::Worker(Box::new(body));
    response
}

/// What the pump knows of the body when it starts: what it must come to, and what of
/// it was read with the head.
pub(super) struct BodySoFar {
    pub length: BodyLength,
    pub pending: VecDeque<Bytes>,
}

async fn pump(
    mut ex: Exchange,
    body: BodySoFar,
    next: Option<Result<Frame, ConnError>>,
    tx: mpsc::Sender<Piece>,
    policy: Arc<SlowClients>,
    site: Arc<SiteHold>,
) {
    let mut held_up_since = None;
    pump_frames(&mut ex, &mut held_up_since, body, next, &tx, &policy, &site).await;
    // An exchange left open is salvaged within the worker's own time.
    restart_worker_clock(&mut ex, &mut held_up_since);
}

/// `ex.deadline` is the worker's: it moves on by the time the client holds the worker
/// up (`held_up_since`). The request's own deadline is not stretched.
async fn pump_frames(
    ex: &mut Exchange,
    held_up_since: &mut Option<Instant>,
    body: BodySoFar,
    mut next: Option<Result<Frame, ConnError>>,
    tx: &mpsc::Sender<Piece>,
    policy: &Arc<SlowClients>,
    site: &Arc<SiteHold>,
) {
    let whole = ex.deadline;
    let gone = ex.gone();
    let mut held = Held::new(policy, site);
    let in_flight = Arc::new(InFlight {
        bytes: AtomicU64::new(0),
        taken: Notify::new(),
        policy: policy.clone(),
        site: site.clone(),
    });
    // hyper cuts a body at its Content-Length and ends the connection after one that
    // falls short; a worker that does either is lying about its response, and goes.
    let BodySoFar { length, pending } = body;
    let mut received = 0;
    for chunk in pending.into_iter().filter(|c| !c.is_empty()) {
        received += chunk.len() as u64;
        if let Err(e) = held.push(chunk).await {
            return cut_off(tx, e);
        }
    }
    // Since when the client has had something to take and taken nothing.
    let mut waiting_since = Instant::now();
    // How the response ended, once the worker has ended it; sent after what is held.
    let mut last = None;
    loop {
        let open = last.is_none();
        // The worker's turn: the pump reads its frames. Otherwise it waits for the
        // client to take what is held, or it has ended.
        let worker_turn = open && held.has_room(&in_flight);
        if open && !worker_turn {
            held_up_since.get_or_insert_with(Instant::now);
        } else {
            restart_worker_clock(ex, held_up_since);
        }
        if !open && held.is_empty() {
            let by = Instant::now() + policy.send_timeout;
            let _ = timeout_at(by, tx.send(last.expect("checked above"))).await;
            return;
        }
        let worker_deadline = ex.deadline;
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
                                Ok(Some(data)) => {
                                    let release = in_flight.hand_on(data.len() as u64);
                                    permit.send(Piece::Data(data, release));
                                }
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
                    frame = reading, if worker_turn => frame,
                    // The client's side took what was handed on: room again, maybe.
                    () = in_flight.taken.notified(), if open && !worker_turn => continue,
                    // The worker died while a child of its kept the socket open.
                    _ = gone.cancelled(), if open => Err(ConnError::Closed),
                    _ = sleep_until(worker_deadline), if worker_turn => {
                        ex.kill("it overran request_timeout while streaming".into());
                        let _ = tx.try_send(Piece::Fail(BodyError::Timeout));
                        return;
                    }
                    _ = sleep_until(whole), if open && !worker_turn => {
                        // The client made the request outlast request_timeout: leave
                        // it; the worker has the rest of its own time to finish.
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
                received += data.len() as u64;
                if let Err(why) = length.check_so_far(received) {
                    ex.kill(why);
                    let _ = tx.try_send(Piece::Fail(BodyError::Protocol));
                    return;
                }
                if held.is_empty() {
                    waiting_since = Instant::now();
                }
                if !data.is_empty() {
                    if let Err(e) = held.push(data).await {
                        return cut_off(tx, e);
                    }
                }
                continue;
            }
            // The slot goes back now, whatever the client still has to take.
            Ok(Frame::ResponseEnd) => match length.check_whole(received) {
                Ok(()) => {
                    ex.finish();
                    Piece::End
                }
                Err(why) => {
                    ex.kill(why);
                    Piece::Fail(BodyError::Protocol)
                }
            },
            Ok(Frame::ResponseAbort) => {
                ex.finish();
                Piece::Fail(BodyError::AppAborted)
            }
            Ok(other) => {
                ex.kill(format!("sent {:?} inside a response body", other.kind()));
                Piece::Fail(BodyError::Protocol)
            }
            Err(e) if e.is_closed() => {
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

/// The client holds the worker up no longer: the worker's request_timeout goes on,
/// later by the time it waited.
fn restart_worker_clock(ex: &mut Exchange, held_up_since: &mut Option<Instant>) {
    if let Some(since) = held_up_since.take() {
        ex.deadline += since.elapsed();
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
    /// The piece hyper took last: counted until it asks for the next.
    handed: Option<Release>,
    access: Option<PendingAccess>,
}

impl WorkerBody {
    pub fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, BodyError>>> {
        // Asked for more, hyper has written the last piece or buffered it within
        // its own small limits (HTTP/1.1: 64 KiB; HTTP/2: the stream's window).
        self.handed = None;
        if self.ended {
            return Poll::Ready(None);
        }
        let result = match ready!(self.rx.poll_recv(cx)) {
            Some(Piece::Data(data, release)) => {
                self.sent += data.len() as u64;
                self.handed = Some(release);
                return Poll::Ready(Some(Ok(BodyFrame::data(data))));
            }
            Some(Piece::End) => None,
            Some(Piece::Fail(e)) => Some(Err(e)),
            // The pump left this client: too slow.
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
