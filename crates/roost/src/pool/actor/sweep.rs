//! What a site's workers leave behind: a process in a session of its own escapes the
//! worker's process group (killed with the worker), not the site's cgroup. Once the
//! last worker (and the template) has gone, the pool kills what is left there.

use tokio::time::{Duration, Instant};

use super::Pool;

/// How long after a site's last worker (and template) went its cgroup is swept: a
/// retired template exits on its own once its workers have, and is not a leftover.
const SWEEP_AFTER: Duration = Duration::from_secs(1);

/// Killing what a site's workers left in its cgroup (`Pool::sweep_if_empty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sweep {
    /// A worker runs, or has run since the last sweep.
    Armed,
    /// The last worker (and the template) went: at this time, what is left is killed.
    Due(Instant),
    /// Done; armed again by the next worker.
    Done,
}

impl Pool {
    /// Nothing of a site without workers runs: a process a worker left behind in a
    /// session of its own escaped the worker's process group (killed with it), not the
    /// site's cgroup, and is killed SWEEP_AFTER the last worker and the template went,
    /// unless a worker started meanwhile (one starting is in `workers`: the cgroup is
    /// read before any new worker could join it).
    pub(super) fn sweep_if_empty(&mut self) {
        let template = self.template.as_ref().is_some_and(|t| t.is_live());
        if self.sweep == Sweep::Done || !self.workers.is_empty() || template {
            return;
        }
        let now = Instant::now();
        let due = match self.sweep {
            Sweep::Due(at) => at,
            _ => now + SWEEP_AFTER,
        };
        if now < due {
            self.sweep = Sweep::Due(due);
            return;
        }
        self.sweep = Sweep::Done;
        let killed = self.ctx.cgroup.kill_all();
        if killed > 0 {
            tracing::warn!(killed, "killed processes the site's workers left behind");
            self.ctx.logs.error(&format!(
                "killed {killed} process(es) left behind by the site's workers, which had all exited"
            ));
        }
    }
}
