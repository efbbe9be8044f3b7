//! What every spawn does before any process exists: resolve and check the site's
//! owner, check its code files, make its cgroup (with the site's first process),
//! prepare its private TMPDIR and its log permissions, and build its clean environment.
//! All of it looks at files and user databases a hung file system or directory service
//! can stall, so it runs as one of the site's looks ([`SiteFiles`](super::SiteFiles)),
//! never on a runtime thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use roost_registry::{check_code_files, resolve, Identity, Site};

use super::landlock_scope::LandlockScope;
use super::private_mounts::{PrivateMounts, PrivateTargets};
use super::{tmpdir, SiteCgroup, SpawnError, SpawnRequest, LOOK_WITHIN};
use crate::logs::SiteLogs;

/// How this node starts workers.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// The loader, written by the node at start-up where every site user can read it.
    pub loader: PathBuf,
    /// Parent of each site's private temporary folder (TMPDIR).
    pub tmp_root: PathBuf,
    /// True when the node can and must switch users (it runs as root).
    pub as_root: bool,
    /// Lowest uid a site may run as.
    pub min_uid: u32,
    /// Variables every worker gets before the site's own (PATH, LANG).
    pub base_env: Vec<(String, String)>,
    /// Modules every zygote imports besides the standard library's usual ones.
    pub preload: Vec<String>,
    /// Children each zygote keeps forked ahead of need.
    pub zygote_spares: u32,
    /// Workers run under SCHED_BATCH (the node keeps the normal policy): a worker
    /// woken by the node's write does not preempt the node.
    pub batch_workers: bool,
    /// Zygotes (and so every process they fork) and plainly spawned workers have their
    /// memory marked for the kernel's same-page merging (`ksm`).
    pub ksm: bool,
    /// Each worker gets its own /tmp, /var/tmp (its site's TMPDIR), /dev/shm and /proc,
    /// and System V IPC of its own (spawn/private_mounts.rs); None when the node is not
    /// root, or was told `--shared-tmp`.
    pub private_mounts: Option<PrivateTargets>,
    /// Each worker enters a Landlock domain of its own, out of reach of abstract
    /// sockets, signals and traces (spawn/landlock_scope.rs); None when the node is
    /// not root, or its kernel has no Landlock scopes.
    pub landlock: Option<LandlockScope>,
}

impl SpawnConfig {
    /// The `sched` field of a zygote's SPAWN order (docs/protocol.md).
    pub fn sched_policy(&self) -> &'static str {
        if self.batch_workers {
            "batch"
        } else {
            "normal"
        }
    }
}

/// The outcome of the checks: who the worker runs as, and its environment.
pub struct Prepared {
    pub identity: Option<Identity>,
    /// The site's python3 ([`Site::python`]).
    pub python: PathBuf,
    pub env: Vec<(String, String)>,
    /// The site's virtualenv ([`Site::venv`]), layered over the zygote's packages.
    pub venv: Option<PathBuf>,
    /// PYTHONPATH for a plainly spawned worker of a site with both a runtime and a
    /// virtualenv of its own.
    pub venv_path: Option<String>,
    /// The worker's own /tmp, /var/tmp, /dev/shm and /proc
    /// ([`SpawnConfig::private_mounts`]).
    pub private: Option<PrivateMounts>,
}

/// Runs the checks as one of the site's looks, within [`LOOK_WITHIN`].
pub async fn prepare(
    config: &Arc<SpawnConfig>,
    request: &SpawnRequest<'_>,
) -> Result<Prepared, SpawnError> {
    let (config, site, logs, cgroup) = (
        config.clone(),
        request.site.clone(),
        request.logs.clone(),
        request.cgroup.clone(),
    );
    request
        .files
        .look(LOOK_WITHIN, move || {
            prepare_now(&config, &site, &logs, &cgroup)
        })
        .await?
}

fn prepare_now(
    config: &SpawnConfig,
    site: &Site,
    logs: &SiteLogs,
    cgroup: &SiteCgroup,
) -> Result<Prepared, SpawnError> {
    // Users and files change after `site add`: check again now.
    let identity = if config.as_root {
        let user = site.user.as_deref().ok_or(SpawnError::NoUser)?;
        Some(resolve(user, site.group.as_deref(), config.min_uid).map_err(SpawnError::Owner)?)
    } else {
        None
    };
    let uid = identity
        .as_ref()
        .map_or_else(|| nix::unistd::geteuid().as_raw(), |i| i.uid);
    let paths = site.code_paths();
    let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    check_code_files(&paths, uid).map_err(SpawnError::UnsafeCode)?;
    if let Some(targets) = &config.private_mounts {
        let needed = [site.directory.as_path(), site.interpreter.as_path()];
        for path in paths.iter().copied().chain(needed) {
            if let Some(target) = targets.hiding(path) {
                return Err(SpawnError::HiddenByPrivateTmp {
                    path: path.to_path_buf(),
                    target,
                });
            }
        }
    }
    cgroup.make().map_err(SpawnError::MakeCgroup)?;
    let tmp = tmpdir::make(&config.tmp_root, &site.name, identity.as_ref())?;
    if let Some(id) = &identity {
        logs.grant(id.gid);
    }

    let mut env = config.base_env.clone();
    let tmp_seen = match &config.private_mounts {
        Some(targets) => targets.tmpdir_seen(&tmp),
        None => tmp.clone(),
    };
    env.push(("TMPDIR".into(), tmp_seen.display().to_string()));
    match &identity {
        Some(id) => {
            env.push(("HOME".into(), id.home.display().to_string()));
            env.push(("USER".into(), id.name.clone()));
            env.push(("LOGNAME".into(), id.name.clone()));
        }
        None => {
            for key in ["HOME", "USER", "LOGNAME"] {
                if let Ok(value) = std::env::var(key) {
                    env.push((key.into(), value));
                }
            }
        }
    }
    let venv = site.venv();
    if let Some(venv) = &venv {
        env.push(("VIRTUAL_ENV".into(), venv.display().to_string()));
    }
    env.extend(site.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let venv_path = venv
        .as_ref()
        .filter(|_| site.runtime.is_some())
        .and_then(|venv| std::env::join_paths(roost_registry::site_packages(venv)).ok())
        .map(|joined| joined.to_string_lossy().into_owned());
    Ok(Prepared {
        identity,
        python: site.python(),
        env,
        venv,
        venv_path,
        private: config
            .private_mounts
            .as_ref()
            .map(|targets| targets.for_site(&tmp, site.pool.memory_max)),
    })
}
