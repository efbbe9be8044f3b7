//! The pool actor: the only owner of one site's workers, idle slots and queue.
//!
//! Worker states, as the pool sees them:
//!
//! ```text
//! Starting ──Ready──► Running ──idle_timeout / max_requests / lost slot /──► Retiring ──► (gone)
//!     │                  │       site changed / entry file touched             ▲ busy slots come
//!     └─StartFailed──► (gone, the site backs off before the next attempt)       │ back, then Stop
//!                        └──Kill (timeout, protocol violation) ─────────────────┘
//! ```
//!
//! A site with `preload` on has a template ([`SiteTemplate`]) that forks its workers:
//! it starts with the first worker, and is retired when the site goes quiet (its last
//! worker retired as idle, evicted or given up to another site waiting for the node
//! budget, or no worker at all for idle_timeout after the last one died; processes.min
//! keeps workers, and so it, alive), when no worker could start, when the site changes
//! or is removed, and when its entry file is touched. A worker recycled (max_requests,
//! memory.worker_soft) or lost is replaced by a new fork of the same template.

mod entry;
mod follow;
mod limits;
mod memory;
mod sweep;
mod template;

pub use entry::EntryLooked;
pub use limits::LimitsWritten;
use sweep::Sweep;
use template::new_template;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use roost_registry::Site;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Budget, CheckoutError, Lease, Permit, PoolControl, PoolHandle};
use crate::logs::{ProcessLog, SiteLogs};
use crate::spawn::{SiteCgroup, SiteFiles, SiteTemplate, Spawn};
use crate::worker::{self, SlotConn, WorkerContext, WorkerEvent, WorkerHandle, WorkerId};

/// Why a worker retires once it has answered its request.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// Replaced by a fresh one when next needed: max_requests, memory.worker_soft.
    Recycled(&'static str),
    /// Its room goes to another site that waits for the node budget.
    YieldRoom,
}

/// Worker ids are unique in the node, across pools.
static NEXT_WORKER_ID: AtomicU64 = AtomicU64::new(1);

/// How often a pool with workers looks at idle time (and the entry file, at most once
/// a second: `entry`).
const TICK: Duration = Duration::from_millis(250);
/// First and longest wait before retrying a site whose workers fail to start.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Starts killed from outside (SIGKILL, SIGTERM) in a row that are tried again at once,
/// the queue kept: an operator's or a monitor's kill, or a fault, is not the app
/// failing to load; the OOM killer at every import is, and gets the backoff from the
/// next one on.
const KILLED_STARTS_RETRIED: u32 = 2;

/// What a pool needs from the node.
#[derive(Clone)]
pub struct PoolContext {
    pub spawner: Arc<dyn Spawn>,
    pub logs: Arc<SiteLogs>,
    /// The site's cgroup; limits are rewritten when the site changes, and the cgroup is
    /// removed when the pool ends.
    pub cgroup: Arc<SiteCgroup>,
    /// The site's looks at its own files.
    pub files: SiteFiles,
    /// How long a worker whose slots are closed may take to exit before SIGKILL.
    pub stop_grace: Duration,
    /// No memory cgroup: enforce memory.max by summing the workers' RSS every tick.
    pub poll_memory: bool,
    /// The node-wide budget every worker needs a permit from.
    pub budget: Budget,
    /// Where the site's private TMPDIR is, removed with what is in it when the pool
    /// ends.
    pub tmp_root: PathBuf,
}

type Reply = oneshot::Sender<Result<Lease, CheckoutError>>;

/// A request waiting for a slot; `request` its frames, if it may follow a busy slot's
/// request.
struct Waiter {
    reply: Reply,
    request: Option<Bytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Running,
    Retiring,
}

struct WorkerEntry {
    handle: WorkerHandle,
    state: State,
    pid: u32,
    idle: Vec<SlotConn>,
    /// What the pool knows of each slot besides its socket (empty until ready); a
    /// slot is busy while it is lent.
    slots: Vec<follow::SlotState>,
    served: u64,
    last_used: Instant,
    /// The pool ordered SIGKILL: its death is expected, not news.
    killed: bool,
    /// Its room in the node budget, given back when the entry goes.
    _permit: Permit,
    /// Cancelled when the process exits; every lease on it carries a clone.
    gone: tokio_util::sync::CancellationToken,
    /// The error log it prints into (until it is ready, the site's when it was asked
    /// for), for the node's notes on it: a worker of the site's previous owner still
    /// finishing has those go to that owner's log, not to the new owner's.
    log: ProcessLog,
}

impl WorkerEntry {
    /// How many of its slots are lent.
    fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.busy_since.is_some()).count()
    }
}

/// The site cannot start workers; requests fail fast until `retry_at`.
struct Failure {
    attempts: u32,
    retry_at: Instant,
}

struct Pool {
    site: Arc<Site>,
    ctx: PoolContext,
    /// Given to leases and worker tasks so they can report back.
    handle: PoolHandle,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    waiters: VecDeque<Waiter>,
    failure: Option<Failure>,
    /// The entry file, whose change reloads the site.
    entry: entry::EntryWatch,
    /// Budget permits granted and not yet used by a worker.
    permits: Vec<Permit>,
    /// Permits asked for and not granted yet.
    asked: usize,
    /// Forks the workers when the site preloads its app.
    template: Option<Arc<SiteTemplate>>,
    /// When the last worker went (none started since): a template left without
    /// workers this long (idle_timeout) goes too.
    empty_since: Option<Instant>,
    /// What the workers left behind, once the last one went.
    sweep: Sweep,
    /// Writes of the site's cgroup limits as it changes.
    limits: limits::LimitsWriter,
    /// Starts killed from outside since a worker last became ready.
    killed_starts: u32,
}

/// Starts the actor of `site`; the task ends after a drain, once its workers exited.
/// `after`: pools of the same site name still ending; they remove the site's cgroup,
/// so this one starts its workers after them, in a cgroup made anew.
pub fn spawn_pool(
    site: Arc<Site>,
    ctx: PoolContext,
    after: Vec<PoolHandle>,
) -> (PoolHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done) = watch::channel(());
    let handle = PoolHandle {
        tx,
        waiting: Default::default(),
        phase: Default::default(),
        done,
    };
    let span = tracing::info_span!("pool", site = %site.name);
    let template = new_template(&site, &ctx);
    let pids_in_force = site.pool.pids_max;
    let pool = Pool {
        entry: Default::default(),
        site,
        ctx,
        handle: handle.clone(),
        workers: BTreeMap::new(),
        waiters: VecDeque::new(),
        failure: None,
        permits: Vec::new(),
        asked: 0,
        template,
        empty_since: None,
        sweep: Sweep::Armed,
        limits: limits::LimitsWriter::new(pids_in_force),
        killed_starts: 0,
    };
    let task = tokio::spawn(tracing::Instrument::instrument(
        pool.run(rx, after, done_tx),
        span,
    ));
    (handle, task)
}

impl Pool {
    /// `done` is dropped on return, which ends [`PoolHandle::ended`].
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<PoolControl>,
        after: Vec<PoolHandle>,
        _done: watch::Sender<()>,
    ) {
        // They remove the cgroup this pool makes anew with its first process.
        for previous in &after {
            previous.ended().await;
        }
        // Registered by the site's name: any pool of that name before it has ended.
        self.ctx
            .budget
            .register(&self.site.name, self.handle.tx.clone());
        self.warn_of_version_conflicts();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.spawn_as_needed();
        loop {
            let ticking = !self.workers.is_empty()
                || self.failure.is_some()
                || self.template.as_ref().is_some_and(|t| t.is_live())
                || matches!(self.sweep, Sweep::Due(_))
                || self.limits.waiting();
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = tick.tick(), if ticking => self.on_tick(),
            }
            self.handle
                .waiting
                .store(self.waiters.len(), std::sync::atomic::Ordering::Relaxed);
            if self.handle.draining() && self.waiters.is_empty() {
                let busy = self
                    .workers
                    .values()
                    .any(|w| w.busy() > 0 || w.state == State::Starting);
                if !busy {
                    self.retire_all("the site was removed");
                }
                if self.workers.is_empty() && self.handle.end() {
                    break;
                }
            }
        }
        self.retire_template();
        // Removal kills what is left and retries rmdir while it dies (up to a second):
        // not on a runtime thread, which every other site shares.
        let (cgroup, tmp_root, name) = (
            self.ctx.cgroup.clone(),
            self.ctx.tmp_root.clone(),
            self.site.name.clone(),
        );
        let _ = tokio::task::spawn_blocking(move || {
            cgroup.remove();
            crate::spawn::tmpdir::discard(&tmp_root, &name);
        })
        .await;
        self.ctx.budget.unregister(&self.site.name);
        tracing::info!("pool stopped");
    }

    fn handle(&mut self, msg: PoolControl) {
        match msg {
            PoolControl::Checkout { reply, request } => self.checkout(reply, request),
            PoolControl::Checkin { worker, slot, conn } => self.checkin(worker, slot, conn),
            PoolControl::Kill { worker, reason } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    tracing::error!(pid = w.pid, %reason, "killing worker");
                    w.log
                        .error(&format!("killing worker pid {}: {reason}", w.pid));
                    w.handle.kill();
                    w.killed = true;
                    w.state = State::Retiring;
                    w.idle.clear();
                }
            }
            PoolControl::Worker(event) => self.worker_event(event),
            PoolControl::Reconfigure(site) => {
                tracing::info!("site changed: recycling its workers");
                self.site = site;
                self.write_limits();
                self.failure = None;
                self.entry.rebase();
                self.renew("the site changed");
            }
            PoolControl::Drain => {
                tracing::info!(waiting = self.waiters.len(), "draining");
            }
            PoolControl::Permit(permit) => {
                self.asked = self.asked.saturating_sub(1);
                self.permits.push(permit);
                self.spawn_as_needed();
                // Room this pool no longer needs goes back at once.
                self.permits.clear();
            }
            PoolControl::Usage { reply, memory } => {
                let _ = reply.send(self.usage(memory));
            }
            PoolControl::LimitsWritten(answer) => self.limits_written(answer),
            PoolControl::EntryLooked(answer) => {
                if self.entry.answered(answer, &self.site) {
                    self.entry_changed();
                }
            }
            PoolControl::Evict(id) => {
                let idle = self
                    .workers
                    .get(&id)
                    .is_some_and(|w| w.state == State::Running && w.busy() == 0);
                if idle && self.active_workers() > self.site.pool.processes_min as usize {
                    self.retire_quiet(id, "the node budget needs room for another site");
                }
            }
        }
    }

    fn checkout(&mut self, reply: Reply, request: Option<Bytes>) {
        if let Some(retry_in) = self.failing() {
            let _ = reply.send(Err(CheckoutError::AppFailing {
                site: self.site.name.clone(),
                retry_in,
            }));
            return;
        }
        if let Some(lease) = self.take_idle_slot() {
            // If the requester gave up meanwhile, the returned lease checks itself in.
            let _ = reply.send(Ok(lease));
            return;
        }
        self.waiters.retain(|w| !w.reply.is_closed());
        // Followers wait for a slot too.
        if self.waiters.len() + self.followers() >= self.site.pool.queue_max as usize {
            let _ = reply.send(Err(CheckoutError::QueueFull {
                site: self.site.name.clone(),
                max: self.site.pool.queue_max,
            }));
            return;
        }
        let (reply, request) = match request {
            // Behind a busy slot's request, when nobody waits before it.
            Some(request) if self.waiters.is_empty() => match self.follow(reply, request) {
                Ok(()) => return,
                Err((reply, request)) => (reply, Some(request)),
            },
            request => (reply, request),
        };
        self.waiters.push_back(Waiter { reply, request });
        self.spawn_as_needed();
    }

    /// Time left before the next start attempt, if the site is failing.
    fn failing(&mut self) -> Option<Duration> {
        let f = self.failure.as_ref()?;
        let now = Instant::now();
        (now < f.retry_at).then(|| f.retry_at - now)
    }

    /// An idle slot of the most recently used running worker, so that the others
    /// stay idle long enough to be reaped.
    fn take_idle_slot(&mut self) -> Option<Lease> {
        let (id, w) = self
            .workers
            .iter_mut()
            .filter(|(_, w)| w.state == State::Running && !w.idle.is_empty())
            .max_by_key(|(_, w)| w.last_used)?;
        let conn = w.idle.pop()?;
        w.last_used = Instant::now();
        let id = *id;
        Some(self.lease(id, conn, false))
    }

    /// A lease on `conn`, a slot of `worker` now busy; `delivered` when the request is
    /// in the slot's inbox or with the worker already.
    fn lease(&mut self, worker: WorkerId, conn: SlotConn, delivered: bool) -> Lease {
        let slot = conn.slot();
        let w = self.workers.get_mut(&worker);
        let state = w.as_ref().and_then(|w| w.slots.get(slot));
        let sent = state.map_or_else(Default::default, |s| s.sent.clone());
        sent.store(delivered, Ordering::Release);
        let (pid, gone) = w.map_or((0, Default::default()), |w| {
            if let Some(s) = w.slots.get_mut(slot) {
                s.busy_since = Some(Instant::now());
            }
            (w.pid, w.gone.clone())
        });
        Lease {
            worker,
            pid,
            slot,
            conn: Some(conn),
            pool: self.handle.clone(),
            gone,
            delivered,
            unread: None,
            sent,
            request_timeout: self.site.pool.request_timeout,
        }
    }

    fn checkin(&mut self, id: WorkerId, slot: usize, conn: Option<SlotConn>) {
        let leaving = conn.as_ref().and_then(|_| self.why_leave(id));
        let conn = match self.hand_to_follower(id, slot, conn, leaving) {
            Ok(()) => return self.follow_waiters(),
            Err(conn) => conn,
        };
        if let Some(s) = self
            .workers
            .get_mut(&id)
            .and_then(|w| w.slots.get_mut(slot))
        {
            s.busy_since = None;
        }
        let Some(w) = self.workers.get_mut(&id) else {
            return; // the worker is gone; its slot with it
        };
        w.served += 1;
        w.last_used = Instant::now();
        match conn {
            None => {
                tracing::debug!(pid = w.pid, "slot lost mid-exchange; retiring the worker");
                self.retire(id, "a request on it ended mid-exchange");
            }
            Some(c) if c.has_stray_bytes() => {
                self.handle(PoolControl::Kill {
                    worker: id,
                    reason: "it sent bytes after the end of a response".into(),
                });
            }
            Some(_) if w.state != State::Running => {}
            Some(_) if leaving.is_some() => {
                self.leave(id, leaving.expect("matched"));
            }
            Some(c) => {
                self.give_slot(id, c);
                let idle_now = self.workers.get(&id).is_some_and(|w| w.busy() == 0);
                if idle_now && self.ctx.budget.under_pressure() {
                    self.ctx.budget.worker_idle();
                }
            }
        }
        self.stop_if_done(id);
        self.spawn_as_needed();
        self.follow_waiters();
    }

    /// Lends a free slot of worker `id` to a request.
    fn lend(&mut self, id: WorkerId, conn: SlotConn, reply: Reply) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.last_used = Instant::now();
        }
        let lease = self.lease(id, conn, false);
        // If the requester gave up meanwhile, the returned lease checks itself in.
        let _ = reply.send(Ok(lease));
    }

    /// Why worker `id` should retire now that it finished a request, if it should.
    fn why_leave(&self, id: WorkerId) -> Option<Leave> {
        let w = self.workers.get(&id)?;
        let max_requests = self.site.pool.max_requests;
        if max_requests > 0 && w.served + 1 >= max_requests {
            return Some(Leave::Recycled("it served max_requests"));
        }
        if self.over_soft_limit(w.pid) {
            return Some(Leave::Recycled("its memory is above memory.worker_soft"));
        }
        // Another site waits for room on a full node while this pool asks for none:
        // give this worker's room back rather than keep it for our own queue, so a
        // busy site cannot hold the whole budget (permits are granted first come).
        let yield_room = self.asked == 0
            && self.ctx.budget.under_pressure()
            && self.active_workers() > self.site.pool.processes_min as usize;
        yield_room.then_some(Leave::YieldRoom)
    }

    /// Retires a worker that finished a request; one that leaves to give the node its
    /// room takes the template along if the site keeps no worker: the site has gone
    /// quiet as surely as if the budget had evicted an idle worker, and a template left
    /// until idle_timeout is a process the budget does not count (under pressure, one
    /// for every site served in the last idle_timeout, each holding its app).
    fn leave(&mut self, id: WorkerId, leave: Leave) {
        match leave {
            Leave::Recycled(why) => self.retire(id, why),
            Leave::YieldRoom => {
                self.retire_quiet(id, "another site waits for room in the node budget")
            }
        }
    }

    /// Hands a free slot to the oldest follower no worker has read yet, else to the
    /// first live waiter, or keeps it idle.
    fn give_slot(&mut self, id: WorkerId, conn: SlotConn) {
        let Some(conn) = self.move_follower(id, conn) else {
            return;
        };
        while let Some(waiter) = self.waiters.pop_front() {
            if waiter.reply.is_closed() {
                continue;
            }
            return self.lend(id, conn, waiter.reply);
        }
        if let Some(w) = self.workers.get_mut(&id) {
            w.idle.push(conn);
        }
    }

    fn worker_event(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::Ready {
                id,
                pid,
                slots,
                inboxes,
                import_time,
                log,
            } => {
                let Some(w) = self.workers.get_mut(&id) else {
                    return;
                };
                w.pid = pid;
                w.log = log;
                w.slots = follow::slot_states(slots.len(), inboxes);
                self.failure = None;
                self.killed_starts = 0;
                if w.state == State::Retiring {
                    drop(slots);
                    self.stop_if_done(id);
                    return;
                }
                w.state = State::Running;
                w.last_used = Instant::now();
                tracing::debug!(pid, ?import_time, "worker joined the pool");
                for conn in slots {
                    self.give_slot(id, conn);
                }
            }
            WorkerEvent::StartFailed { id, error } => {
                let retired = self
                    .workers
                    .remove(&id)
                    .is_some_and(|w| w.state == State::Retiring);
                if self.workers.is_empty() {
                    self.empty_since = Some(Instant::now());
                    self.retire_template();
                }
                if matches!(error, worker::StartError::Stopped) {
                    return;
                }
                if retired {
                    // Retired while starting (the site changed; its template went with
                    // the old code): not the app's failure, so no backoff.
                    tracing::debug!(error = %crate::error_chain(&error), "a retired worker did not start");
                    self.spawn_as_needed();
                    return;
                }
                if error.killed_from_outside() && self.killed_starts < KILLED_STARTS_RETRIED {
                    self.killed_starts += 1;
                    tracing::warn!(error = %crate::error_chain(&error), "a starting worker was killed; starting another");
                    self.spawn_as_needed();
                    return;
                }
                if self.template.as_ref().is_some_and(|t| t.hangs()) {
                    // The template (the tenant's code) leaves forks unanswered: a new
                    // one takes its place, and the workers it forked retire gracefully
                    // (it could not be killed before them without taking them along).
                    // Asked of the current template: a second fork that failed on the
                    // same one renews nothing again.
                    self.retire_all("its template hangs");
                    self.renew_template();
                }
                let attempts = self.failure.as_ref().map_or(0, |f| f.attempts) + 1;
                let backoff = BACKOFF_FIRST
                    .saturating_mul(1 << (attempts - 1).min(5))
                    .min(BACKOFF_MAX);
                tracing::error!(error = %crate::error_chain(&error), attempts, ?backoff, "worker failed to start");
                self.failure = Some(Failure {
                    attempts,
                    retry_at: Instant::now() + backoff,
                });
                if !self.workers.values().any(|w| w.state == State::Running) {
                    for waiter in self.waiters.drain(..) {
                        let _ = waiter.reply.send(Err(CheckoutError::AppFailing {
                            site: self.site.name.clone(),
                            retry_in: backoff,
                        }));
                    }
                }
            }
            WorkerEvent::Exited { id, status } => {
                let Some(mut w) = self.workers.remove(&id) else {
                    return;
                };
                self.limits.worker_left();
                w.gone.cancel();
                self.release_followers(&mut w);
                if status.success() || w.killed {
                    tracing::info!(pid = w.pid, "worker stopped");
                } else {
                    tracing::error!(pid = w.pid, %status, "worker died");
                    w.log.error(&format!("worker pid {} died: {status}", w.pid));
                }
                if self.workers.is_empty() {
                    self.empty_since = Some(Instant::now());
                }
                self.sweep_if_empty();
                self.spawn_as_needed();
            }
        }
    }

    fn on_tick(&mut self) {
        if self.ctx.poll_memory {
            self.enforce_memory_by_polling();
        }
        self.retry_waiting_limits();
        self.entry
            .look_if_due(&self.site, &self.ctx.files, &self.handle.tx);
        let now = Instant::now();
        let idle_timeout = self.site.pool.idle_timeout;
        let mut active = self.active_workers();
        let idle: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state == State::Running && w.busy() == 0)
            .filter(|(_, w)| now.duration_since(w.last_used) >= idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if active <= self.site.pool.processes_min as usize {
                break;
            }
            self.retire_quiet(id, "it was idle");
            active -= 1;
        }
        // The last worker died (killed, crashed) and nothing asked for another.
        let deserted = self
            .empty_since
            .is_some_and(|since| now.duration_since(since) >= idle_timeout);
        if self.workers.is_empty() && deserted {
            self.retire_template();
        }
        self.sweep_if_empty();
        self.spawn_as_needed();
    }

    fn active_workers(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.state != State::Retiring)
            .count()
    }

    /// Starts workers for the queue and for processes.min, within processes.max; while
    /// the site is failing, one attempt at a time after the backoff.
    fn spawn_as_needed(&mut self) {
        if let Some(f) = &self.failure {
            let starting = self.workers.values().any(|w| w.state == State::Starting);
            if Instant::now() < f.retry_at || starting || self.asked > 0 || self.waiters.is_empty()
            {
                return;
            }
        }
        let threads = self.site.pool.threads as usize;
        let starting = self
            .workers
            .values()
            .filter(|w| w.state == State::Starting)
            .count();
        // Workers asked of the budget count as on their way.
        let uncovered = self
            .waiters
            .len()
            .saturating_sub((starting + self.asked) * threads);
        let active = self.active_workers() + self.asked;
        let floor = if self.handle.draining() {
            0
        } else {
            self.site.pool.processes_min as usize
        };
        let want = (active + uncovered.div_ceil(threads)).max(floor);
        let mut to_start = want
            .min(self.site.pool.processes_max as usize)
            .saturating_sub(active);
        if self.failure.is_some() {
            to_start = to_start.min(1);
        }
        for _ in 0..to_start {
            match self.permits.pop() {
                Some(permit) => self.start_worker(permit),
                None => {
                    self.asked += 1;
                    self.ctx.budget.acquire(&self.site.name);
                }
            }
        }
    }

    fn start_worker(&mut self, permit: Permit) {
        if self.workers.is_empty() {
            // The file may have changed while the site had no workers: the ones
            // starting now load it as it is.
            self.entry.rebase();
            self.entry
                .look(&self.site, &self.ctx.files, &self.handle.tx);
        }
        self.empty_since = None;
        self.sweep = Sweep::Armed;
        let id = NEXT_WORKER_ID.fetch_add(1, Ordering::Relaxed);
        let spawner = match &self.template {
            Some(template) => template.clone() as Arc<dyn Spawn>,
            None => self.ctx.spawner.clone(),
        };
        let ctx = WorkerContext {
            spawner,
            logs: self.ctx.logs.clone(),
            cgroup: self.ctx.cgroup.clone(),
            files: self.ctx.files.clone(),
            startup_timeout: startup_timeout(&self.site),
            stop_grace: self.ctx.stop_grace,
        };
        let handle = worker::start(
            id,
            self.site.clone(),
            ctx,
            self.handle.tx.clone(),
            PoolControl::Worker,
        );
        self.workers.insert(
            id,
            WorkerEntry {
                handle,
                state: State::Starting,
                pid: 0,
                idle: Vec::new(),
                slots: Vec::new(),
                served: 0,
                last_used: Instant::now(),
                killed: false,
                _permit: permit,
                log: self.ctx.logs.process_log(),
                gone: Default::default(),
            },
        );
    }

    fn retire(&mut self, id: WorkerId, why: &str) {
        if let Some(w) = self.workers.get_mut(&id) {
            if w.state != State::Retiring {
                tracing::info!(pid = w.pid, why, "retiring worker");
            }
            w.state = State::Retiring;
            w.idle.clear(); // closing our ends tells the loader to finish
        }
        self.stop_if_done(id);
    }

    /// Retires a worker the site does not need; with the last one goes the template,
    /// unless requests wait (the next worker needs it).
    fn retire_quiet(&mut self, id: WorkerId, why: &str) {
        self.retire(id, why);
        if self.active_workers() == 0 && self.waiters.is_empty() {
            self.retire_template();
        }
    }

    /// Every worker retired gracefully and the template replaced, so the next workers
    /// start afresh (new code, new settings, new log files); processes.min refilled.
    fn renew(&mut self, why: &str) {
        self.retire_all(why);
        self.renew_template();
        self.spawn_as_needed();
    }

    fn retire_all(&mut self, why: &str) {
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.retire(id, why);
        }
    }

    /// A retiring worker with nothing in flight gets the order to stop.
    fn stop_if_done(&mut self, id: WorkerId) {
        if let Some(w) = self.workers.get(&id) {
            if w.state == State::Retiring && w.busy() == 0 && w.pid != 0 {
                w.handle.stop();
            }
        }
    }

    /// Packages of the site's virtualenv that shadow its runtime's at another version
    /// go to its error log (a look at the site's files: off the runtime thread).
    fn warn_of_version_conflicts(&self) {
        let Some(runtime) = self.site.runtime.clone() else {
            return;
        };
        let (site, files, logs) = (
            self.site.clone(),
            self.ctx.files.clone(),
            self.ctx.logs.clone(),
        );
        tokio::spawn(async move {
            let conflicts = files.look(crate::spawn::LOOK_WITHIN, move || match site.venv() {
                Some(venv) => roost_registry::version_conflicts(&runtime, &venv),
                None => Vec::new(),
            });
            for conflict in conflicts.await.unwrap_or_default() {
                logs.error(&format!("warning: {conflict}"));
            }
        });
    }

    /// The entry file was touched: a failing site tries again at once, and workers
    /// running the old code are replaced.
    fn entry_changed(&mut self) {
        if self.failure.take().is_some() {
            tracing::info!("entry file changed: retrying at once");
            self.spawn_as_needed();
        }
        if !self.workers.is_empty() {
            tracing::info!("entry file changed: recycling workers");
            self.ctx
                .logs
                .error("entry file changed: reloading the application");
            self.renew("its entry file changed");
        }
    }
}

/// How long a worker (or a template) may take to import the app.
fn startup_timeout(site: &Site) -> Duration {
    site.pool.request_timeout.max(Duration::from_secs(10))
}
