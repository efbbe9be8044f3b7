//! The pool of one site: its workers, their slots, and the queue of requests waiting.
//!
//! One actor task per site owns all of the pool's state (`actor`); the front talks
//! to it through a cheap, cloneable [`PoolHandle`]. A request checks out a [`Lease`]
//! on one slot, uses the slot's socket directly (the actor is not on the data path),
//! and the lease goes back to the actor when dropped. When every slot is busy, a
//! request without a body may be handed to a busy slot's inbox instead of waiting in
//! the queue: it "follows" the request there (`actor/follow.rs`, `worker/inbox.rs`).

mod actor;
mod budget;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use roost_registry::Site;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use actor::{spawn_pool, PoolContext};
pub use budget::{default_max_workers, Budget, BudgetLimits, Permit, PoolUsage};

use crate::worker::{SlotConn, WorkerEvent, WorkerId};

/// Why a request got no slot.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckoutError {
    #[error("the queue of site {site:?} is full ({max} waiting)")]
    QueueFull { site: String, max: u32 },
    #[error("no slot of site {site:?} became free within {waited:?}")]
    QueueTimeout { site: String, waited: Duration },
    #[error("the application of site {site:?} cannot start; retrying in {retry_in:?}")]
    AppFailing { site: String, retry_in: Duration },
    #[error("site {0:?} is being removed")]
    Draining(String),
    /// The request was handed to a busy worker's inbox, and the worker died after it
    /// read it.
    #[error("worker pid {pid} of site {site:?} died with the request")]
    WorkerLost { site: String, pid: u32 },
}

/// One message per [`PoolHandle`] method, plus what worker tasks report.
#[derive(Debug)]
pub enum PoolControl {
    /// `request`: the request's frames, when it has no body and fits an inbox.
    Checkout {
        reply: oneshot::Sender<Result<Lease, CheckoutError>>,
        request: Option<Bytes>,
    },
    /// A lease came back: `conn` is `None` when the slot is unusable.
    Checkin {
        worker: WorkerId,
        slot: usize,
        conn: Option<SlotConn>,
    },
    /// The worker broke the protocol or overran its request: SIGKILL it.
    Kill {
        worker: WorkerId,
        reason: String,
    },
    Worker(WorkerEvent),
    Reconfigure(Arc<Site>),
    /// The site was removed: finish what is queued and in flight, then stop.
    Drain,
    /// The node budget grants room for one worker.
    Permit(Permit),
    /// The budget asks for the least recently used idle worker and, if `memory`, the
    /// workers' resident memory (a read of /proc per worker, which a budget without
    /// `max_memory` does not need).
    Usage {
        reply: oneshot::Sender<PoolUsage>,
        memory: bool,
    },
    /// The budget needs room: retire this worker if it is still idle.
    Evict(WorkerId),
    /// A look at the site's entry file answered (or was given up).
    EntryLooked(actor::EntryLooked),
    /// A write of the site's cgroup limits answered.
    LimitsWritten(actor::LimitsWritten),
}

/// The cheap side of a pool.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    tx: mpsc::UnboundedSender<PoolControl>,
    /// Requests waiting in the pool's queue, as the actor last counted them.
    waiting: Arc<AtomicUsize>,
    /// [`SERVING`], [`DRAINING`] or [`ENDED`]: shared so that a site added back while
    /// its pool drains either revives the pool or waits for its end, never both.
    phase: Arc<AtomicU8>,
    /// Closed when the actor's task is over, its cgroup removed.
    done: watch::Receiver<()>,
}

const SERVING: u8 = 0;
const DRAINING: u8 = 1;
/// The actor no longer takes the site back: it is removing the site's cgroup.
const ENDED: u8 = 2;

impl PoolHandle {
    /// True when requests wait for a slot: one checked in now goes to them.
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Waits for a slot, at most `queue_timeout`. `request` is the request's frames
    /// when it may follow a busy slot's request (no body, at most
    /// [`INBOX_MAX`](crate::worker::INBOX_MAX) bytes); the lease then may say it is
    /// [`delivered`](Lease::delivered) already.
    pub async fn checkout(
        &self,
        site: &Site,
        request: Option<Bytes>,
    ) -> Result<Lease, CheckoutError> {
        let (reply, rx) = oneshot::channel();
        let draining = || CheckoutError::Draining(site.name.clone());
        self.tx
            .send(PoolControl::Checkout { reply, request })
            .map_err(|_| draining())?;
        match tokio::time::timeout(site.pool.queue_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(draining()),
            Err(_) => Err(CheckoutError::QueueTimeout {
                site: site.name.clone(),
                waited: site.pool.queue_timeout,
            }),
        }
    }

    pub fn kill(&self, worker: WorkerId, reason: String) {
        let _ = self.tx.send(PoolControl::Kill { worker, reason });
    }

    pub fn reconfigure(&self, site: Arc<Site>) {
        let _ = self.tx.send(PoolControl::Reconfigure(site));
    }

    pub fn drain(&self) {
        self.phase.store(DRAINING, Ordering::SeqCst);
        let _ = self.tx.send(PoolControl::Drain);
    }

    /// The site was added back while this pool drains: the pool serves it again, as
    /// after a change. False when the pool has ended already (its task is finishing:
    /// a new pool for the site must wait for [`ended`](Self::ended)).
    pub fn revive(&self, site: Arc<Site>) -> bool {
        let revived = self
            .phase
            .compare_exchange(DRAINING, SERVING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if revived {
            self.reconfigure(site);
        }
        revived
    }

    /// Resolves when the actor's task is over (at once if it is).
    pub async fn ended(&self) {
        let mut done = self.done.clone();
        while done.changed().await.is_ok() {}
    }

    fn draining(&self) -> bool {
        self.phase.load(Ordering::SeqCst) == DRAINING
    }

    /// The drained actor's last word: it ends unless it was revived meanwhile.
    fn end(&self) -> bool {
        self.phase
            .compare_exchange(DRAINING, ENDED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

/// One slot of one worker, lent to one request.
///
/// Dropping the lease returns the slot: [`Lease::put_back`] first when it is clean
/// (the exchange ended on a frame boundary), otherwise it is counted as lost and
/// the worker retires.
#[derive(Debug)]
pub struct Lease {
    pub worker: WorkerId,
    /// The worker's process id, for the access log.
    pub pid: u32,
    slot: usize,
    conn: Option<SlotConn>,
    pool: PoolHandle,
    /// Cancelled when the worker's process is gone: a socket it handed to a child
    /// of its own may never close, so the exchange must not wait for end of file.
    pub gone: CancellationToken,
    /// The request went through the slot's inbox and the worker has it, or will read
    /// it next: only its answer is to be read.
    pub delivered: bool,
    /// For a delivered request the worker may not have read yet: told if, the slot
    /// lost (this lease back without its socket) or the worker gone, the pool found
    /// the request still in the inbox. No app saw it then.
    pub unread: Option<oneshot::Receiver<()>>,
    /// Set once the whole request is written (a request may follow it then).
    sent: Arc<AtomicBool>,
    /// How long the worker may take to answer a delivered request nobody waits for.
    request_timeout: Duration,
}

impl Lease {
    /// The slot's socket; the lease then holds nothing until [`put_back`](Self::put_back).
    /// Whoever takes it reads the answer to a delivered request.
    pub fn take(&mut self) -> SlotConn {
        self.delivered = false;
        self.conn
            .take()
            .expect("a lease is taken once per exchange")
    }

    /// The whole request is written to the slot: another request may be posted to
    /// follow it.
    pub fn request_sent(&self) {
        self.sent.store(true, Ordering::Release);
    }

    pub fn put_back(&mut self, conn: SlotConn) {
        self.conn = Some(conn);
    }

    pub fn pool(&self) -> PoolHandle {
        self.pool.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (worker, slot, pool) = (self.worker, self.slot, self.pool.clone());
        let checkin = move |conn| {
            let _ = pool.tx.send(PoolControl::Checkin { worker, slot, conn });
        };
        let conn = self.conn.take();
        let runtime = tokio::runtime::Handle::try_current();
        match (conn, runtime) {
            // The worker answers a request nobody waits for any more: its answer is
            // skipped before the slot is used again.
            (Some(conn), Ok(runtime)) if self.delivered => {
                let pool = self.pool.clone();
                let deadline = tokio::time::Instant::now() + self.request_timeout;
                let gone = self.gone.clone();
                runtime.spawn(async move {
                    let (mut reader, writer) = conn.split();
                    match reader.skip_response(deadline, &gone).await {
                        Ok(()) => checkin(SlotConn::join(reader, writer)),
                        Err(why) => {
                            if let Some(why) = why {
                                pool.kill(worker, why);
                            }
                            checkin(None);
                        }
                    }
                });
            }
            (conn, _) => checkin(conn.filter(|_| !self.delivered)),
        }
    }
}

#[cfg(test)]
impl PoolHandle {
    /// A handle whose actor is the test holding `tx`'s receiver, and the sender whose
    /// drop says the actor ended.
    pub fn detached(tx: mpsc::UnboundedSender<PoolControl>) -> (PoolHandle, watch::Sender<()>) {
        let (done_tx, done) = watch::channel(());
        let handle = PoolHandle {
            tx,
            waiting: Default::default(),
            phase: Default::default(),
            done,
        };
        (handle, done_tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use roost_wire::{encode_header, Kind};
    use tokio::io::AsyncWriteExt;

    /// A lease on one end of a socket pair, as the pool hands a follower its slot.
    fn delivered_lease(tx: mpsc::UnboundedSender<PoolControl>) -> (Lease, tokio::net::UnixStream) {
        let (node, worker) = tokio::net::UnixStream::pair().unwrap();
        let lease = Lease {
            worker: 7,
            pid: 0,
            slot: 0,
            conn: Some(SlotConn::new(node, 0)),
            pool: PoolHandle::detached(tx).0,
            gone: CancellationToken::new(),
            delivered: true,
            unread: None,
            sent: Default::default(),
            request_timeout: Duration::from_secs(5),
        };
        (lease, worker)
    }

    fn site() -> Arc<Site> {
        Arc::new(crate::testing::site("again", &["again.test"]))
    }

    #[tokio::test]
    async fn a_draining_pool_is_revived_or_ends_never_both() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (pool, done) = PoolHandle::detached(tx);
        assert!(!pool.revive(site()), "a serving pool was revived");
        pool.drain();
        assert!(pool.draining());
        assert!(pool.revive(site()));
        assert!(!pool.draining());
        assert!(!pool.end(), "a revived pool ended");
        assert!(matches!(rx.recv().await, Some(PoolControl::Drain)));
        assert!(matches!(rx.recv().await, Some(PoolControl::Reconfigure(_))));

        pool.drain();
        assert!(pool.end());
        assert!(!pool.revive(site()), "an ended pool was revived");
        assert!(!pool.draining());
        let ended = tokio::spawn({
            let pool = pool.clone();
            async move { pool.ended().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !ended.is_finished(),
            "ended before the actor's task was over"
        );
        drop(done);
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("ended() did not resolve when the actor's task was over")
            .unwrap();
    }

    #[tokio::test]
    async fn a_delivered_answer_nobody_reads_is_skipped_before_the_slot_goes_back() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (lease, mut worker) = delivered_lease(tx);
        drop(lease);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "checked in before the answer came");
        let mut answer = BytesMut::new();
        encode_header(&mut answer, Kind::ResponseHead, 0);
        encode_header(&mut answer, Kind::ResponseBody, 3);
        answer.extend_from_slice(b"abc");
        encode_header(&mut answer, Kind::ResponseEnd, 0);
        worker.write_all(&answer).await.unwrap();
        match rx.recv().await {
            Some(PoolControl::Checkin {
                worker: 7,
                slot: 0,
                conn: Some(conn),
            }) => assert!(!conn.has_stray_bytes()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_delivered_answer_that_breaks_the_protocol_kills_the_worker() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (lease, mut worker) = delivered_lease(tx);
        drop(lease);
        let mut answer = BytesMut::new();
        encode_header(&mut answer, Kind::Ready, 0);
        worker.write_all(&answer).await.unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(PoolControl::Kill { worker: 7, .. })
        ));
        assert!(matches!(
            rx.recv().await,
            Some(PoolControl::Checkin { conn: None, .. })
        ));
    }
}
