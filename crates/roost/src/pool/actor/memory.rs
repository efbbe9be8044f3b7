//! What the pool knows of its workers' memory: resident sizes from /proc, for
//! `memory.worker_soft` and for memory.max where no memory cgroup enforces it; and the
//! site's memory for the node budget (`--max-worker-memory`).

use super::{Pool, State};
use crate::pool::{PoolControl, PoolUsage};
use crate::worker::WorkerId;

impl Pool {
    pub(super) fn over_soft_limit(&self, pid: u32) -> bool {
        self.site
            .pool
            .memory_worker_soft
            .is_some_and(|soft| rss_bytes(pid).is_some_and(|rss| rss > soft))
    }

    /// Without a memory cgroup: the site's total RSS over memory.max kills its largest
    /// worker, as the cgroup's OOM killer would.
    pub(super) fn enforce_memory_by_polling(&mut self) {
        let sizes: Vec<(WorkerId, u32, u64)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.pid != 0 && !w.killed)
            .filter_map(|(id, w)| Some((*id, w.pid, rss_bytes(w.pid)?)))
            .collect();
        let total: u64 = sizes.iter().map(|(_, _, rss)| rss).sum();
        if total <= self.site.pool.memory_max {
            return;
        }
        if let Some((id, pid, rss)) = sizes.into_iter().max_by_key(|(_, _, rss)| *rss) {
            self.handle(PoolControl::Kill {
                worker: id,
                reason: format!(
                    "the site uses {total} bytes, over memory.max ({}); pid {pid} had {rss}",
                    self.site.pool.memory_max
                ),
            });
        }
    }

    /// What the node budget needs to choose a worker to evict; the site's memory only
    /// if asked.
    pub(super) fn usage(&self, memory: bool) -> PoolUsage {
        let evictable =
            (self.active_workers()).saturating_sub(self.site.pool.processes_min as usize);
        let mut idle: Vec<_> = (self.workers.iter())
            .filter(|(_, w)| w.state == State::Running && w.busy() == 0)
            .map(|(id, w)| (w.last_used, *id))
            .collect();
        idle.sort_unstable();
        idle.truncate(evictable);
        let memory = if memory { self.memory_in_use() } else { 0 };
        let workers = self.workers.values().filter(|w| w.pid != 0).count();
        PoolUsage {
            idle,
            memory,
            workers,
        }
    }

    /// What the site's processes add to the host's memory: its cgroup's anonymous
    /// memory, where a memory cgroup counts it. Without one, its workers' RSS summed,
    /// which also counts, in each, the pages it shares with its zygote (for a small
    /// app about 20 times what the cgroup counts: docs/benchmarks.md, "A crawler").
    fn memory_in_use(&self) -> u64 {
        if let Some(anon) = self.ctx.cgroup.anon_memory() {
            return anon;
        }
        (self.workers.values())
            .filter(|w| w.pid != 0)
            .filter_map(|w| rss_bytes(w.pid))
            .sum()
    }
}

/// Resident memory of a process, from /proc/<pid>/statm.
fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |n| n as u64)
}
