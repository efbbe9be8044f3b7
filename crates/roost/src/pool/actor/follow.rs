//! Followers: requests handed to a busy slot's inbox, to be read by its worker as soon
//! as it answered the request it is busy with (`worker/inbox.rs` says why).
//!
//! A request follows only when it has no body and fits an inbox, when nobody waits
//! before it, and when the site runs as many workers as it may (otherwise a new worker
//! serves it sooner); it follows the slot busy the longest, once that slot's own
//! request is written whole, and at most one request waits in an inbox. What happens
//! to a follower:
//!
//! ```text
//! posted ──its slot's request ends cleanly──────────────► served on that slot
//!    │──another slot comes free, no worker read it yet──► moved there (read back)
//!    │──its slot is lost, its worker retires or dies────► read back: queued again first
//!    │                                                    already read: served there,
//!    │                                                    or 502 if the worker died
//!    └──its client leaves──────────────────────────────► read back, or its answer is
//!                                                          read and dropped (pool/mod.rs)
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Pool, PoolControl, Reply, State, Waiter, WorkerEntry};
use crate::pool::CheckoutError;
use crate::worker::{Inbox, Reclaim, SlotConn, WorkerId};

/// What the pool knows of one slot besides its socket.
pub(super) struct SlotState {
    inbox: Option<Inbox>,
    /// Set once the slot's current request is written whole: a follower posted before
    /// that could reach the worker first.
    pub(super) sent: Arc<AtomicBool>,
    /// When its current lease began; `None` while idle.
    pub(super) busy_since: Option<Instant>,
    follower: Option<Follower>,
}

struct Follower {
    reply: Reply,
    /// Its frames, as posted.
    request: Bytes,
    posted: Instant,
    /// The worker read it (a reclaim found the inbox empty): no use trying again.
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
            follower: None,
        })
        .collect()
}

impl Pool {
    /// Posts `request` to the inbox of the slot busy the longest, if it may follow;
    /// gives both back otherwise.
    pub(super) fn follow(&mut self, reply: Reply, request: Bytes) -> Result<(), (Reply, Bytes)> {
        let at_most = self.active_workers() + self.asked >= self.site.pool.processes_max as usize;
        if !at_most || self.failure.is_some() {
            return Err((reply, request));
        }
        let mut candidates: Vec<(Instant, WorkerId, usize)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == State::Running)
            .flat_map(|(id, w)| {
                w.slots.iter().enumerate().filter_map(move |(i, s)| {
                    let open = s.inbox.is_some() && s.follower.is_none();
                    let since = s
                        .busy_since
                        .filter(|_| open && s.sent.load(Ordering::Acquire))?;
                    Some((since, *id, i))
                })
            })
            .collect();
        candidates.sort_unstable();
        for (_, id, i) in candidates {
            let Some(slot) = self.workers.get_mut(&id).and_then(|w| w.slots.get_mut(i)) else {
                continue;
            };
            let Some(inbox) = &slot.inbox else { continue };
            // The request before may still be in it, unread.
            if inbox.is_empty() && inbox.post(&request) {
                slot.follower = Some(Follower {
                    reply,
                    request,
                    posted: Instant::now(),
                    taken: false,
                });
                return Ok(());
            }
        }
        Err((reply, request))
    }

    /// How many requests wait in inboxes.
    pub(super) fn followers(&self) -> usize {
        let slots = self.workers.values().flat_map(|w| &w.slots);
        slots.filter(|s| s.follower.is_some()).count()
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

    /// A lease on `slot` came back: its follower, if any, gets the slot (`Ok`), or is
    /// read back and queued again first, or fails with the worker; `Err` gives the
    /// slot back to the usual check-in. `leaving`: why the worker retires now, if it
    /// does; it still answers a follower it read, then.
    pub(super) fn hand_to_follower(
        &mut self,
        id: WorkerId,
        slot: usize,
        conn: Option<SlotConn>,
        leaving: Option<&'static str>,
    ) -> Result<(), Option<SlotConn>> {
        let Some(w) = self.workers.get_mut(&id) else {
            return Err(conn);
        };
        let running = w.state == State::Running;
        let pid = w.pid;
        let Some(state) = w.slots.get_mut(slot) else {
            return Err(conn);
        };
        let Some(follower) = state.follower.take() else {
            return Err(conn);
        };
        let inbox = state
            .inbox
            .as_ref()
            .expect("a follower was posted to an inbox");
        // Bytes read past the answer are the follower's answer beginning, if the worker
        // read its request; its exchange checks them like any other.
        let stay = conn.is_some() && running && leaving.is_none() && !follower.reply.is_closed();
        if !stay {
            match inbox.reclaim(follower.request.len()) {
                Reclaim::Back => {
                    self.queue_first(follower);
                    return Err(conn);
                }
                Reclaim::Torn => {
                    self.torn(id, follower);
                    return Err(None);
                }
                Reclaim::Taken if conn.is_none() => {
                    let _ = follower.reply.send(Err(CheckoutError::WorkerLost {
                        site: self.site.name.clone(),
                        pid,
                    }));
                    return Err(conn);
                }
                // The worker has it and will answer it on this slot.
                Reclaim::Taken => {}
            }
        }
        let conn = conn.expect("a follower stays only on a slot that came back");
        let w = self.workers.get_mut(&id).expect("looked up above");
        w.served += 1;
        w.last_used = Instant::now();
        let lease = self.lease(id, conn, true);
        // If its client left meanwhile, the lease skips the answer before it comes back.
        let _ = follower.reply.send(Ok(lease));
        if let Some(why) = leaving {
            self.retire(id, why);
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
                    let f = s.follower.as_ref().filter(|f| !f.taken)?;
                    Some((f.posted, *wid, i))
                })
            })
            .collect();
        waiting.sort_unstable();
        for (_, wid, i) in waiting {
            let Some(state) = self.workers.get_mut(&wid).and_then(|w| w.slots.get_mut(i)) else {
                continue;
            };
            let (Some(inbox), Some(follower)) = (&state.inbox, &mut state.follower) else {
                continue;
            };
            match inbox.reclaim(follower.request.len()) {
                Reclaim::Taken => follower.taken = true,
                Reclaim::Torn => {
                    let follower = state.follower.take().expect("matched above");
                    self.torn(wid, follower);
                }
                Reclaim::Back => {
                    let follower = state.follower.take().expect("matched above");
                    if follower.reply.is_closed() {
                        continue;
                    }
                    self.lend(id, conn, follower.reply);
                    return None;
                }
            }
        }
        Some(conn)
    }

    /// A worker exited: no process reads its inboxes any more, so what is still in
    /// them is queued again; what it read is lost with it.
    pub(super) fn release_followers(&mut self, w: &mut WorkerEntry) {
        for state in &mut w.slots {
            let (Some(inbox), Some(follower)) = (&state.inbox, state.follower.take()) else {
                continue;
            };
            match inbox.reclaim(follower.request.len()) {
                Reclaim::Back | Reclaim::Torn => self.queue_first(follower),
                Reclaim::Taken => {
                    let _ = follower.reply.send(Err(CheckoutError::WorkerLost {
                        site: self.site.name.clone(),
                        pid: w.pid,
                    }));
                }
            }
        }
    }

    /// A follower no worker has read waits again, before everyone else.
    fn queue_first(&mut self, follower: Follower) {
        self.waiters.push_front(Waiter {
            reply: follower.reply,
            request: Some(follower.request),
        });
    }

    /// The worker read part of a request from its inbox: the loader never does that.
    fn torn(&mut self, id: WorkerId, follower: Follower) {
        self.handle(PoolControl::Kill {
            worker: id,
            reason: "it read part of a request from its inbox".into(),
        });
        self.queue_first(follower);
    }
}
