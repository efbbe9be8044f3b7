//! The composition root: `run` wires the registry watcher, the sites and their pools,
//! and the front, and takes them down in order on shutdown.
//!
//! Phases, each logged: boot → serving → draining → stopped.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use roost_registry::{Loaded, SqliteStore, StoreError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::front::{self, FrontConfig};
use crate::logs::NodeLogs;
use crate::pool::{Budget, BudgetLimits};
use crate::registry_watch;
use crate::sites::Sites;
use crate::spawn::{
    favordynmods, ksm, tmpdir, Cgroups, LandlockScope, PlainSpawner, PrivateTargets, Spawn,
    SpawnConfig, ZygoteSpawner,
};

/// How workers are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnMode {
    /// Forked from a warm zygote per interpreter (falls back to plain where one cannot run).
    Zygote,
    /// A fresh interpreter per worker.
    Plain,
}

/// The loader, shipped inside the binary.
pub const LOADER_SOURCE: &str = include_str!("../python/loader.py");
/// The tiny app a zygote's spares load and answer once before their order comes.
const WARM_UP_SOURCE: &str = include_str!("../python/warm_up.py");

/// Everything a node needs besides its listeners (see `docs/configure.md`).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The SQLite registry file.
    pub registry: PathBuf,
    /// Parent of every site's log folder.
    pub log_dir: PathBuf,
    /// A site's `error.log` past this many bytes becomes `error.log.old`.
    pub error_log_size: u64,
    /// Where the node writes the loader for workers to run.
    pub run_dir: PathBuf,
    /// Parent of each site's private TMPDIR (`new`: the run folder's `tmp/`; `roost
    /// serve`: `--tmp-dir`). On a disk, not a tmpfs: what a site writes in a tmpfs is
    /// held in memory, and fills it for every other user of that tmpfs.
    pub tmp_dir: PathBuf,
    pub front: FrontConfig,
    /// How long a worker whose slots are closed may take to exit before SIGKILL.
    pub stop_grace: Duration,
    /// How often the registry is checked for changes.
    pub registry_poll: Duration,
    /// Lowest uid a site may run as (when the node is root).
    pub min_uid: u32,
    /// Use cgroups where the host has them (tests of other things may turn it off).
    pub cgroups: bool,
    /// This node's cgroup folder name in each hierarchy; two nodes on one machine need
    /// different names.
    pub cgroup_name: String,
    /// As root with cgroups: mount a hierarchy with `favordynmods` while running, so
    /// cgroup moves do not wait for RCU (spawn/favordynmods.rs).
    pub favordynmods: bool,
    /// Workers (and templates) run under SCHED_BATCH: waking one does not preempt
    /// the node.
    pub batch_workers: bool,
    /// Mark the memory of zygotes, templates and workers for the kernel's same-page
    /// merging (spawn/ksm.rs).
    pub ksm: bool,
    /// As root: each worker gets its own /tmp, /var/tmp (its site's TMPDIR), /dev/shm,
    /// /proc and System V IPC (spawn/private_mounts.rs); `roost serve --shared-tmp`
    /// turns it off.
    pub private_tmp: bool,
    pub spawn: SpawnMode,
    /// Modules every zygote imports besides the usual standard library ones.
    pub preload: Vec<String>,
    /// The node-wide budget of workers and worker memory (0: unlimited).
    pub budget: BudgetLimits,
    /// Children each zygote keeps forked ahead of need (a spawn then skips the fork).
    pub zygote_spares: u32,
}

impl NodeConfig {
    pub fn new(registry: PathBuf, log_dir: PathBuf, run_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            registry,
            log_dir,
            error_log_size: 64 << 20,
            tmp_dir: run_dir.join("tmp"),
            run_dir,
            front: FrontConfig::default(),
            stop_grace: Duration::from_secs(10),
            registry_poll: Duration::from_millis(200),
            min_uid: roost_registry::DEFAULT_MIN_UID,
            cgroups: true,
            cgroup_name: "roost".to_owned(),
            favordynmods: true,
            batch_workers: true,
            ksm: false,
            private_tmp: true,
            spawn: SpawnMode::Zygote,
            preload: Vec::new(),
            budget: BudgetLimits::default(),
            zygote_spares: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Registry(#[from] StoreError),
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the registry watcher")]
    Watcher(#[source] std::io::Error),
    #[error("cannot listen for SIGUSR1 (reopen the logs)")]
    Signal(#[source] std::io::Error),
    #[error("cannot start the log threads")]
    Logs(#[source] std::io::Error),
    #[error("{0}")]
    Ksm(String),
    #[error("the run folder {path} (--run-dir) is below {target}, which each worker sees as its own: a worker could not find the loader there; choose another run folder, or --shared-tmp")]
    RunDirHidden { path: PathBuf, target: &'static str },
    #[error("the run folder {path} (--run-dir) holds the loader, which zygotes run as root, and {reason}: whoever can write there could swap the loader")]
    RunDirUnsafe { path: PathBuf, reason: String },
    #[error("cannot make the folder of the sites' TMPDIRs {path} (--tmp-dir)")]
    TmpDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make temporary files in the spool folder {dir} (--spool-dir; --response-spool 0 turns spooling off)")]
    Spool {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Serves until `shutdown` turns true; returns once every worker has exited.
pub async fn run(
    config: NodeConfig,
    listeners: Vec<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServerError> {
    tracing::info!(registry = %config.registry.display(), "boot");
    drop(SqliteStore::open(&config.registry)?); // migrations, and a clear error early
    let loader = write_loader(&config.run_dir)?;
    // 0711: a site reads its own logs by their path, and no tenant lists the folder
    // (every site's name).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&config.log_dir)
        .map_err(|source| ServerError::Prepare {
            path: config.log_dir.clone(),
            source,
        })?;
    let as_root = nix::unistd::geteuid().is_root();
    if as_root && roost_registry::others_have(&config.log_dir, 0o004) {
        tracing::warn!(dir = %config.log_dir.display(), "any user can list the log folder, and so every site's name; `chmod 711` it (the node makes it so)");
    }
    let exposed = roost_registry::readable_by_others(&config.registry);
    if as_root && !exposed.is_empty() {
        let files: Vec<String> = exposed.iter().map(|f| f.display().to_string()).collect();
        tracing::warn!(files = %files.join(" "), "any user can read the registry, and so every site's environment (its secrets); `chmod 600` these (a new registry is made so)");
    }
    if as_root {
        tracing::info!(
            min_uid = config.min_uid,
            "running as root: each site's workers run as the site's user"
        );
    } else {
        tracing::info!(
            uid = nix::unistd::geteuid().as_raw(),
            "not running as root: every site's workers run as this user"
        );
    }
    let cgroups = Arc::new(if config.cgroups {
        Cgroups::detect(&config.cgroup_name)
    } else {
        Cgroups::none()
    });
    cgroups.sweep();
    tracing::info!(enforced = %cgroups.describe(), "resource limits");
    // Held until the node stops: unmounting it ends the effect.
    let _favordynmods = (as_root && config.favordynmods && cgroups.any())
        .then(|| favor_dynmods(&config.run_dir))
        .flatten();
    if config.ksm {
        ksm::check().map_err(ServerError::Ksm)?;
    }
    if config.front.response_spool > 0 {
        // A folder that cannot take the spool's files is said now, not at the first
        // slow client.
        let dir = &config.front.spool_dir;
        tempfile::tempfile_in(dir).map_err(|source| ServerError::Spool {
            dir: dir.clone(),
            source,
        })?;
    }
    let tmp_root = config.tmp_dir.clone();
    // Held until the node stops: the folder is this node's.
    let _tmp_root = tmpdir::open_root(&tmp_root).map_err(|source| ServerError::TmpDir {
        path: tmp_root.clone(),
        source,
    })?;
    let private_mounts = (as_root && config.private_tmp).then(PrivateTargets::detect);
    if let Some(target) = private_mounts
        .as_ref()
        .and_then(|t| t.hiding(&config.run_dir))
    {
        return Err(ServerError::RunDirHidden {
            path: config.run_dir.clone(),
            target,
        });
    }
    match &private_mounts {
        Some(targets) => tracing::info!(
            own_proc = targets.own_proc(),
            "each worker has its own /tmp, /var/tmp (its TMPDIR), /dev/shm and System V IPC"
        ),
        None if as_root => tracing::info!(
            "workers share the host's /tmp, /var/tmp, /dev/shm, System V IPC and /proc (--shared-tmp)"
        ),
        None => {}
    }
    let landlock = as_root.then(LandlockScope::detect).and_then(|scope| match scope {
        Ok(scope) => {
            tracing::info!("each worker has a Landlock domain of its own: no abstract socket, signal or trace reaches out of it");
            Some(scope)
        }
        Err(why) => {
            tracing::warn!(%why, "workers can reach any abstract Unix socket on the host, and those of one owner can signal and trace each other");
            None
        }
    });
    let spawn_config = SpawnConfig {
        loader,
        tmp_root: tmp_root.clone(),
        as_root,
        min_uid: config.min_uid,
        base_env: worker_base_env(),
        preload: config.preload.clone(),
        zygote_spares: config.zygote_spares,
        batch_workers: config.batch_workers,
        ksm: config.ksm,
        private_mounts,
        landlock,
    };
    let spawner: Arc<dyn Spawn> = match config.spawn {
        SpawnMode::Zygote => Arc::new(ZygoteSpawner::new(spawn_config)),
        SpawnMode::Plain => Arc::new(PlainSpawner::new(Arc::new(spawn_config))),
    };
    tracing::info!(mode = ?config.spawn, "spawning workers");
    tracing::info!(
        max_workers = config.budget.max_workers,
        max_worker_memory = config.budget.max_memory,
        "worker budget (0: unlimited)"
    );
    let mut sites = Sites::new(
        spawner,
        cgroups.clone(),
        as_root,
        NodeLogs::start(config.log_dir.clone(), config.error_log_size)
            .map_err(ServerError::Logs)?,
        config.stop_grace,
        Budget::start(config.budget),
        tmp_root,
    );
    let mut updates = registry_watch::spawn(config.registry.clone(), config.registry_poll)
        .map_err(ServerError::Watcher)?;
    // SIGUSR1 reopens the logs, as it does for nginx and Apache (docs/operations.md).
    let mut reopen = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .map_err(ServerError::Signal)?;
    if let Some(loaded) = updates.recv().await {
        apply(&mut sites, loaded);
    }

    let mut fronts = JoinSet::new();
    // One set of budgets for slow clients, whatever the listener.
    let slow_clients = Arc::new(front::SlowClients::new(&config.front));
    // One limit of connections, whatever the listener; the other half of the open
    // file limit is for the sites: log files, slot sockets, pipes, spool files.
    let max_connections = config
        .front
        .max_connections
        .unwrap_or_else(|| open_file_limit() / 2)
        .max(1);
    tracing::info!(max_connections, "accepting client connections");
    let connection_permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    for listener in listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(listen = %front::describe(&addr), "listening");
        }
        fronts.spawn(front::serve(
            listener,
            sites.routes(),
            config.front.clone(),
            slow_clients.clone(),
            connection_permits.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!("serving");
    loop {
        tokio::select! {
            update = updates.recv() => match update {
                Some(loaded) => apply(&mut sites, loaded),
                None => {
                    tracing::error!("the registry watcher stopped; live changes are off until restart");
                    break;
                }
            },
            _ = reopen.recv() => sites.reopen_logs(),
            _ = crate::stopping(&mut shutdown) => break,
        }
    }
    crate::stopping(&mut shutdown).await;
    tracing::info!("draining");
    while fronts.join_next().await.is_some() {}
    sites.shutdown().await;
    cgroups.remove_bases();
    tracing::info!("stopped");
    Ok(())
}

/// The process's open file limit now (the CLI raises it to the hard limit first).
fn open_file_limit() -> usize {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft.min(usize::MAX as u64) as usize)
}

fn favor_dynmods(run_dir: &std::path::Path) -> Option<favordynmods::FavorDynmods> {
    match favordynmods::enable(run_dir) {
        Ok(favordynmods::Outcome::Mounted(m)) => {
            tracing::info!(hierarchy = %m.point().display(), "cgroup moves favoured (favordynmods) while the node runs; --no-favordynmods to leave the kernel as it is");
            Some(m)
        }
        Ok(favordynmods::Outcome::AlreadyOn) => {
            tracing::info!("cgroup moves already favoured (a hierarchy has favordynmods)");
            None
        }
        Err(why) => {
            tracing::warn!(%why, "cannot turn on favordynmods: each cold start waits for the kernel's cgroup lock (an RCU grace period); on cgroup v2, `mount -o remount,favordynmods /sys/fs/cgroup` does it for the host");
            None
        }
    }
}

fn apply(sites: &mut Sites, loaded: Loaded) {
    for rejected in &loaded.rejected {
        tracing::error!(error = %rejected, "a site in the registry is invalid and is not served");
    }
    sites.apply(loaded.registry);
}

/// Writes the loader where every site user can read it (and nobody else can change it).
fn write_loader(run_dir: &Path) -> Result<PathBuf, ServerError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| ServerError::Prepare { path, source }
    };
    std::fs::create_dir_all(run_dir).map_err(err(run_dir))?;
    // Workers of every site user read the loader from here.
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o755))
        .map_err(err(run_dir))?;
    let real = run_dir.canonicalize().map_err(err(run_dir))?;
    // Whoever could write the loader, or put another folder in its place, would choose
    // what a zygote runs as root.
    if let Some(reason) = roost_registry::open_to_others(&real, nix::unistd::geteuid().as_raw()) {
        return Err(ServerError::RunDirUnsafe {
            path: run_dir.to_owned(),
            reason,
        });
    }
    // The loader, and the tiny app its zygotes' spares practise on (loader.py, warm_up).
    for (name, source) in [("warm_up.py", WARM_UP_SOURCE), ("loader.py", LOADER_SOURCE)] {
        let path = run_dir.join(name);
        let tmp = run_dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, source).map_err(err(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
            .map_err(err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(err(&path))?;
    }
    Ok(run_dir.join("loader.py"))
}

/// The environment every worker starts from (the spawner adds HOME, USER, LOGNAME
/// and TMPDIR); nothing else of the node's leaks in.
fn worker_base_env() -> Vec<(String, String)> {
    vec![
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::LOADER_SOURCE;

    /// The loader keeps its own copies of the wire's version and limits. Past a limit
    /// the node kills the worker: a loader that let an app's response go past one
    /// would cost a worker for what is the app's error (a 500).
    #[test]
    fn the_loaders_limits_are_the_wires() {
        for (name, wire) in [
            (
                "PROTOCOL_VERSION",
                usize::from(roost_wire::PROTOCOL_VERSION),
            ),
            ("MAX_CHUNK", roost_wire::MAX_BODY_CHUNK),
            ("MAX_REQUEST_HEAD", roost_wire::MAX_REQUEST_HEAD),
            ("MAX_RESPONSE_HEAD", roost_wire::MAX_RESPONSE_HEAD),
            ("MAX_RESPONSE_HEADERS", roost_wire::MAX_RESPONSE_HEADERS),
            ("MAX_FATAL", roost_wire::MAX_FATAL),
        ] {
            let prefix = format!("{name} = ");
            let value = (LOADER_SOURCE.lines())
                .find_map(|line| line.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("the loader has no {name}"));
            let loaders: usize = match value.split_once(" << ") {
                Some((base, shift)) => {
                    base.parse::<usize>().unwrap() << shift.parse::<u32>().unwrap()
                }
                None => value.parse().unwrap(),
            };
            assert_eq!(loaders, wire, "{name}");
        }
    }
}
