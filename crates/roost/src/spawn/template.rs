//! A site's template: its app imported once, in a process already running as the site
//! user inside the site's cgroup; the site's workers are forked from it and share its
//! memory copy-on-write (the `preload` site setting).
//!
//! The template is started like a worker (by the zygote or plainly) in the template
//! role, so it goes through every tenant step first; it then speaks the zygote's
//! messages ([`ForkServer`]). It is tenant code: its answers are checked like any
//! worker's (a forked pid must be its own child). Its workers need no cgroup move (they
//! inherit it) and no import. The pool retires the template when the site goes quiet
//! (pool/actor.rs), when the site changes, and when the entry file is touched; a
//! retired template exits once its workers have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_registry::Site;
use roost_wire::EnvironWriter;
use tokio::time::Instant;

use super::forkserver::{ForkServer, ForkServerError, Launch, Launched, ReadyFields};
use super::plain::socket_pairs;
use super::{
    Role, SiteCgroup, SiteFiles, Spawn, SpawnError, SpawnFuture, SpawnRequest, SpawnedWorker,
    WorkerProcess,
};
use crate::logs::{ProcessLog, SiteLogs};

/// Forks one site's workers from its template; starts the template on first need.
pub struct SiteTemplate {
    launch: Launch,
    /// The error log of the template process now running: its workers inherit its
    /// stdout and stderr.
    log: Arc<Mutex<Option<ProcessLog>>>,
    start_timeout: Duration,
    span: tracing::Span,
    current: Mutex<Option<ForkServer>>,
    /// A fork went unanswered: the template hangs (the pool replaces it).
    hangs: AtomicBool,
}

impl SiteTemplate {
    /// `spawner` starts the template process itself; `start_timeout` bounds its import.
    pub fn new(
        spawner: Arc<dyn Spawn>,
        site: Arc<Site>,
        logs: Arc<SiteLogs>,
        cgroup: Arc<SiteCgroup>,
        files: SiteFiles,
        start_timeout: Duration,
    ) -> SiteTemplate {
        let span = tracing::info_span!("template", site = %site.name);
        let log = Arc::new(Mutex::new(None));
        let launched_log = log.clone();
        let launch: Launch = Arc::new(move || {
            let (spawner, site, logs, cgroup, files, launched_log) = (
                spawner.clone(),
                site.clone(),
                logs.clone(),
                cgroup.clone(),
                files.clone(),
                launched_log.clone(),
            );
            Box::pin(async move {
                let request = SpawnRequest {
                    site: &site,
                    role: Role::Template,
                    logs: &logs,
                    cgroup: &cgroup,
                    files: &files,
                };
                let spawned =
                    spawner
                        .spawn(request)
                        .await
                        .map_err(|e| ForkServerError::Launch {
                            reason: crate::error_chain(&e),
                            killed: e.killed_from_outside(),
                        })?;
                let ctl = spawned.sockets.into_iter().next();
                let ctl = ctl.ok_or_else(|| {
                    ForkServerError::Failed("the template got no control socket".into())
                })?;
                *launched_log.lock().expect("template lock poisoned") = Some(spawned.log);
                Ok(Launched {
                    process: spawned.process,
                    ctl,
                })
            })
        });
        SiteTemplate {
            launch,
            log,
            start_timeout,
            span,
            current: Mutex::new(None),
            hangs: AtomicBool::new(false),
        }
    }

    /// Whether a fork went unanswered within its timeout.
    pub fn hangs(&self) -> bool {
        self.hangs.load(Ordering::Relaxed)
    }

    fn server(&self) -> ForkServer {
        let mut current = self.current.lock().expect("template lock poisoned");
        current
            .get_or_insert_with(|| {
                ForkServer::new(
                    "template",
                    self.launch.clone(),
                    self.start_timeout,
                    log_ready,
                    self.span.clone(),
                )
            })
            .clone()
    }

    /// Whether a template process is (or is being) started; false once retired.
    pub fn is_live(&self) -> bool {
        self.current
            .lock()
            .expect("template lock poisoned")
            .is_some()
    }

    /// The template stops forking and exits once its workers have; killed at
    /// `deadline`. The next spawn starts a new one (with the app imported afresh).
    pub fn retire(&self, deadline: Instant) {
        if let Some(server) = self.current.lock().expect("template lock poisoned").take() {
            server.retire(deadline);
        }
    }

    async fn fork(&self, request: SpawnRequest<'_>) -> Result<SpawnedWorker, SpawnError> {
        let server = self.server();
        server.ready().await.map_err(SpawnError::Template)?;
        // The template's stderr already is the site's error log, and its children
        // inherit its cgroup: only the slot sockets go with the order.
        let (node, child_ends) = socket_pairs(request.role)?;
        let mut payload = EnvironWriter::with_capacity(16);
        payload
            .push("slots", request.role.slots().to_string().as_bytes())
            .expect("digits have no NUL");
        let forked = server.fork(payload, child_ends).await.map_err(|e| {
            if matches!(e, ForkServerError::NoAnswer(_)) {
                self.hangs.store(true, Ordering::Relaxed);
            }
            SpawnError::Template(e)
        })?;
        // The log of the template launched last: the worker's parent, unless that died
        // since (and the worker with it).
        let log = (self.log.lock().expect("template lock poisoned").clone())
            .unwrap_or_else(|| request.logs.process_log());
        Ok(SpawnedWorker {
            process: WorkerProcess::Forked(forked),
            sockets: node.sockets,
            inboxes: node.inboxes,
            log,
        })
    }
}

impl Spawn for SiteTemplate {
    fn spawn<'a>(&'a self, request: SpawnRequest<'a>) -> SpawnFuture<'a> {
        Box::pin(self.fork(request))
    }
}

fn log_ready(fields: &ReadyFields) {
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("?");
    tracing::info!(
        pid = get("pid"),
        import_ms = get("import_us").parse::<f64>().map_or(-1.0, |us| us / 1e3),
        "template ready"
    );
}
