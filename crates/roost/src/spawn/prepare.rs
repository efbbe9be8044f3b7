//! What every spawn does before any process exists: resolve and check the site's
//! owner, check its code files, prepare its private TMPDIR and its log permissions, and
//! build its clean environment. All of it looks at files and user databases a hung file
//! system or directory service can stall, so it runs as one of the site's looks
//! ([`SiteFiles`](super::SiteFiles)), never on a runtime thread.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use roost_registry::{check_code_files, resolve, Identity, Site};

use super::{SpawnError, SpawnRequest, LOOK_WITHIN};
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
    /// Whether the site's interpreter is a virtualenv (layered over the zygote's).
    pub venv: bool,
    /// PYTHONPATH for a plainly spawned worker of a site with both a runtime and a
    /// virtualenv of its own.
    pub venv_path: Option<String>,
}

/// Runs the checks as one of the site's looks, within [`LOOK_WITHIN`].
pub async fn prepare(
    config: &Arc<SpawnConfig>,
    request: &SpawnRequest<'_>,
) -> Result<Prepared, SpawnError> {
    let (config, site, logs) = (config.clone(), request.site.clone(), request.logs.clone());
    request
        .files
        .look(LOOK_WITHIN, move || prepare_now(&config, &site, &logs))
        .await?
}

fn prepare_now(config: &SpawnConfig, site: &Site, logs: &SiteLogs) -> Result<Prepared, SpawnError> {
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
    let tmp = private_tmp(&config.tmp_root, &site.name, identity.as_ref())?;
    if let Some(id) = &identity {
        logs.grant(id.gid);
    }

    let mut env = config.base_env.clone();
    env.push(("TMPDIR".into(), tmp.display().to_string()));
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
    let venv = site.interpreter.is_dir();
    if venv {
        env.push(("VIRTUAL_ENV".into(), site.interpreter.display().to_string()));
    }
    env.extend(site.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let venv_path = (venv && site.runtime.is_some())
        .then(|| std::env::join_paths(roost_registry::site_packages(&site.interpreter)).ok())
        .flatten()
        .map(|joined| joined.to_string_lossy().into_owned());
    Ok(Prepared {
        identity,
        python: site.python(),
        env,
        venv,
        venv_path,
    })
}

/// The private TMPDIR of `site`: its workers' temporary files, removed with the site
/// (and when the node stops, as systemd's PrivateTmp is with its service).
pub fn private_tmp_path(tmp_root: &Path, site: &str) -> PathBuf {
    tmp_root.join(site)
}

/// `<tmp_root>/<site>`, owned by the site user, mode 0700. A folder another user owns
/// was left by the site's previous owner (the site changed hands, or its name was
/// reused): it is moved out of the way and removed with what is in it, not handed
/// over. Moved first: the previous owner's workers may still be finishing requests and
/// writing there, which would keep a removal in place from ever ending.
fn private_tmp(
    tmp_root: &Path,
    site: &str,
    identity: Option<&Identity>,
) -> Result<PathBuf, SpawnError> {
    let path = private_tmp_path(tmp_root, site);
    let fail = |source| SpawnError::TmpDir {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(tmp_root).map_err(fail)?;
    // Made by an earlier worker of the site, or by one starting at the same time.
    let make = || match std::fs::create_dir(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        made => made.map_err(fail),
    };
    make()?;
    let meta = std::fs::symlink_metadata(&path).map_err(fail)?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(fail(std::io::Error::other(
            "exists and is not a plain folder",
        )));
    }
    if let Some(id) = identity {
        if meta.uid() != id.uid || meta.gid() != id.gid {
            // Workers of a site start together: one looks again and hands over at a time.
            static HANDOVER: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = HANDOVER.lock().unwrap_or_else(|e| e.into_inner());
            let owner = std::fs::symlink_metadata(&path).map_err(fail)?.uid();
            // Root owns a folder only between its making and this chown.
            if owner != 0 && owner != id.uid {
                let since = std::time::UNIX_EPOCH.elapsed().unwrap_or_default();
                let aside = tmp_root.join(format!(".previous-{site}-{owner}-{}", since.as_nanos()));
                std::fs::rename(&path, &aside).map_err(fail)?;
                remove_in_background(aside);
                make()?;
            }
            std::os::unix::fs::chown(&path, Some(id.uid), Some(id.gid)).map_err(fail)?;
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    Ok(path)
}

/// Removes a previous owner's TMPDIR off the runtime thread: it holds whatever that
/// owner left, a million files if they liked, and every site waits while a runtime
/// thread is busy.
fn remove_in_background(folder: PathBuf) {
    let remove = move || {
        if let Err(e) = std::fs::remove_dir_all(&folder) {
            tracing::warn!(path = %folder.display(), error = %e, "cannot remove the site's previous owner's TMPDIR");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(remove)),
        Err(_) => remove(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_starting_together_share_the_private_tmp() {
        let root = tempfile::tempdir().unwrap();
        // Two workers of a site start at once (processes.min 2): each prepares the
        // same folder, and neither may fail because the other made it first.
        for round in 0..100 {
            let site = format!("site{round}");
            let barrier = std::sync::Barrier::new(4);
            let results: Vec<_> = std::thread::scope(|s| {
                let starts: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            private_tmp(root.path(), &site, None).map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                starts.into_iter().map(|t| t.join().unwrap()).collect()
            });
            for r in results {
                assert_eq!(r, Ok(root.path().join(&site)), "round {round}");
            }
        }
    }

    #[test]
    fn a_symlink_in_place_of_the_private_tmp_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("site")).unwrap();
        let err = private_tmp(root.path(), "site", None).unwrap_err();
        assert!(
            err.to_string().contains("private temporary folder"),
            "{err}"
        );
    }
}
