//! Zygote spawn: one warm, preloaded Python process per interpreter forks the workers.
//!
//! The zygote is the loader in zygote mode (`python -I loader.py zygote`), started on
//! first need as the node's user (root on a shared host) with a SOCK_SEQPACKET control
//! socket on fd 3. Per worker the node sends one SPAWN message carrying the site's
//! identity, limits and entry point, with the worker's log, cgroup and slot descriptors
//! attached (SCM_RIGHTS). The zygote forks; the child does the tenant steps of
//! docs/security.md and only then imports the app; the zygote answers SPAWNED with the
//! child's pid and a pidfd, through which the node watches a process it did not fork.
//! The zygote reaps its children and reports each exit status (EXITED).
//!
//! The site's environment (its secrets: the operator's `--env`) is not in the order:
//! it comes in a memfd among the descriptors, which only the child reads. A zygote
//! forks every site's workers, and each child starts with a copy of the zygote's
//! memory: what the zygote had read of one site's order would be, freed but not
//! cleared, in the next site's worker.
//!
//! The process itself is driven by a [`ForkServer`] actor (shared with site templates):
//! a zygote that dies is started again on the next need; spawns in flight fail at once.
//! An interpreter whose zygote cannot start (python older than 3.9) falls back to plain
//! spawn. Messages: docs/protocol.md.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_wire::EnvironWriter;

use super::child::{ChildPlan, WORKER_NOFILE};
use super::forkserver::{control_pair, ForkServer, ForkServerError, Launch, Launched, ReadyFields};
use super::plain::{entry_args, socket_pairs, PlainSpawner};
use super::prepare::{prepare, SpawnConfig};
use super::{
    Spawn, SpawnError, SpawnFuture, SpawnRequest, SpawnedWorker, WorkerProcess, LOOK_WITHIN,
};

/// How long a zygote may take to preload.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a zygote no site needs may live on for the workers it forked (their pools
/// retire them, bounded by their request timeouts); then it is killed, and they with it.
const RETIRED_ZYGOTE_LIMIT: Duration = Duration::from_secs(3600);
/// After a zygote could not start (or may not run), its interpreter's workers are
/// spawned plainly this long before a zygote is tried again; doubled at each failure
/// in a row, up to `PLAIN_AT_MOST`.
const PLAIN_FIRST: Duration = Duration::from_secs(10);
const PLAIN_AT_MOST: Duration = Duration::from_secs(300);

/// Forks workers from one zygote per interpreter; plain spawn where none can run.
pub struct ZygoteSpawner {
    config: Arc<SpawnConfig>,
    plain: PlainSpawner,
    /// One zygote per runtime, or the note that it has none.
    zygotes: Mutex<HashMap<ZygoteKey, Zygote>>,
    /// What each site interpreter resolved to at its last spawn: `retain` reads it, so
    /// that a registry change never waits on a tenant's file system.
    resolved: Mutex<HashMap<PathBuf, PathBuf>>,
}

/// What makes two sites share a zygote: the interpreter it runs and what it preloads.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ZygoteKey {
    python: PathBuf,
    preload: Vec<String>,
}

impl ZygoteKey {
    /// Looks at the site's interpreter: on a site's look only.
    fn of(site: &roost_registry::Site) -> Result<ZygoteKey, SpawnError> {
        if let Some(key) = ZygoteKey::of_runtime(site) {
            return Ok(key);
        }
        // A virtualenv's python is a link to its base interpreter: one zygote serves
        // every site on that interpreter; the venv is layered in the child.
        let python = site.python();
        let real = python
            .canonicalize()
            .map_err(|source| SpawnError::Exec { python, source })?;
        Ok(ZygoteKey::plain(real))
    }

    /// The key of a site with a named runtime: its own python (its venv's, so its
    /// packages are seen). The zygote execs the link in the runtime's venv: the folders
    /// holding the link must be as trusted as the interpreter it points to.
    fn of_runtime(site: &roost_registry::Site) -> Option<ZygoteKey> {
        let runtime = site.runtime.as_ref()?;
        Some(ZygoteKey {
            python: runtime.executable(),
            preload: runtime.preload.clone(),
        })
    }

    fn plain(python: PathBuf) -> ZygoteKey {
        ZygoteKey {
            python,
            preload: Vec::new(),
        }
    }
}

#[derive(Clone)]
enum Zygote {
    Server(ForkServer),
    /// Its zygote could not start, or may not run: workers are spawned plainly until
    /// `retry_at`, when a zygote is tried again (a package being upgraded, a module
    /// added later: warm starts come back without a restart of the node).
    Plain {
        retry_at: std::time::Instant,
        waited: Duration,
    },
}

impl ZygoteSpawner {
    pub fn new(config: SpawnConfig) -> ZygoteSpawner {
        let config = Arc::new(config);
        ZygoteSpawner {
            plain: PlainSpawner::new(config.clone()),
            config,
            zygotes: Mutex::new(HashMap::new()),
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// The zygote of `key`, and how long its workers were spawned plainly when this
    /// call just replaced that with a new try.
    fn zygote(&self, key: &ZygoteKey) -> (Zygote, Option<Duration>) {
        let mut zygotes = self.zygotes.lock().expect("zygote map lock poisoned");
        let zygote = zygotes
            .entry(key.clone())
            .or_insert_with(|| self.server(key));
        let mut retried = None;
        if let Zygote::Plain { retry_at, waited } = *zygote {
            if std::time::Instant::now() >= retry_at {
                tracing::info!(python = %key.python.display(), "trying a zygote again for this interpreter");
                *zygote = self.server(key);
                retried = Some(waited);
            }
        }
        (zygote.clone(), retried)
    }

    /// A zygote for `key`, started at its first fork order.
    fn server(&self, key: &ZygoteKey) -> Zygote {
        let mut config = (*self.config).clone();
        config.preload.extend(key.preload.iter().cloned());
        let python = key.python.clone();
        let span = tracing::info_span!("zygote", python = %python.display());
        let launch: Launch = Arc::new(move || {
            let (python, config) = (python.clone(), config.clone());
            Box::pin(async move { launch(&python, &config).map_err(ForkServerError::Failed) })
        });
        Zygote::Server(ForkServer::new(
            "zygote",
            launch,
            START_TIMEOUT,
            log_ready,
            span,
        ))
    }

    /// Spawns `key`'s workers plainly for a while: longer than `before`, the last wait,
    /// when this failure follows a retry.
    fn mark_plain(&self, key: &ZygoteKey, before: Option<Duration>) {
        let waited = before.map_or(PLAIN_FIRST, |w| (w * 2).min(PLAIN_AT_MOST));
        let retry_at = std::time::Instant::now() + waited;
        let mut zygotes = self.zygotes.lock().expect("zygote map lock poisoned");
        zygotes.insert(key.clone(), Zygote::Plain { retry_at, waited });
    }

    async fn fork(&self, request: SpawnRequest<'_>) -> Result<SpawnedWorker, SpawnError> {
        // The site's interpreter may be in its owner's (network) home.
        let site = request.site.clone();
        let (key, trusted) = request
            .files
            .look(LOOK_WITHIN, move || {
                ZygoteKey::of(&site).map(|key| {
                    let trusted = trusted_interpreter(&key.python).and_then(|()| {
                        match &site.runtime {
                            // The zygote imports the runtime's packages with the node's rights.
                            Some(rt) => trusted_packages(rt),
                            None => Ok(()),
                        }
                    });
                    (key, trusted)
                })
            })
            .await??;
        if request.site.runtime.is_none() {
            let mut resolved = self.resolved.lock().expect("resolved map lock poisoned");
            resolved.insert(request.site.interpreter.clone(), key.python.clone());
        }
        let (server, retried) = match self.zygote(&key) {
            (Zygote::Plain { .. }, _) => return self.plain.start(request).await,
            (Zygote::Server(server), retried) => (server, retried),
        };
        if let Err(why) = trusted {
            // The zygote runs with the node's rights: never on an interpreter a tenant
            // could have written. Plain spawn execs it only after dropping to the site
            // user, which is safe.
            tracing::warn!(site = %request.site.name, python = %key.python.display(), %why, "no zygote for an untrusted interpreter; spawning its workers plainly");
            self.mark_plain(&key, retried);
            return self.plain.start(request).await;
        }
        if let Err(reason) = server.ready().await {
            if server.is_retired() {
                return self.plain_after_retirement(request, &key).await;
            }
            if reason.killed() {
                // Not the interpreter's fault: the next spawn starts a zygote again.
                tracing::warn!(python = %key.python.display(), %reason, "the zygote was killed while it started; this worker is spawned plainly");
                return self.plain.start(request).await;
            }
            tracing::warn!(python = %key.python.display(), %reason, "no zygote for this interpreter; spawning its workers plainly");
            self.mark_plain(&key, retried);
            return self.plain.start(request).await;
        }

        let site = request.site;
        let prepared = prepare(&self.config, &request).await?;
        let (node, child_ends) = socket_pairs(request.role)?;
        let cgroup_fds = request.cgroup.open_procs()?;
        let (kind, target) = entry_args(&site.entry);
        let mut fields: Vec<(String, String)> = vec![
            ("role".into(), request.role.name().into()),
            ("cgroups".into(), cgroup_fds.len().to_string()),
            ("slots".into(), request.role.slots().to_string()),
            ("nofile".into(), WORKER_NOFILE.to_string()),
            ("sched".into(), self.config.sched_policy().into()),
            ("kind".into(), kind.into()),
            ("target".into(), target),
            ("directory".into(), site.directory.display().to_string()),
        ];
        if let Some(id) = &prepared.identity {
            fields.push(("uid".into(), id.uid.to_string()));
            fields.push(("gid".into(), id.gid.to_string()));
        }
        if let Some(venv) = &prepared.venv {
            fields.push(("venv".into(), venv.display().to_string()));
        }
        // The /proc options and the Landlock scopes are the zygote's arguments.
        if let Some(private) = &prepared.private {
            fields.extend(private.order_fields());
        }
        let mut payload = EnvironWriter::with_capacity(1024);
        for (k, v) in &fields {
            payload
                .push(k, v.as_bytes())
                .map_err(|e| SpawnError::Fork(e.to_string()))?;
        }
        let (output, log) = request.output()?;
        let mut fds: Vec<OwnedFd> = vec![output];
        fds.extend(cgroup_fds);
        fds.push(environment_memfd(&prepared.env).map_err(SpawnError::Environment)?);
        fds.extend(child_ends);
        let forked = match server.fork(payload, fds).await {
            Ok(forked) => forked,
            Err(_) if server.is_retired() => {
                return self.plain_after_retirement(request, &key).await;
            }
            Err(reason @ ForkServerError::NoAnswer(_)) => {
                self.retire_hung(&key, &server, &reason);
                return self.plain.start(request).await;
            }
            Err(reason) => {
                return Err(SpawnError::Zygote {
                    python: key.python.clone(),
                    reason,
                })
            }
        };
        Ok(SpawnedWorker {
            process: WorkerProcess::Forked(forked),
            sockets: node.sockets,
            inboxes: node.inboxes,
            log,
        })
    }

    /// A zygote that left a fork unanswered (stopped, stuck) is retired, not killed:
    /// killing it would take every worker it forked, of every site on its interpreter,
    /// and those may be serving. It exits once they have (killed after
    /// [`RETIRED_ZYGOTE_LIMIT`]); the next spawn starts a new zygote.
    fn retire_hung(&self, key: &ZygoteKey, server: &ForkServer, reason: &ForkServerError) {
        let mut zygotes = self.zygotes.lock().expect("zygote map lock poisoned");
        if matches!(zygotes.get(key), Some(Zygote::Server(current)) if current.is(server)) {
            tracing::warn!(python = %key.python.display(), %reason, "the zygote hangs: retired, its workers live on; a new one starts; this worker is spawned plainly");
            zygotes.remove(key);
            server.retire(tokio::time::Instant::now() + RETIRED_ZYGOTE_LIMIT);
        }
    }

    /// The zygote was retired while this spawn was on its way (the last site on its
    /// interpreter went, this one still draining): this worker alone is spawned
    /// plainly, rather than keep a zygote no site wants.
    async fn plain_after_retirement(
        &self,
        request: SpawnRequest<'_>,
        key: &ZygoteKey,
    ) -> Result<SpawnedWorker, SpawnError> {
        tracing::info!(python = %key.python.display(), "its zygote was retired during the spawn; this worker is spawned plainly");
        self.plain.start(request).await
    }
}

impl Spawn for ZygoteSpawner {
    fn spawn<'a>(&'a self, request: SpawnRequest<'a>) -> SpawnFuture<'a> {
        Box::pin(self.fork(request))
    }

    /// A site that has not spawned since its python changed does not keep a zygote
    /// for it: its next spawn starts one if none runs.
    fn retain(&self, sites: &[&roost_registry::Site]) {
        let wanted: std::collections::HashSet<ZygoteKey> = {
            let mut resolved = self.resolved.lock().expect("resolved map lock poisoned");
            let named: std::collections::HashSet<&std::path::Path> =
                sites.iter().map(|s| s.interpreter.as_path()).collect();
            resolved.retain(|interpreter, _| named.contains(interpreter.as_path()));
            (sites.iter())
                .filter_map(|site| {
                    ZygoteKey::of_runtime(site).or_else(|| {
                        let real = resolved.get(&site.interpreter).cloned();
                        real.map(ZygoteKey::plain)
                    })
                })
                .collect()
        };
        let mut zygotes = self.zygotes.lock().expect("zygote map lock poisoned");
        zygotes.retain(|key, zygote| {
            if wanted.contains(key) {
                return true;
            }
            if let Zygote::Server(server) = zygote {
                tracing::info!(python = %key.python.display(), preload = ?key.preload, "no site needs this zygote any more; it exits once its workers have");
                server.retire(tokio::time::Instant::now() + RETIRED_ZYGOTE_LIMIT);
            }
            false
        });
    }
}

/// The worker's environment as pairs (docs/protocol.md) in a memfd, read from its
/// start by the child alone.
fn environment_memfd(env: &[(String, String)]) -> std::io::Result<OwnedFd> {
    let mut pairs = EnvironWriter::with_capacity(1024);
    for (k, v) in env {
        pairs
            .push(k, v.as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    }
    let memfd = nix::sys::memfd::memfd_create(
        c"roost-environment",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )?;
    let mut file = std::fs::File::from(memfd);
    std::io::Write::write_all(&mut file, &pairs.finish())?;
    std::io::Seek::rewind(&mut file)?;
    Ok(OwnedFd::from(file))
}

/// Whether an interpreter may run with the node's rights: the file it resolves to and
/// every folder on the way (the link's folders, the target's folder) must belong to
/// root or the node's user and be writable by nobody else.
fn trusted_interpreter(python: &std::path::Path) -> Result<(), String> {
    let real = python
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", python.display()))?;
    let mut paths = vec![real.clone()];
    paths.extend(real.parent().map(std::path::Path::to_path_buf));
    if real != python {
        // A link (a venv's bin/python): whoever can replace it chooses what runs.
        paths.extend(python.parent().map(std::path::Path::to_path_buf));
        paths.extend(
            python
                .parent()
                .and_then(|p| p.parent())
                .map(std::path::Path::to_path_buf),
        );
    }
    let paths: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
    roost_registry::check_code_files(&paths, nix::unistd::geteuid().as_raw())
        .map_err(|e| e.to_string())
}

/// A runtime's shared packages, imported by its zygote: as trusted as its interpreter.
fn trusted_packages(runtime: &roost_registry::Runtime) -> Result<(), String> {
    let Some(venv) = &runtime.venv else {
        return Ok(());
    };
    let dirs = roost_registry::site_packages(venv);
    let dirs: Vec<&std::path::Path> = dirs.iter().map(PathBuf::as_path).collect();
    roost_registry::check_code_files(&dirs, nix::unistd::geteuid().as_raw())
        .map_err(|e| e.to_string())
}

/// Starts `python -I loader.py zygote PRELOAD SPARES TMP LANDLOCK` with its control
/// socket on fd 3; TMP says whether its workers get namespaces of their own
/// ([`PrivateTargets::zygote_argument`](super::PrivateTargets::zygote_argument)),
/// LANDLOCK the scopes of their Landlock domains
/// ([`LandlockScope::zygote_argument`](super::LandlockScope::zygote_argument)).
fn launch(python: &std::path::Path, config: &SpawnConfig) -> Result<Launched, String> {
    let (ours, theirs) = control_pair()?;
    let mut cmd = std::process::Command::new(python);
    cmd.arg("-I")
        .arg(&config.loader)
        .arg("zygote")
        .arg(config.preload.join(","))
        .arg(config.zygote_spares.to_string())
        .arg(match &config.private_mounts {
            Some(targets) => targets.zygote_argument(),
            None => "shared".into(),
        })
        .arg(match &config.landlock {
            Some(scope) => scope.zygote_argument(),
            None => "0".into(),
        })
        .env_clear()
        .envs(config.base_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    let plan = ChildPlan {
        cgroup_procs: Vec::new(),
        slots: vec![theirs.as_raw_fd()],
        parent: nix::unistd::getpid(),
        drop_to: None,
        workdir: CString::new("/").expect("no NUL in /"),
        // A zygote is on every cold start's path: it keeps the normal policy.
        batch: false,
        ksm: config.ksm,
        // The zygote keeps the host's view and no domain: each worker it forks makes
        // its own.
        private: None,
        landlock: None,
    };
    // SAFETY: as for plain spawn: the closure only makes async-signal-safe calls on
    // memory and descriptors the parent keeps alive until `spawn` returns.
    unsafe {
        cmd.pre_exec(move || plan.run());
    }
    let child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
    drop(theirs);
    Ok(Launched {
        process: WorkerProcess::Child(child),
        ctl: ours,
    })
}

fn log_ready(fields: &ReadyFields) {
    let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("?");
    tracing::info!(
        version = get("python"),
        pid = get("pid"),
        preload_ms = get("preload_us").parse::<f64>().map_or(-1.0, |us| us / 1e3),
        warm_up = get("warm_up"),
        "zygote ready"
    );
}
