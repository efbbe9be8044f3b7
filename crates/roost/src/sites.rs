//! The node's set of live sites: one pool per site, and the route table built from them.
//!
//! Each registry change arrives as a new snapshot; [`Sites::apply`] computes the diff,
//! starts pools for added sites, reconfigures changed ones, drains removed ones, and
//! publishes a new route table in one atomic swap.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use roost_registry::{diff, Change, Registry, Site};
use tokio::task::JoinHandle;

use crate::logs::{NodeLogs, SiteLogs};
use crate::pool::{self, Budget, PoolContext, PoolHandle};
use crate::route::{Route, RouteTable, Routes};
use crate::spawn::cgroup::Controller;
use crate::spawn::{Cgroups, SiteFiles, Spawn};

/// Changes of one registry load said one by one in the node's log; more are summed up.
const SAID_ONE_BY_ONE: usize = 20;

pub struct Sites {
    registry: Registry,
    live: HashMap<String, LiveSite>,
    routes: Routes,
    spawner: Arc<dyn Spawn>,
    cgroups: Arc<Cgroups>,
    /// The node is not root: a site's user is recorded but not switched to.
    users_enforced: bool,
    logs: NodeLogs,
    stop_grace: Duration,
    budget: Budget,
    /// Parent of every site's private TMPDIR.
    tmp_root: PathBuf,
    /// Pools of removed sites, draining or ending; awaited at shutdown. A site added
    /// back meanwhile revives its draining pool, or waits for the ending ones.
    draining: Vec<LiveSite>,
}

struct LiveSite {
    route: Arc<Route>,
    task: JoinHandle<()>,
}

impl Sites {
    pub fn new(
        spawner: Arc<dyn Spawn>,
        cgroups: Arc<Cgroups>,
        users_enforced: bool,
        logs: NodeLogs,
        stop_grace: Duration,
        budget: Budget,
        tmp_root: PathBuf,
    ) -> Sites {
        Sites {
            registry: Registry::default(),
            live: HashMap::new(),
            routes: Arc::new(ArcSwap::from_pointee(RouteTable::default())),
            spawner,
            cgroups,
            users_enforced,
            logs,
            stop_grace,
            budget,
            tmp_root,
            draining: Vec::new(),
        }
    }

    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    /// Makes `next` the served set of sites.
    pub fn apply(&mut self, next: Registry) {
        let changes = diff(&self.registry, &next);
        if changes.is_empty() {
            return;
        }
        // A start, or a bulk `roost apply`, would say thousands of lines: then one, and
        // each site's at debug level.
        let one_by_one = changes.len() <= SAID_ONE_BY_ONE;
        if !one_by_one {
            let count = |f: fn(&Change) -> bool| changes.iter().filter(|c| f(c)).count();
            tracing::info!(
                added = count(|c| matches!(c, Change::Added(_))),
                changed = count(|c| matches!(c, Change::Changed(_))),
                removed = count(|c| matches!(c, Change::Removed(_))),
                "sites loaded (each at debug level: -v)"
            );
        }
        for change in &changes {
            match change {
                Change::Added(site) => {
                    let hosts: Vec<String> = site.hosts.iter().map(|h| h.to_string()).collect();
                    say(
                        one_by_one,
                        &site.name,
                        &format!("site added, hosts {hosts:?}"),
                    );
                    self.serve(site);
                }
                Change::Changed(site) => {
                    say(one_by_one, &site.name, "site changed");
                    if let Some(live) = self.live.get_mut(&site.name) {
                        live.route.pool.reconfigure(site.clone());
                        live.route = live.route.serving(site.clone());
                    } else {
                        self.serve(site);
                    }
                }
                Change::Removed(name) => {
                    say(one_by_one, name, "site removed; draining");
                    if let Some(live) = self.live.remove(name) {
                        live.route.pool.drain();
                        self.draining.push(live);
                    }
                }
            }
        }
        self.draining.retain(|d| !d.task.is_finished());
        self.registry = next;
        let sites: Vec<&Site> = self.registry.sites.values().map(|s| &**s).collect();
        self.spawner.retain(&sites);
        self.publish();
    }

    fn publish(&self) {
        self.routes.store(Arc::new(RouteTable::new(
            self.live.values().map(|l| l.route.clone()),
        )));
    }

    /// Serves `site` (added, or not served yet): its draining pool if it has one, else
    /// a new pool.
    fn serve(&mut self, site: &Arc<Site>) {
        let live = match self.revive(site) {
            Some(live) => live,
            None => self.start(site.clone()),
        };
        self.live.insert(site.name.clone(), live);
    }

    /// The pool of `site` if it was removed and still drains: it serves the site again.
    fn revive(&mut self, site: &Arc<Site>) -> Option<LiveSite> {
        let i = self
            .draining
            .iter()
            .position(|d| d.route.site.name == site.name && d.route.pool.revive(site.clone()))?;
        tracing::info!(site = %site.name, "its pool was still draining: it serves the site again");
        let old = self.draining.swap_remove(i);
        Some(LiveSite {
            route: old.route.serving(site.clone()),
            task: old.task,
        })
    }

    /// A new pool for `site`. Nothing is made on disk or in the kernel yet: its log
    /// files come with its first line, its cgroup with its first process.
    fn start(&self, site: Arc<Site>) -> LiveSite {
        let logs = self.logs.open_site(&site.name);
        if let (Some(user), false) = (&site.user, self.users_enforced) {
            tracing::warn!(site = %site.name, %user, "not enforced: the node is not root, so the site runs as the node's user");
        }
        // Pools of the same name still ending remove its cgroup: this one waits for
        // them before it starts a process, so that it makes its cgroup anew (and does
        // not join theirs, which still holds their workers).
        let after: Vec<PoolHandle> = (self.draining.iter())
            .filter(|d| d.route.site.name == site.name)
            .map(|d| d.route.pool.clone())
            .collect();
        let ctx = PoolContext {
            spawner: self.spawner.clone(),
            logs: logs.clone(),
            cgroup: Arc::new(self.cgroups.site(&site.name, site.pool.clone())),
            files: SiteFiles::default(),
            stop_grace: self.stop_grace,
            poll_memory: !self.cgroups.has(Controller::Memory),
            budget: self.budget.clone(),
            tmp_root: self.tmp_root.clone(),
        };
        let (pool, task) = pool::spawn_pool(site.clone(), ctx, after);
        LiveSite {
            route: Arc::new(Route {
                site,
                pool,
                logs,
                hold: Default::default(),
            }),
            task,
        }
    }

    /// After log rotation: every site's logs closed, so that the next line of each
    /// opens a new file. Workers need nothing: they print into pipes, and the node
    /// writes the files. Not on the node's main thread, which applies every registry
    /// change: closing a file waits for a write to it under way, which a stalled disk
    /// holds up.
    pub fn reopen_logs(&self) {
        let logs: Vec<Arc<SiteLogs>> = (self.live.values()).map(|l| l.route.logs.clone()).collect();
        tokio::task::spawn_blocking(move || {
            for site in &logs {
                site.reopen();
            }
            tracing::info!(sites = logs.len(), "logs reopened");
        });
    }

    /// Drains every site and waits for their workers to exit.
    pub async fn shutdown(mut self) {
        self.routes.store(Arc::new(RouteTable::default()));
        for live in self.live.values() {
            live.route.pool.drain();
        }
        let tasks = self
            .live
            .drain()
            .map(|(_, l)| l.task)
            .chain(self.draining.drain(..).map(|d| d.task));
        for task in tasks {
            let _ = task.await;
        }
        // The last lines of every site.
        let logs = self.logs;
        let _ = tokio::task::spawn_blocking(move || logs.stop()).await;
    }
}

/// One site's change in the node's log: at info level, or debug when summed up.
fn say(one_by_one: bool, site: &str, what: &str) {
    if one_by_one {
        tracing::info!(site, "{what}");
    } else {
        tracing::debug!(site, "{what}");
    }
}
