//! The node-wide worker budget, shared by every site: at most `max_workers` workers and
//! `max_memory` bytes of the sites' memory in total (what their cgroups count, or
//! their workers' RSS: `pool/actor/memory.rs`).
//!
//! A pool that wants a worker asks the budget for a [`Permit`]; the permit lives as long
//! as the worker, and dropping it gives the room back. When the budget is full, the
//! idle worker used least recently, of any site, is evicted to make room; requests wait
//! in their own site's queue meanwhile, under the usual queue bounds. Permits are
//! granted in the order they were asked for, across sites, so a busy site cannot starve
//! a small one. While anyone waits, pools report each worker that turns idle, so
//! eviction does not depend on catching a busy node's idle moments by polling.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::PoolControl;
use crate::worker::WorkerId;

/// How often a full budget with waiters looks for something to evict, as a backstop.
const RETRY: Duration = Duration::from_millis(100);
/// How often the sites' memory is summed against `max_memory`.
const MEMORY_CHECK: Duration = Duration::from_secs(1);
/// How long an ordered eviction is expected to free its room.
const EVICTION_PATIENCE: Duration = Duration::from_secs(2);

/// Limits of the budget; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetLimits {
    pub max_workers: usize,
    pub max_memory: u64,
}

/// Host memory the default `--max-workers` allows per worker.
const HOST_MEMORY_PER_WORKER: u64 = 64 << 20;
/// The default `--max-workers` on the smallest hosts.
const FEWEST_DEFAULT_WORKERS: usize = 8;

/// The default `--max-workers`: one worker per 64 MiB of the host's memory
/// (`MemTotal` of `/proc/meminfo`), at least 8; 0 (unlimited) when it cannot be read.
/// Each visit of a site with no worker starts one, which then waits for its
/// `idle_timeout`: without a bound, a crawler visiting every site of a node (search
/// engines and scanners do) forks a worker per site, and a node of thousands runs the
/// host out of memory. The budget only stops idle workers, least recently used first.
pub fn default_max_workers() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| workers_for(&meminfo))
        .unwrap_or(0)
}

/// [`default_max_workers`] for the host `meminfo` describes.
fn workers_for(meminfo: &str) -> Option<usize> {
    let kib: u64 = (meminfo.lines())
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    let workers = (kib << 10) / HOST_MEMORY_PER_WORKER;
    Some((workers as usize).max(FEWEST_DEFAULT_WORKERS))
}

/// What a pool says when the budget looks for a victim.
#[derive(Debug, Clone)]
pub struct PoolUsage {
    /// Its idle workers it can do without (above `processes.min`), least recently
    /// used first.
    pub idle: Vec<(Instant, WorkerId)>,
    /// The memory its processes hold (`pool/actor/memory.rs`); 0 unless asked for.
    pub memory: u64,
    /// How many workers it runs.
    pub workers: usize,
}

enum Msg {
    Register {
        site: String,
        pool: mpsc::UnboundedSender<PoolControl>,
    },
    Unregister {
        site: String,
    },
    Acquire {
        site: String,
    },
    Release {
        site: String,
    },
    /// A pool just saw a worker turn idle while others wait.
    Idle,
}

/// The cheap side of the budget; cloned into every pool.
#[derive(Clone)]
pub struct Budget {
    tx: mpsc::UnboundedSender<Msg>,
    /// True while some pool waits for a permit: pools then report idle workers.
    pressure: Arc<AtomicBool>,
}

/// Room for one worker of a site; dropping it gives the room back.
#[derive(Debug)]
pub struct Permit {
    tx: mpsc::UnboundedSender<Msg>,
    site: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let site = std::mem::take(&mut self.site);
        let _ = self.tx.send(Msg::Release { site });
    }
}

impl Budget {
    pub fn start(limits: BudgetLimits) -> Budget {
        let (tx, rx) = mpsc::unbounded_channel();
        let pressure = Arc::new(AtomicBool::new(false));
        let actor = BudgetActor {
            limits,
            tx: tx.clone(),
            pressure: pressure.clone(),
            pools: HashMap::new(),
            waiting: VecDeque::new(),
            held: HashMap::new(),
            evictions: VecDeque::new(),
        };
        tokio::spawn(actor.run(rx));
        Budget { tx, pressure }
    }

    pub fn register(&self, site: &str, pool: mpsc::UnboundedSender<PoolControl>) {
        let _ = self.tx.send(Msg::Register {
            site: site.to_owned(),
            pool,
        });
    }

    pub fn unregister(&self, site: &str) {
        let _ = self.tx.send(Msg::Unregister {
            site: site.to_owned(),
        });
    }

    /// Asks for room for one worker; the permit arrives as `PoolControl::Permit`.
    pub fn acquire(&self, site: &str) {
        let _ = self.tx.send(Msg::Acquire {
            site: site.to_owned(),
        });
    }

    pub fn under_pressure(&self) -> bool {
        self.pressure.load(Ordering::Relaxed)
    }

    pub fn worker_idle(&self) {
        let _ = self.tx.send(Msg::Idle);
    }
}

struct BudgetActor {
    limits: BudgetLimits,
    tx: mpsc::UnboundedSender<Msg>,
    pressure: Arc<AtomicBool>,
    pools: HashMap<String, mpsc::UnboundedSender<PoolControl>>,
    /// Sites waiting for a permit, first asked first served.
    waiting: VecDeque<String>,
    /// Permits out by site: the pools that have workers, the only ones asked for an
    /// idle worker or their memory (a node has thousands of pools, most without any).
    held: HashMap<String, usize>,
    /// Evictions ordered and not yet turned into a released permit, so that one waiter
    /// does not cost several workers; an eviction the pool could not honour (the worker
    /// got busy) stops counting after `EVICTION_PATIENCE`.
    evictions: VecDeque<Instant>,
}

impl BudgetActor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut retry = tokio::time::interval(RETRY);
        // The first check a period after the start: at the start no site has workers.
        let mut memory = tokio::time::interval_at(Instant::now() + MEMORY_CHECK, MEMORY_CHECK);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => return,
                },
                _ = retry.tick(), if !self.waiting.is_empty() => self.make_room(false).await,
                _ = memory.tick(), if self.limits.max_memory > 0 => self.make_room(true).await,
            }
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Register { site, pool } => {
                self.pools.insert(site, pool);
            }
            Msg::Unregister { site } => {
                self.pools.remove(&site);
                self.waiting.retain(|s| s != &site);
            }
            Msg::Acquire { site } => {
                self.waiting.push_back(site);
                self.grant();
                if !self.waiting.is_empty() {
                    self.make_room(false).await;
                }
            }
            Msg::Release { site } => {
                if let Some(count) = self.held.get_mut(&site) {
                    *count -= 1;
                    if *count == 0 {
                        self.held.remove(&site);
                    }
                }
                self.evictions.pop_front();
                self.grant();
            }
            Msg::Idle => self.make_room(false).await,
        }
        self.pressure
            .store(!self.waiting.is_empty(), Ordering::Relaxed);
    }

    fn full(&self) -> bool {
        self.limits.max_workers > 0 && self.held.values().sum::<usize>() >= self.limits.max_workers
    }

    /// Hands out permits while there is room, in order.
    fn grant(&mut self) {
        while !self.full() {
            let Some(site) = self.waiting.pop_front() else {
                return;
            };
            let Some(pool) = self.pools.get(&site) else {
                continue;
            };
            *self.held.entry(site.clone()).or_default() += 1;
            let permit = Permit {
                tx: self.tx.clone(),
                site,
            };
            if pool.send(PoolControl::Permit(permit)).is_err() {
                // The pool is gone; its permit came back through Drop already.
                continue;
            }
        }
    }

    /// Evicts the least recently used idle worker of any site when someone waits on a
    /// full budget; at a memory check, as many idle workers as it takes (of any site,
    /// the least recently used first) to bring the sites' memory under its limit, each
    /// counted as its site's memory shared by its workers. (Memory is only weighed once
    /// a second: the workers evicted at one check are gone by the next.)
    async fn make_room(&mut self, memory_check: bool) {
        let now = Instant::now();
        while self
            .evictions
            .front()
            .is_some_and(|t| now.duration_since(*t) > EVICTION_PATIENCE)
        {
            self.evictions.pop_front();
        }
        // Waiters not yet covered by an eviction on its way.
        let waiting = self.full() && self.waiting.len() > self.evictions.len();
        let memory = memory_check && self.limits.max_memory > 0;
        if !waiting && !memory {
            return;
        }
        let mut usages = Vec::with_capacity(self.held.len());
        let holding = (self.held.keys()).filter_map(|site| Some((site, self.pools.get(site)?)));
        for (site, pool) in holding {
            let (reply, answer) = oneshot::channel();
            if pool.send(PoolControl::Usage { reply, memory }).is_ok() {
                usages.push((site.clone(), answer));
            }
        }
        let mut candidates = Vec::new();
        let mut total_memory = 0;
        for (site, answer) in usages {
            if let Ok(Ok(usage)) = tokio::time::timeout(Duration::from_secs(1), answer).await {
                total_memory += usage.memory;
                let share = usage.memory / usage.workers.max(1) as u64;
                for (since, worker) in usage.idle {
                    candidates.push((since, site.clone(), worker, share));
                }
            }
        }
        candidates.sort_by_key(|(since, _, _, _)| *since);
        let excess = if memory {
            total_memory.saturating_sub(self.limits.max_memory)
        } else {
            0
        };
        let (mut evicted, mut freed) = (0, 0);
        for (_, site, worker, share) in candidates {
            if freed >= excess && (evicted > 0 || !waiting) {
                break;
            }
            let Some(pool) = self.pools.get(&site) else {
                continue;
            };
            if pool.send(PoolControl::Evict(worker)).is_ok() {
                tracing::debug!(%site, worker, share, "evicting an idle worker");
                self.evictions.push_back(Instant::now());
                evicted += 1;
                freed += share;
            }
        }
        if evicted == 0 {
            return;
        }
        if excess > 0 {
            tracing::info!(evicted, total_memory, limit = self.limits.max_memory, "the sites' memory is over the node budget: evicting the least recently used idle workers");
        } else {
            tracing::info!("a site waits for room: evicting the least recently used idle worker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full budget with a site waiting asks the pools for an idle worker: only those
    /// holding permits, not every registered one (thousands, most without workers,
    /// which made each start past a full budget cost a message to every site).
    #[tokio::test]
    async fn only_pools_with_workers_are_asked_for_room() {
        let budget = Budget::start(BudgetLimits {
            max_workers: 1,
            max_memory: 0,
        });
        let mut pools = HashMap::new();
        for site in ["busy", "quiet", "new"] {
            let (tx, rx) = mpsc::unbounded_channel();
            budget.register(site, tx);
            pools.insert(site, rx);
        }
        budget.acquire("busy");
        let busy = pools.get_mut("busy").unwrap();
        let Some(PoolControl::Permit(permit)) = busy.recv().await else {
            panic!("no permit for the first site");
        };
        budget.acquire("new");
        let Some(PoolControl::Usage { reply, memory }) = busy.recv().await else {
            panic!("the pool holding the budget was not asked");
        };
        assert!(!memory, "a budget without max_memory asked for memory");
        reply
            .send(PoolUsage {
                idle: Vec::new(),
                memory: 0,
                workers: 0,
            })
            .expect("the budget waits for the answer");
        drop(permit);
        let Some(PoolControl::Permit(_)) = pools.get_mut("new").unwrap().recv().await else {
            panic!("no permit for the waiting site once the room was given back");
        };
        for site in ["quiet", "new"] {
            let asked = pools.get_mut(site).unwrap().try_recv();
            assert!(asked.is_err(), "{site} was asked though it has no worker");
        }
    }

    /// Over the memory limit, one check evicts as many idle workers as it takes to get
    /// under it, the oldest first, of any site (two of one), each counted as its site's
    /// memory shared among its workers; the rest stay.
    #[tokio::test]
    async fn a_memory_check_evicts_as_many_as_it_takes_oldest_first() {
        const MIB: u64 = 1 << 20;
        let budget = Budget::start(BudgetLimits {
            max_workers: 0,
            max_memory: 100 * MIB,
        });
        // (site, its memory, its workers, how long each has been idle): 160 MiB, 60
        // over the limit.
        let sites: [(&str, u64, usize, &[u64]); 3] = [
            ("oldest", 40 * MIB, 2, &[30, 25]),
            ("middle", 60 * MIB, 1, &[20]),
            ("newest", 60 * MIB, 1, &[10]),
        ];
        let mut pools = Vec::new();
        for (site, ..) in sites {
            let (tx, mut rx) = mpsc::unbounded_channel();
            budget.register(site, tx);
            budget.acquire(site);
            let Some(PoolControl::Permit(permit)) = rx.recv().await else {
                panic!("no permit for {site}");
            };
            pools.push((rx, permit));
        }
        let now = Instant::now();
        for ((rx, _), (site, memory, workers, idle_for)) in pools.iter_mut().zip(sites) {
            let Some(PoolControl::Usage {
                reply,
                memory: asked,
            }) = rx.recv().await
            else {
                panic!("{site} was not asked at the memory check");
            };
            assert!(asked, "the memory check did not ask for {site}'s memory");
            let idle = (idle_for.iter().zip(1..))
                .map(|(secs, worker)| (now - Duration::from_secs(*secs), worker))
                .collect();
            let usage = PoolUsage {
                idle,
                memory,
                workers,
            };
            reply.send(usage).expect("the budget waits for the answer");
        }
        // The oldest site's workers count 20 MiB each (its 40 over 2 workers): not
        // enough, both; with the middle one's 60, it is.
        let mut evicted = Vec::new();
        for ((rx, _), (site, ..)) in pools.iter_mut().zip(sites) {
            let wait = Duration::from_millis(300);
            while let Ok(Some(PoolControl::Evict(worker))) =
                tokio::time::timeout(wait, rx.recv()).await
            {
                evicted.push((site, worker));
            }
        }
        assert_eq!(evicted, [("oldest", 1), ("oldest", 2), ("middle", 1)]);
    }

    #[test]
    fn the_default_worker_budget_grows_with_the_host() {
        let host = |kib: u64| format!("MemTotal:       {kib} kB\nMemFree:        1000 kB\n");
        assert_eq!(workers_for(&host(24 << 20)), Some(384));
        assert_eq!(workers_for(&host(2 << 20)), Some(32));
        assert_eq!(workers_for(&host(256 << 10)), Some(8), "the fewest");
        assert_eq!(workers_for("MemFree: 1000 kB\n"), None);
        assert!(default_max_workers() >= 8, "this host's /proc/meminfo");
    }
}
