//! The site's cgroup limits, written again when the site changes. Not on the runtime
//! thread, which every site shares: lowering a memory limit makes the kernel reclaim
//! in the writer, writeback to a slow file system included. One write at a time, the
//! site's newest settings last.
//!
//! A limit lowered below what the site holds waits while the workers it replaces go
//! (they retire as the site changes). cgroup v1 refuses such a memory limit (v2
//! reclaims, then kills): it is tried again when a worker has left, else every
//! [`MEMORY_RETRY`], as each try makes the kernel reclaim all it can of the site's
//! page cache before it refuses. The kernel takes any pids.max, but the new workers
//! start beside the old ones and would fail to start their threads under a pids.max
//! that counts both: a lowered pids.max is held back (the old one written) until the
//! workers of before the change have gone.

use std::time::Duration;

use roost_registry::format_bytes;
use tokio::time::Instant;

use super::Pool;
use crate::pool::PoolControl;
use crate::spawn::cgroup::{CgroupError, Controller};
use crate::worker::WorkerId;

/// How long a refused memory limit waits for its next try, unless a worker leaves.
const MEMORY_RETRY: Duration = Duration::from_secs(30);

/// Writes of one site's limits.
#[derive(Debug)]
pub(super) struct LimitsWriter {
    /// A write is under way.
    writing: bool,
    /// The site changed while it was: its newest limits are written next.
    again: bool,
    /// The memory limit is below what the site holds (said once in its error log).
    memory_refused: bool,
    /// When the refused memory limit is tried next.
    memory_retry_at: Instant,
    /// The pids.max last written.
    pids_in_force: u32,
    /// The workers there were when the site last changed: a lower pids.max waits for
    /// them to go.
    outgoing: Vec<WorkerId>,
    /// A lower pids.max waits for `outgoing` (said once in the site's error log).
    pids_held_back: bool,
}

impl LimitsWriter {
    /// `pids_in_force`: the pids.max the site's cgroup was made with.
    pub(super) fn new(pids_in_force: u32) -> LimitsWriter {
        LimitsWriter {
            writing: false,
            again: false,
            memory_refused: false,
            memory_retry_at: Instant::now(),
            pids_in_force,
            outgoing: Vec::new(),
            pids_held_back: false,
        }
    }

    /// A limit waits for the site to hold less: the pool ticks to try it again.
    pub(super) fn waiting(&self) -> bool {
        self.memory_refused || self.pids_held_back
    }

    /// A worker of the site has gone, and what it held with it: a refused memory limit
    /// may fit now.
    pub(super) fn worker_left(&mut self) {
        self.memory_retry_at = Instant::now();
    }
}

/// The answer to one write: the pids.max written, and what was not.
#[derive(Debug)]
pub struct LimitsWritten {
    pids_max: u32,
    errors: Vec<CgroupError>,
}

impl Pool {
    /// Writes the site's limits, which just changed, or again once the write under way
    /// is done. The workers there are now are the ones the change replaces.
    pub(super) fn write_limits(&mut self) {
        self.limits.outgoing = self.workers.keys().copied().collect();
        if self.limits.writing {
            self.limits.again = true;
        } else {
            self.start_limits_write();
        }
    }

    /// On a tick: a refused memory limit tried again when due, a held back pids.max
    /// written once the workers it waits for have gone.
    pub(super) fn retry_waiting_limits(&mut self) {
        let state = &self.limits;
        let memory_due = state.memory_refused && Instant::now() >= state.memory_retry_at;
        let pids_due = state.pids_held_back && self.outgoing_gone();
        if (memory_due || pids_due) && !self.limits.writing {
            self.start_limits_write();
        }
    }

    /// Whether the workers there were when the site last changed have all gone.
    fn outgoing_gone(&mut self) -> bool {
        let workers = &self.workers;
        self.limits.outgoing.retain(|id| workers.contains_key(id));
        self.limits.outgoing.is_empty()
    }

    pub(super) fn limits_written(&mut self, answer: LimitsWritten) {
        self.limits.writing = false;
        if std::mem::take(&mut self.limits.again) {
            return self.start_limits_write();
        }
        let errors = answer.errors;
        self.pids_written(answer.pids_max, &errors);
        self.memory_written(&errors);
        // What failed otherwise is not a wait for the site to hold less: logged, and
        // not tried again.
        for e in errors.iter().filter(|e| !e.is_below_usage()) {
            tracing::error!(error = %crate::error_chain(e), "cannot update the site's cgroup limits");
        }
    }

    fn pids_written(&mut self, pids_max: u32, errors: &[CgroupError]) {
        let state = &mut self.limits;
        if errors.iter().any(|e| e.is_of(Controller::Pids)) {
            state.pids_held_back = false;
            return;
        }
        state.pids_in_force = pids_max;
        let wanted = self.site.pool.pids_max;
        if pids_max == wanted && std::mem::take(&mut state.pids_held_back) {
            tracing::info!(pids_max, "the site's pids limit is in force");
            (self.ctx.logs).error(&format!(
                "the limit of {pids_max} processes and threads is in force"
            ));
        }
    }

    fn memory_written(&mut self, errors: &[CgroupError]) {
        let (state, logs) = (&mut self.limits, &self.ctx.logs);
        let limit = format_bytes(self.site.pool.memory_max);
        if errors.iter().any(CgroupError::is_below_usage) {
            state.memory_retry_at = Instant::now() + MEMORY_RETRY;
            if !std::mem::replace(&mut state.memory_refused, true) {
                tracing::warn!(%limit, "the site holds more memory than its new limit: written once it holds less");
                logs.error(&format!(
                    "the site's processes hold more memory than its new limit of {limit}: \
                     the old limit stays until they hold less (its workers are being replaced)"
                ));
            }
            return;
        }
        let memory_failed = errors.iter().any(|e| e.is_of(Controller::Memory));
        if std::mem::take(&mut state.memory_refused) && !memory_failed {
            tracing::info!(%limit, "the site's memory limit is in force");
            logs.error(&format!("the memory limit of {limit} is in force"));
        }
    }

    /// The pids.max to write now: the site's, or while a lower one waits for the
    /// workers the change replaces, the one in force.
    fn pids_max_now(&mut self) -> u32 {
        let wanted = self.site.pool.pids_max;
        let lowered = wanted < self.limits.pids_in_force && self.ctx.cgroup.limits_pids();
        if !lowered || self.outgoing_gone() {
            return wanted;
        }
        let state = &mut self.limits;
        if !std::mem::replace(&mut state.pids_held_back, true) {
            tracing::info!(
                pids_max = wanted,
                outgoing = state.outgoing.len(),
                "a lower pids limit waits for the workers it replaces"
            );
            self.ctx.logs.error(&format!(
                "the new limit of {wanted} processes and threads waits until the {} worker(s) \
                 being replaced have gone (their successors start beside them); {} is in force",
                state.outgoing.len(),
                state.pids_in_force
            ));
        }
        state.pids_in_force
    }

    fn start_limits_write(&mut self) {
        self.limits.writing = true;
        let mut limits = self.site.pool.clone();
        limits.pids_max = self.pids_max_now();
        let (cgroup, pool) = (self.ctx.cgroup.clone(), self.handle.tx.clone());
        tokio::spawn(async move {
            // Not joined only when the runtime shuts down: nothing waits for it then.
            let written = tokio::task::spawn_blocking(move || LimitsWritten {
                pids_max: limits.pids_max,
                errors: cgroup.apply_each(&limits),
            });
            if let Ok(answer) = written.await {
                let _ = pool.send(PoolControl::LimitsWritten(answer));
            }
        });
    }
}
