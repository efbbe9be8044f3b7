//! Followers: requests handed to a busy slot's inbox, to be read by its worker as soon
//! as it answered the requests before them (`worker/inbox.rs` says why).
//!
//! A request follows only when it has no body and fits an inbox, when nobody waits
//! before it, and when the site runs as many workers as it may (otherwise a new worker
//! serves it sooner); it follows the busy slot with the fewest followers (the one busy
//! the longest among equals), once that slot's own request is written whole, and at
//! most eight requests wait in an inbox (only workers of one slot have one). What
//! happens to a follower:
//!
//! ```text
//! posted ──the requests before it end cleanly────────────► served on that slot
//!    │──another slot comes free, no worker read it yet───► moved there (read back)
//!    │──its slot is lost, its worker retires or dies─────► read back: queued again first
//!    │                                                     already read: served there,
//!    │                                                     or 502 if the worker died
//!    │──has the slot, its worker dies before reading it──► read back: its exchange is
//!    │                                                     told, and sends it to another
//!    │                                                     worker (front/exchange.rs)
//!    └──its client leaves───────────────────────────────► read back, or its answer is
//!                                                           read and dropped (pool/mod.rs)
//! ```
//!
//! A read back takes the oldest request no worker took (each packet carries a tag, so
//! the node knows which); every request posted before it is with the worker, which
//! answers them in their order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Leave, Pool, PoolControl, Reply, State, Waiter, WorkerEntry};
use crate::pool::CheckoutError;
use crate::worker::{Foreign, Inbox, Packet, ReadBack, SlotConn, WorkerId, INBOX_DEPTH, TAG_LEN};

/// What the pool knows of one slot besides its socket.
pub(super) struct SlotState {
    inbox: Option<Inbox>,
    /// Set once the slot's current request is written whole: a follower posted before
    /// that could reach the worker first.
    pub(super) sent: Arc<AtomicBool>,
    /// When its current lease began; `None` while idle.
    pub(super) busy_since: Option<Instant>,
    /// Its current request, when that came through the inbox and the worker may not
    /// have read it yet: then it is in the inbox before every follower, and the node
    /// must not read it back (the worker would answer the next one in its place).
    current: Option<Current>,
    /// Requests posted behind the current one, in the order the worker reads them.
    followers: VecDeque<Follower>,
    /// The tag of the next packet posted.
    next_tag: u64,
}

/// A slot's current request, from the inbox, that its worker may not have read yet.
struct Current {
    packet: Packet,
    /// Told if the request is found still in the inbox once the slot is lost or its
    /// worker gone: no app saw it, and its exchange may send it elsewhere.
    unread: oneshot::Sender<()>,
}

struct Follower {
    reply: Reply,
    /// Its frames, as posted.
    request: Bytes,
    packet: Packet,
    posted: Instant,
    /// The worker read it (a read back found a later one, or none): no use trying again.
    taken: bool,
}

/// The states of a new worker's slots; `inboxes` is empty for a worker without.
pub(super) fn slot_states(slots: usize, inboxes: Vec<Inbox>) -> Vec<SlotState> {
    let mut inboxes = inboxes.into_iter();
    (0..slots)
        .map(|_| SlotState {
            inbox: inboxes.next(),
            sent: Arc::new(AtomicBool::new(false)),
            busy_since: None,
            current: None,
            followers: VecDeque::new(),
            next_tag: 0,
        })
        .collect()
}

impl SlotState {
    /// Posts `request` behind the slot's current one; gives both back if the pipe did
    /// not take it.
    fn post(&mut self, reply: Reply, request: Bytes) -> Result<(), (Reply, Bytes)> {
        let Some(inbox) = &self.inbox else {
            return Err((reply, request));
        };
        let packet = Packet {
            tag: self.next_tag,
            len: request.len() + TAG_LEN,
        };
        if !inbox.post(&request, packet.tag) {
            return Err((reply, request));
        }
        self.next_tag += 1;
        self.followers.push_back(Follower {
            reply,
            request,
            packet,
            posted: Instant::now(),
            taken: false,
        });
        Ok(())
    }

    /// The first follower now has the slot; its request may still be in the inbox,
    /// and if it is found there unread when the slot is lost, the receiver is told.
    fn promote(&mut self) -> Option<(Follower, Option<oneshot::Receiver<()>>)> {
        let first = self.followers.pop_front()?;
        let (current, unread) = if first.taken {
            (None, None)
        } else {
            let (unread, told) = oneshot::channel();
            let packet = first.packet;
            (Some(Current { packet, unread }), Some(told))
        };
        self.current = current;
        Some((first, unread))
    }

    /// True once the worker has read the slot's current request: only then may the
    /// node read from the inbox without taking it.
    fn current_taken(&mut self) -> bool {
        let (Some(_), Some(inbox)) = (&self.current, &self.inbox) else {
            return true;
        };
        // While the current request is there, no follower was taken: the pipe holds it
        // and all of them. Once it is gone, at most the untaken followers are.
        let untaken: usize = self
            .followers
            .iter()
            .filter(|f| !f.taken)
            .map(|f| f.packet.len)
            .sum();
        // Not knowing counts as still there: no read back is better than a wrong one.
        if inbox.queued().is_none_or(|queued| queued > untaken) {
            return false;
        }
        self.current = None;
        true
    }

    /// Reads back the oldest follower no worker took, if there is one and the current
    /// request is not before it; those posted before it are the worker's.
    fn take_oldest(&mut self) -> Result<Option<Follower>, Foreign> {
        if !self.current_taken() {
            return Ok(None);
        }
        let Some(inbox) = &self.inbox else {
            return Ok(None);
        };
        let packet = match inbox.read_back() {
            ReadBack::Packet(packet) => packet,
            ReadBack::Empty => {
                self.followers.iter_mut().for_each(|f| f.taken = true);
                return Ok(None);
            }
            ReadBack::Foreign => return Err(Foreign),
        };
        let at = self
            .followers
            .iter()
            .position(|f| !f.taken && f.packet == packet);
        let at = at.ok_or(Foreign)?;
        self.followers
            .iter_mut()
            .take(at)
            .for_each(|f| f.taken = true);
        Ok(self.followers.remove(at))
    }

    /// Empties the inbox: the followers in it leave the slot, in their order; those the
    /// worker read stay, taken. The current request, if it was still there, is gone,
    /// and its exchange is told.
    fn take_back_all(&mut self) -> Result<Vec<Follower>, Foreign> {
        let Some(inbox) = &self.inbox else {
            return Ok(Vec::new());
        };
        let mut packets = inbox.read_back_all()?.into_iter().peekable();
        // The slot's own request, still unread: it is not a follower's.
        if let Some(current) = self.current.take() {
            if packets.peek() == Some(&current.packet) {
                packets.next();
                let _ = current.unread.send(());
            }
        }
        let mut back = Vec::new();
        let mut kept = VecDeque::new();
        for mut f in self.followers.drain(..) {
            if !f.taken && packets.peek() == Some(&f.packet) {
                packets.next();
                back.push(f);
            } else {
                f.taken = true;
                kept.push_back(f);
            }
        }
        if packets.next().is_some() {
            // Packets come in posting order: one left over was never posted here as it
            // is. Nothing read back can be trusted; all fail with the worker.
            kept.extend(back.into_iter().map(|f| Follower { taken: true, ..f }));
            self.followers = kept;
            return Err(Foreign);
        }
        self.followers = kept;
        Ok(back)
    }
}

impl Pool {
    /// Posts `request` to the inbox of the busy slot with the fewest followers, if it
    /// may follow; gives both back otherwise.
    pub(super) fn follow(
        &mut self,
        mut reply: Reply,
        mut request: Bytes,
    ) -> Result<(), (Reply, Bytes)> {
        let at_most = self.active_workers() + self.asked >= self.site.pool.processes_max as usize;
        if !at_most || self.failure.is_some() {
            return Err((reply, request));
        }
        let mut candidates: Vec<(usize, Instant, WorkerId, usize)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == State::Running)
            .flat_map(|(id, w)| {
                w.slots.iter().enumerate().filter_map(move |(i, s)| {
                    let open = s.inbox.is_some() && s.followers.len() < INBOX_DEPTH;
                    let since = s
                        .busy_since
                        .filter(|_| open && s.sent.load(Ordering::Acquire))?;
                    Some((s.followers.len(), since, *id, i))
                })
            })
            .collect();
        candidates.sort_unstable();
        for (_, _, id, i) in candidates {
            let Some(slot) = self.workers.get_mut(&id).and_then(|w| w.slots.get_mut(i)) else {
                continue;
            };
            match slot.post(reply, request) {
                Ok(()) => return Ok(()),
                Err(back) => (reply, request) = back,
            }
        }
        Err((reply, request))
    }

    /// How many requests wait in inboxes.
    pub(super) fn followers(&self) -> usize {
        let slots = self.workers.values().flat_map(|w| &w.slots);
        slots.map(|s| s.followers.len()).sum()
    }

    /// Posts the waiters at the head of the queue that may follow.
    pub(super) fn follow_waiters(&mut self) {
        while let Some(waiter) = self.waiters.pop_front() {
            if waiter.reply.is_closed() {
                continue;
            }
            let Some(request) = waiter.request else {
                self.waiters.push_front(waiter);
                return;
            };
            if let Err((reply, request)) = self.follow(waiter.reply, request) {
                self.waiters.push_front(Waiter {
                    reply,
                    request: Some(request),
                });
                return;
            }
        }
    }

    /// A lease on `slot` came back: its first follower, if any, gets the slot (`Ok`),
    /// or is read back and queued again first, or fails with the worker; `Err` gives
    /// the slot back to the usual check-in. `leaving`: why the worker retires now, if
    /// it does; it still answers the followers it read, then.
    pub(super) fn hand_to_follower(
        &mut self,
        id: WorkerId,
        slot: usize,
        conn: Option<SlotConn>,
        leaving: Option<Leave>,
    ) -> Result<(), Option<SlotConn>> {
        let Some(w) = self.workers.get_mut(&id) else {
            return Err(conn);
        };
        let running = w.state == State::Running;
        let pid = w.pid;
        let Some(state) = w.slots.get_mut(slot) else {
            return Err(conn);
        };
        if conn.is_some() {
            // Its answer came: the worker had read it.
            state.current = None;
        }
        let Some(first) = state.followers.front() else {
            if conn.is_none() && state.current.is_some() {
                // Lost: its request may never have left the inbox.
                if state.take_back_all().is_err() {
                    self.tampered(id);
                }
            }
            return Err(conn);
        };
        // Bytes read past the answer are the follower's answer beginning, if the worker
        // read its request; its exchange checks them like any other.
        let stay = conn.is_some() && running && leaving.is_none() && !first.reply.is_closed();
        if !stay {
            // A lost slot's current request failed with it.
            match state.take_back_all() {
                Ok(back) => self.queue_first(back),
                Err(Foreign) => {
                    self.tampered(id);
                    return Err(None);
                }
            }
        }
        let w = self.workers.get_mut(&id).expect("looked up above");
        let Some((follower, unread)) = w.slots[slot].promote() else {
            return Err(conn);
        };
        let Some(conn) = conn else {
            // The worker read it and will never answer it.
            let _ = follower.reply.send(Err(CheckoutError::WorkerLost {
                site: self.site.name.clone(),
                pid,
            }));
            return Err(None);
        };
        w.served += 1;
        w.last_used = Instant::now();
        let mut lease = self.lease(id, conn, true);
        lease.unread = unread;
        // If its client left meanwhile, the lease skips the answer before it comes back.
        let _ = follower.reply.send(Ok(lease));
        if let Some(leave) = leaving {
            self.leave(id, leave);
        }
        Ok(())
    }

    /// A slot of worker `id` is free: the oldest follower no worker has read is read
    /// back and gets it. Gives the slot back if there is none.
    pub(super) fn move_follower(&mut self, id: WorkerId, conn: SlotConn) -> Option<SlotConn> {
        let mut waiting: Vec<(Instant, WorkerId, usize)> = self
            .workers
            .iter()
            .flat_map(|(wid, w)| {
                w.slots.iter().enumerate().filter_map(move |(i, s)| {
                    let f = s.followers.iter().find(|f| !f.taken)?;
                    Some((f.posted, *wid, i))
                })
            })
            .collect();
        waiting.sort_unstable();
        for (_, wid, i) in waiting {
            let Some(state) = self.workers.get_mut(&wid).and_then(|w| w.slots.get_mut(i)) else {
                continue;
            };
            loop {
                match state.take_oldest() {
                    Ok(Some(f)) if f.reply.is_closed() => continue,
                    Ok(Some(f)) => {
                        self.lend(id, conn, f.reply);
                        return None;
                    }
                    Ok(None) => break,
                    Err(Foreign) => {
                        self.tampered(wid);
                        break;
                    }
                }
            }
        }
        Some(conn)
    }

    /// A worker exited: no process reads its inboxes any more, so what is still in
    /// them is queued again; what it read is lost with it.
    pub(super) fn release_followers(&mut self, w: &mut WorkerEntry) {
        for state in &mut w.slots {
            match state.take_back_all() {
                Ok(back) => self.queue_first(back),
                // Nothing there can be trusted: all fail.
                Err(Foreign) => {
                    let note = format!("worker pid {} wrote into its inbox", w.pid);
                    tracing::error!("{note}");
                    w.log.error(&note);
                }
            }
            for follower in std::mem::take(&mut state.followers) {
                let _ = follower.reply.send(Err(CheckoutError::WorkerLost {
                    site: self.site.name.clone(),
                    pid: w.pid,
                }));
            }
        }
    }

    /// Followers no worker has read wait again, in their order, before everyone else.
    fn queue_first(&mut self, followers: Vec<Follower>) {
        for follower in followers.into_iter().rev() {
            self.waiters.push_front(Waiter {
                reply: follower.reply,
                request: Some(follower.request),
            });
        }
    }

    /// What came back from a worker's inbox is not what the node posted: the loader
    /// never writes there. Its followers fail with it when it exits.
    fn tampered(&mut self, id: WorkerId) {
        self.handle(PoolControl::Kill {
            worker: id,
            reason: "it wrote into its inbox".into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    use super::*;

    /// A slot with an inbox, and the worker's end of it.
    fn slot_with_inbox() -> (SlotState, OwnedFd) {
        let (inbox, worker_end) = Inbox::new().unwrap();
        let mut states = slot_states(1, vec![inbox]);
        (states.pop().unwrap(), worker_end)
    }

    fn post(slot: &mut SlotState, request: &'static [u8]) {
        let (reply, _) = tokio::sync::oneshot::channel();
        assert!(slot.post(reply, Bytes::from_static(request)).is_ok());
    }

    /// What the worker reads next, without its tag.
    fn worker_takes(worker_end: &OwnedFd) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        let n = nix::unistd::read(worker_end.as_raw_fd(), &mut buf).unwrap();
        buf[..n - TAG_LEN].to_vec()
    }

    fn requests(followers: &VecDeque<Follower>) -> Vec<(&[u8], bool)> {
        followers
            .iter()
            .map(|f| (&f.request[..], f.taken))
            .collect()
    }

    #[test]
    fn a_read_back_never_takes_the_current_request_from_the_worker() {
        let (mut slot, worker_end) = slot_with_inbox();
        post(&mut slot, b"a");
        post(&mut slot, b"b");
        post(&mut slot, b"c");
        // "a" has the slot now, but the worker has not read it yet.
        assert_eq!(&slot.promote().unwrap().0.request[..], b"a");
        assert!(slot.take_oldest().unwrap().is_none());
        assert_eq!(worker_takes(&worker_end), b"a");
        let moved = slot.take_oldest().unwrap().unwrap();
        assert_eq!(&moved.request[..], b"b");
        assert_eq!(worker_takes(&worker_end), b"c");
        assert_eq!(requests(&slot.followers), [(&b"c"[..], false)]);
        assert!(slot.take_oldest().unwrap().is_none());
        assert_eq!(requests(&slot.followers), [(&b"c"[..], true)]);
    }

    /// The exchange of a slot's current request hears whether the worker had read it
    /// when the inbox is emptied (the slot lost, the worker gone); only then is it told.
    #[test]
    fn an_emptied_inbox_tells_whether_the_current_request_was_still_in_it() {
        let (mut slot, worker_end) = slot_with_inbox();
        post(&mut slot, b"a");
        post(&mut slot, b"b");
        let (_, mut unread) = slot.promote().unwrap();
        let back = slot.take_back_all().unwrap();
        assert_eq!(&back[0].request[..], b"b");
        assert_eq!(unread.take().unwrap().try_recv(), Ok(()));

        post(&mut slot, b"c");
        let (_, unread) = slot.promote().unwrap();
        assert_eq!(worker_takes(&worker_end), b"c");
        assert!(slot.take_back_all().unwrap().is_empty());
        // Read by the worker: the sender is gone without a word.
        assert_eq!(
            unread.unwrap().try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        );
    }

    #[test]
    fn what_the_worker_read_stays_with_the_slot_in_its_order() {
        let (mut slot, worker_end) = slot_with_inbox();
        for r in [&b"a"[..], b"b", b"c", b"d"] {
            let (reply, _) = tokio::sync::oneshot::channel();
            assert!(slot.post(reply, Bytes::from_static(r)).is_ok());
        }
        assert_eq!(worker_takes(&worker_end), b"a");
        assert_eq!(&slot.take_oldest().unwrap().unwrap().request[..], b"b");
        assert_eq!(worker_takes(&worker_end), b"c");
        let back = slot.take_back_all().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(&back[0].request[..], b"d");
        assert_eq!(
            requests(&slot.followers),
            [(&b"a"[..], true), (&b"c"[..], true)]
        );
    }

    #[test]
    fn a_packet_the_node_never_posted_is_refused() {
        let (mut slot, worker_end) = slot_with_inbox();
        post(&mut slot, b"a");
        // A worker of the node's own user can open its end of the pipe again for
        // writing: a packet of its own, with a tag the node never used.
        let path = format!("/proc/self/fd/{}", worker_end.as_raw_fd());
        let forged = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        std::io::Write::write_all(&mut &forged, b"forged\0\0\0\0\0\0\0\x07").unwrap();
        assert!(slot.take_back_all().is_err());
        // Nothing read back is trusted: every follower fails with the worker.
        assert_eq!(requests(&slot.followers), [(&b"a"[..], true)]);

        // Bytes written just before the node posts run together with its packet,
        // which then keeps its tag but not its length.
        let (mut slot, worker_end) = slot_with_inbox();
        let path = format!("/proc/self/fd/{}", worker_end.as_raw_fd());
        let forged = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        std::io::Write::write_all(&mut &forged, b"junk").unwrap();
        post(&mut slot, b"b");
        assert!(matches!(slot.take_oldest(), Err(Foreign)));
    }
}
