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
use crate::logs::SiteLogs;

/// Forks one site's workers from its template; starts the template on first need.
pub struct SiteTemplate {
    launch: Launch,
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
        let launch: Launch = Arc::new(move || {
            let (spawner, site, logs, cgroup, files) = (
                spawner.clone(),
                site.clone(),
                logs.clone(),
                cgroup.clone(),
                files.clone(),
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
                Ok(Launched {
                    process: spawned.process,
                    ctl,
                })
            })
        });
        SiteTemplate {
            launch,
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
        Ok(SpawnedWorker {
            process: WorkerProcess::Forked(forked),
            sockets: node.sockets,
            inboxes: node.inboxes,
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
