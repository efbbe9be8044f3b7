//! One request on one slot: send the head and stream the body to the worker, read the
//! response back, and leave the slot clean for the next request, whatever happens.
//!
//! The slot is clean once both directions reached a frame boundary with an end frame:
//! the response's RESPONSE_END/RESPONSE_ABORT, and our REQUEST_END/REQUEST_ABORT.
//! When the client goes away early the [`Exchange`] is dropped unfinished and a
//! salvage task finishes both directions in the background (until the request's
//! deadline; then the worker is killed), so a disconnecting client costs no worker.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method, Response, StatusCode};
use roost_wire::{encode_header, Frame, Kind, ResponseHead, MAX_BODY_CHUNK};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::body::{BodyLength, PendingAccess, ResponseBody};
use super::request_body::{ClientBody, RequestBody};
use super::slow_clients::SlowClients;
use super::stream::{stream, BodySoFar, UNCOUNTED_MAX};
use super::FrontError;
use crate::pool::{CheckoutError, Lease, PoolHandle};
use crate::route::Route;
use crate::worker::{ConnError, FrameReader, SlotConn, INBOX_MAX};

/// Headers that describe one hop; a WSGI app must not send them (PEP 3333) and the
/// front drops them so they cannot confuse hyper's own framing.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

enum Writer {
    Idle(OwnedWriteHalf),
    /// A task streams the request body; dropping `stop` makes it end with ABORT.
    Pumping {
        task: JoinHandle<Option<OwnedWriteHalf>>,
        stop: oneshot::Sender<()>,
    },
    Gone,
}

#[derive(PartialEq, Eq)]
enum State {
    /// Mid-exchange: dropping it now salvages the slot.
    Open,
    /// Both directions ended cleanly, or the slot is beyond saving.
    Closed,
}

pub struct Exchange {
    lease: Option<Lease>,
    pool: PoolHandle,
    pub(super) reader: Option<FrameReader>,
    writer: Writer,
    pub(super) deadline: Instant,
    state: State,
}

impl Exchange {
    /// Cancelled when the worker's process is gone.
    pub(super) fn gone(&self) -> CancellationToken {
        self.lease
            .as_ref()
            .map(|l| l.gone.clone())
            .unwrap_or_default()
    }

    fn worker(&self) -> u64 {
        self.lease.as_ref().map_or(0, |l| l.worker)
    }

    /// The worker misbehaved or overran: SIGKILL, and the slot is lost with it.
    pub(super) fn kill(&mut self, reason: String) {
        self.pool.kill(self.worker(), reason);
        self.state = State::Closed;
    }

    /// The slot is unusable (the worker closed it); the lease goes back empty.
    pub(super) fn lose(&mut self) {
        self.state = State::Closed;
    }

    /// The response ended cleanly: finish our direction and return the slot.
    pub(super) fn finish(&mut self) {
        self.state = State::Closed;
        let (Some(mut lease), Some(reader)) = (self.lease.take(), self.reader.take()) else {
            return;
        };
        match std::mem::replace(&mut self.writer, Writer::Gone) {
            Writer::Idle(writer) => {
                if let Some(conn) = SlotConn::join(reader, writer) {
                    lease.put_back(conn);
                }
            }
            Writer::Pumping { task, stop } => {
                drop(stop);
                tokio::spawn(async move {
                    if let Ok(Some(writer)) = task.await {
                        if let Some(conn) = SlotConn::join(reader, writer) {
                            lease.put_back(conn);
                        }
                    }
                });
            }
            Writer::Gone => {}
        }
    }

    fn check_frame(&mut self, frame: Result<Frame, ConnError>) -> Result<Frame, FrontError> {
        match frame {
            Ok(f) => Ok(f),
            Err(e) if e.is_closed() => {
                self.lose();
                Err(FrontError::WorkerGone)
            }
            Err(e) => {
                let why = crate::error_chain(&e);
                self.kill(why.clone());
                Err(FrontError::Protocol(why))
            }
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.state != State::Open {
            return;
        }
        let (Some(lease), Some(reader)) = (self.lease.take(), self.reader.take()) else {
            return;
        };
        let writer = std::mem::replace(&mut self.writer, Writer::Gone);
        let (pool, deadline) = (self.pool.clone(), self.deadline);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(salvage(lease, pool, reader, writer, deadline));
        }
    }
}

/// Finishes an abandoned exchange: discard the rest of the response, end the request
/// body, and return the slot; past the deadline the worker is killed instead.
async fn salvage(
    mut lease: Lease,
    pool: PoolHandle,
    mut reader: FrameReader,
    writer: Writer,
    deadline: Instant,
) {
    let writer = match writer {
        Writer::Idle(w) => WriterOutcome::Ready(w),
        Writer::Pumping { task, stop } => {
            drop(stop);
            WriterOutcome::Task(task)
        }
        Writer::Gone => return,
    };
    match reader.skip_response(deadline, &lease.gone).await {
        Ok(()) => {}
        Err(None) => return,
        Err(Some(why)) => return pool.kill(lease.worker, why),
    }
    let writer = match writer {
        WriterOutcome::Ready(w) => Some(w),
        WriterOutcome::Task(task) => task.await.ok().flatten(),
    };
    if let Some(conn) = writer.and_then(|w| SlotConn::join(reader, w)) {
        lease.put_back(conn);
    }
}

enum WriterOutcome {
    Ready(OwnedWriteHalf),
    Task(JoinHandle<Option<OwnedWriteHalf>>),
}

/// How many more workers a request of one packet is sent to when the one it went to
/// turns out to have ended before reading it (killed while idle, just before the pool
/// learnt of it): no app saw the request, so sending it again repeats nothing. Bounded,
/// so that a site whose workers all die at once fails fast.
const UNREAD_RETRIES: u32 = 2;

/// Sends one request to the site's worker and returns its response.
pub async fn forward(
    route: &Route,
    method: &Method,
    head: Bytes,
    body: RequestBody,
    access: &mut Option<PendingAccess>,
    policy: &Arc<SlowClients>,
) -> Result<Response<ResponseBody>, FrontError> {
    let site = &route.site;
    let (first, mut rest) = match body {
        RequestBody::Whole(all) => (all, None),
        RequestBody::Partial { first, rest } => (first, Some(rest)),
    };
    // A request whose frames fit one packet is read by a worker whole or not at all,
    // so it can be sent again if a worker's end closes with it unread. Of those, one
    // without a body may follow a busy slot's request (pool/actor/follow.rs): its
    // frames go with the checkout. Others are encoded once they have a slot, so a
    // queued body is not held twice.
    let packet = (rest.is_none() && head.len() + first.len() <= INBOX_MAX)
        .then(|| request_frames(&head, &first, true))
        .filter(|frames| frames.len() <= INBOX_MAX);
    let follower = packet.clone().filter(|_| first.is_empty());
    let mut retries = UNREAD_RETRIES;
    let (mut ex, frame) = loop {
        let request = Request {
            head: &head,
            first: &first,
            rest: rest.take(),
            packet: packet.clone(),
            follower: follower.clone(),
        };
        match start(route, request, access).await? {
            Started::Answered { ex, frame } => break (ex, frame),
            Started::Unread { pid } if retries > 0 => {
                retries -= 1;
                tracing::info!(pid, site = %site.name, "worker ended before reading a request; sending it to another");
                route.logs.error(&format!(
                    "worker pid {pid} ended before it read a request; the request goes to another worker"
                ));
            }
            Started::Unread { .. } => return Err(FrontError::WorkerGone),
        }
    };
    let payload = match ex.check_frame(frame)? {
        Frame::ResponseHead(payload) => payload,
        other => {
            let why = format!("sent {:?} where a response head belongs", other.kind());
            ex.kill(why.clone());
            return Err(FrontError::Protocol(why));
        }
    };
    let (mut response, length) = match response_head(&payload, method) {
        Ok(r) => r,
        Err(why) => {
            ex.kill(why.clone());
            return Err(FrontError::Protocol(why));
        }
    };

    // Fast path: the whole response is already buffered (the usual small page), and
    // small enough to go to hyper at once, uncounted.
    let mut chunks = VecDeque::new();
    let mut buffered = 0;
    let reader = ex.reader.as_mut().expect("set above");
    let next = loop {
        match reader.buffered() {
            Ok(Some(Frame::ResponseBody(b))) => {
                buffered += b.len();
                chunks.push_back(b);
            }
            Ok(Some(Frame::ResponseEnd)) if buffered > UNCOUNTED_MAX => {
                break Some(Ok(Frame::ResponseEnd));
            }
            Ok(Some(Frame::ResponseEnd)) => {
                // hyper frames a body it is given whole by the body's size, and writes
                // the app's Content-Length as it is: were they to differ, a client
                // would take the bytes past the declared length for the next response,
                // or the next response's start for the rest of this body.
                if let Err(why) = length.check_whole(buffered as u64) {
                    ex.kill(why.clone());
                    return Err(FrontError::Protocol(why));
                }
                ex.finish();
                // hyper would not send a bodiless response's body, nor expect one.
                if length != BodyLength::Bodiless {
                    let body = if chunks.len() <= 1 {
                        chunks.pop_front().unwrap_or_default()
                    } else {
                        chunks.iter().flatten().copied().collect::<Vec<u8>>().into()
                    };
                    *response.body_mut() = ResponseBody::full(body);
                }
                // The slot goes back now. When requests wait for one, this task steps
                // aside: the pool hands the slot to the next, which writes to the worker
                // before this response is written to its client, and a worker that finds
                // its next request waiting goes on without sleeping (under load: ~10 %
                // more requests a second, docs/benchmarks.md).
                let hand_on = ex.pool.has_waiters();
                drop(ex);
                if hand_on {
                    tokio::task::yield_now().await;
                }
                return Ok(response);
            }
            Ok(None) => break None,
            // An abort or a violation: the streaming body reports it in order.
            other => break Some(other.map(|f| f.expect("matched above"))),
        }
    };
    let body = BodySoFar {
        length,
        pending: chunks,
    };
    Ok(stream(
        ex,
        response,
        body,
        next,
        access,
        policy,
        &route.hold,
    ))
}

/// What [`start`] sends.
struct Request<'a> {
    head: &'a Bytes,
    /// What the front has of the body (all of it when `rest` is `None`).
    first: &'a Bytes,
    rest: Option<ClientBody>,
    /// Its frames, when they fit one packet (an inbox's).
    packet: Option<Bytes>,
    /// The same, when it has no body too: it may follow a busy slot's request.
    follower: Option<Bytes>,
}

/// How sending a request to a worker went, short of a failure.
// Returned once per attempt and taken apart at once; boxing the exchange would cost
// every request an allocation.
#[allow(clippy::large_enum_variant)]
enum Started {
    /// The worker's first frame (or why none came), and the exchange it belongs to.
    Answered {
        ex: Exchange,
        frame: Result<Frame, ConnError>,
    },
    /// The worker's end of the slot closed with the request written into it unread,
    /// whole: no app saw it.
    Unread { pid: u32 },
}

/// Takes a slot, writes the request to it (unless a follower's was posted to its
/// inbox), streams the body in the background, and waits for the worker's first frame.
async fn start(
    route: &Route,
    request: Request<'_>,
    access: &mut Option<PendingAccess>,
) -> Result<Started, FrontError> {
    let site = &route.site;
    let Request {
        head,
        first,
        rest,
        packet,
        follower,
    } = request;
    let checkout = route.pool.checkout(site, follower).await;
    let mut lease = match checkout {
        Ok(lease) => lease,
        Err(CheckoutError::WorkerLost { pid, .. }) => {
            if let Some(access) = access.as_mut() {
                access.worker_pid = Some(pid);
            }
            return Err(FrontError::WorkerGone);
        }
        Err(e) => return Err(e.into()),
    };
    let pid = lease.pid;
    if let Some(access) = access.as_mut() {
        access.worker_pid = Some(pid);
    }
    let lease_gone = lease.gone.clone();
    let deadline = Instant::now() + site.pool.request_timeout;
    let delivered = lease.delivered;
    let (mut reader, mut writer) = lease.take().split();
    // A request of one packet, written when the worker had read all of the one
    // before, is read whole or not at all: then what the worker left unread says
    // whether it began it.
    let split = !delivered && packet.is_none();
    let after_split = reader.request_written(split);
    let whole_or_none = !delivered && !split && !after_split;
    let pool = lease.pool();
    let mut ex = Exchange {
        lease: Some(lease),
        pool,
        reader: Some(reader),
        writer: Writer::Gone,
        deadline,
        state: State::Open,
    };

    if !delivered {
        let out = packet.unwrap_or_else(|| request_frames(head, first, rest.is_none()));
        match timeout_at(deadline, writer.write_all(&out)).await {
            Ok(Ok(())) => {}
            // One write, refused: the worker's end is closed (or shut for reading), and
            // none of the request reached it.
            Ok(Err(e)) if !split && is_closed_peer(&e) => {
                ex.lose();
                return Ok(Started::Unread { pid });
            }
            _ => {
                ex.lose();
                return Err(FrontError::WorkerGone);
            }
        }
        if rest.is_none() {
            if let Some(lease) = &ex.lease {
                lease.request_sent();
            }
        }
    }
    let mut too_large = None;
    if let Some(rest) = rest {
        let (stop, stop_rx) = oneshot::channel();
        let (over, over_rx) = oneshot::channel();
        let task = tokio::spawn(pump_request_body(
            writer,
            rest,
            first.len() as u64,
            site.pool.body_max,
            deadline,
            stop_rx,
            over,
        ));
        ex.writer = Writer::Pumping { task, stop };
        too_large = Some(over_rx);
    } else {
        ex.writer = Writer::Idle(writer);
    }

    let reader = ex.reader.as_mut().expect("set above");
    let frame = tokio::select! {
        frame = timeout_at(deadline, reader.next_frame()) => frame,
        _ = lease_gone.cancelled() => Ok(Err(ConnError::Closed)),
        Ok(()) = async { too_large.as_mut().expect("guarded").await }, if too_large.is_some() => {
            return Err(FrontError::BodyTooLarge { limit: site.pool.body_max });
        }
    };
    let Ok(frame) = frame else {
        ex.kill("it overran request_timeout".into());
        return Err(FrontError::Timeout);
    };
    // The process may be known gone before its socket's end is read: the socket says
    // whether the request was left in it. Otherwise bytes left unread may be the end of
    // a request the worker began, or not this request at all (a follower's came
    // through the inbox).
    let frame = match frame {
        Err(ConnError::Closed) if whole_or_none => Err(reader.after_exit()),
        Err(ConnError::Unread) if !whole_or_none => Err(ConnError::Closed),
        other => other,
    };
    if matches!(frame, Err(ConnError::Unread)) {
        ex.lose();
        return Ok(Started::Unread { pid });
    }
    if delivered && frame.as_ref().is_err_and(ConnError::is_closed) {
        let unread = ex.lease.as_mut().and_then(|lease| lease.unread.take());
        ex.lose();
        // The lease goes back without its socket: the pool reads the worker's inbox
        // back, and says whether the request was still in it.
        drop(ex);
        let told = match unread {
            Some(told) => matches!(timeout_at(deadline, told).await, Ok(Ok(()))),
            None => false,
        };
        return if told {
            Ok(Started::Unread { pid })
        } else {
            Err(FrontError::WorkerGone)
        };
    }
    Ok(Started::Answered { ex, frame })
}

/// Whether a write failed because the worker's end of the slot is closed, or shut for
/// reading: either way it took none of what the write carried.
fn is_closed_peer(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// The frames that start a request: its head, what the front has of its body, and its
/// end when that is all of it; the node sends them in one write.
fn request_frames(head: &[u8], first: &[u8], whole: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(head.len() + first.len() + 32);
    encode_header(&mut out, Kind::RequestHead, head.len());
    out.extend_from_slice(head);
    for chunk in first.chunks(MAX_BODY_CHUNK) {
        encode_header(&mut out, Kind::RequestBody, chunk.len());
        out.extend_from_slice(chunk);
    }
    if whole {
        encode_header(&mut out, Kind::RequestEnd, 0);
    }
    out.freeze()
}

/// The response a worker's head describes, and the length its body must have.
fn response_head(
    payload: &[u8],
    method: &Method,
) -> Result<(Response<ResponseBody>, BodyLength), String> {
    let head = ResponseHead::parse(payload).map_err(|e| e.to_string())?;
    let mut response = Response::new(ResponseBody::Full(None));
    *response.status_mut() = StatusCode::from_u16(head.status).map_err(|e| e.to_string())?;
    let headers = response.headers_mut();
    for (name, value) in head.headers {
        let name = HeaderName::from_bytes(name).map_err(|e| e.to_string())?;
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        let value = HeaderValue::from_bytes(value).map_err(|e| e.to_string())?;
        headers.append(name, value);
    }
    // RFC 9110 §8.6: no Content-Length on a 204, which has no body whatever it says.
    if head.status == 204 {
        headers.remove(header::CONTENT_LENGTH);
    }
    // A HEAD's, a 204's and a 304's Content-Length describe no body that is sent.
    let length = if method == Method::HEAD || matches!(head.status, 204 | 304) {
        BodyLength::Bodiless
    } else {
        head.content_length
            .map_or(BodyLength::Open, BodyLength::Declared)
    };
    Ok((response, length))
}

/// Streams the rest of the client's body (`sent` bytes of it already went with the
/// head) to the worker as frames, bounded by the site's limit; a client that stops
/// sending aborts the body (the app sees the request end early, and the slot stays
/// clean).
/// Returns the write half for reuse, or `None` if the slot can no longer be trusted.
async fn pump_request_body(
    mut writer: OwnedWriteHalf,
    mut body: ClientBody,
    sent: u64,
    limit: u64,
    deadline: Instant,
    mut stop: oneshot::Receiver<()>,
    too_large: oneshot::Sender<()>,
) -> Option<OwnedWriteHalf> {
    let mut total = sent;
    let mut too_large = Some(too_large);
    let mut header = BytesMut::with_capacity(5);
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = &mut stop => break Kind::RequestAbort,
            next = body.next() => next,
        };
        let data = match next {
            Ok(Some(data)) => data,
            Ok(None) => break Kind::RequestEnd,
            Err(_) => break Kind::RequestAbort,
        };
        total += data.len() as u64;
        if total > limit {
            if let Some(tx) = too_large.take() {
                let _ = tx.send(());
            }
            break Kind::RequestAbort;
        }
        for chunk in data.chunks(MAX_BODY_CHUNK) {
            header.clear();
            encode_header(&mut header, Kind::RequestBody, chunk.len());
            let write = write_frame(&mut writer, &header, chunk);
            if !matches!(timeout_at(deadline, write).await, Ok(Ok(()))) {
                return None;
            }
        }
    };
    header.clear();
    encode_header(&mut header, end, 0);
    match timeout_at(deadline, writer.write_all(&header)).await {
        Ok(Ok(())) => Some(writer),
        _ => None,
    }
}

/// Writes a frame's header and payload, in one system call when the socket takes both.
async fn write_frame(
    writer: &mut OwnedWriteHalf,
    header: &[u8],
    payload: &[u8],
) -> std::io::Result<()> {
    let parts = [
        std::io::IoSlice::new(header),
        std::io::IoSlice::new(payload),
    ];
    let n = writer.write_vectored(&parts).await?;
    if n < header.len() {
        writer.write_all(&header[n..]).await?;
        return writer.write_all(payload).await;
    }
    writer.write_all(&payload[n - header.len()..]).await
}
