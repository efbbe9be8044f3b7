//! The site's cgroup limits, written again when the site changes. Not on the runtime
//! thread, which every site shares: lowering a memory limit makes the kernel reclaim
//! in the writer, writeback to a slow file system included. One write at a time, the
//! site's newest settings last. cgroup v1 refuses a memory limit below what the site
//! holds (v2 reclaims, then kills); the workers holding it retire as the site changes,
//! so a refused write is tried again every tick until it lands.

use roost_registry::format_bytes;

use super::Pool;
use crate::pool::PoolControl;
use crate::spawn::cgroup::CgroupError;

/// Writes of one site's limits.
#[derive(Debug, Default)]
pub(super) struct LimitsWriter {
    /// A write is under way.
    writing: bool,
    /// The site changed while it was: its newest limits are written next.
    again: bool,
    /// The memory limit is below what the site holds (said once in its error log).
    refused: bool,
}

impl LimitsWriter {
    /// Waiting for the site to hold less than its memory limit.
    pub(super) fn refused(&self) -> bool {
        self.refused
    }
}

/// The answer to one write.
#[derive(Debug)]
pub struct LimitsWritten(Result<(), CgroupError>);

impl Pool {
    /// Writes the site's limits, or again once the write under way is done.
    pub(super) fn write_limits(&mut self) {
        if self.limits.writing {
            self.limits.again = true;
        } else {
            self.start_limits_write();
        }
    }

    /// On a tick: a refused write, tried again.
    pub(super) fn retry_refused_limits(&mut self) {
        if self.limits.refused && !self.limits.writing {
            self.start_limits_write();
        }
    }

    pub(super) fn limits_written(&mut self, answer: LimitsWritten) {
        let state = &mut self.limits;
        state.writing = false;
        if std::mem::take(&mut state.again) {
            return self.start_limits_write();
        }
        let limit = format_bytes(self.site.pool.memory_max);
        match answer.0 {
            Ok(()) => {
                if std::mem::take(&mut state.refused) {
                    tracing::info!(%limit, "the site's memory limit is in force");
                    self.ctx
                        .logs
                        .error(&format!("the memory limit of {limit} is in force"));
                }
            }
            Err(e) if e.is_below_usage() => {
                if !std::mem::replace(&mut state.refused, true) {
                    tracing::warn!(%limit, "the site holds more memory than its new limit: written once it holds less");
                    self.ctx.logs.error(&format!(
                        "the site's processes hold more memory than its new limit of {limit}: \
                         the old limit stays until they hold less (its workers are being replaced)"
                    ));
                }
            }
            Err(e) => {
                state.refused = false;
                tracing::error!(error = %crate::error_chain(&e), "cannot update the site's cgroup limits");
            }
        }
    }

    fn start_limits_write(&mut self) {
        self.limits.writing = true;
        let limits = self.site.pool.clone();
        let (cgroup, pool) = (self.ctx.cgroup.clone(), self.handle.tx.clone());
        tokio::spawn(async move {
            // Not joined only when the runtime shuts down: nothing waits for it then.
            if let Ok(result) = tokio::task::spawn_blocking(move || cgroup.apply(&limits)).await {
                let _ = pool.send(PoolControl::LimitsWritten(LimitsWritten(result)));
            }
        });
    }
}
