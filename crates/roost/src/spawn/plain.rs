//! Plain spawn: fork and exec the site's python running the loader.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::{Gid, Uid};
use roost_registry::{check_code_files, resolve, Entry, Identity};

use super::child::{raw_fds, ChildPlan};
use super::{Spawn, SpawnError, SpawnRequest, SpawnedWorker};

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
}

/// Starts the loader as `python loader.py worker …` with a clean environment.
pub struct PlainSpawner {
    config: SpawnConfig,
}

impl PlainSpawner {
    pub fn new(config: SpawnConfig) -> PlainSpawner {
        PlainSpawner { config }
    }

    /// The site's owner, checked again now: users and files change after `site add`.
    fn identity(&self, request: &SpawnRequest<'_>) -> Result<Option<Identity>, SpawnError> {
        let site = request.site;
        let identity = if self.config.as_root {
            let user = site.user.as_deref().ok_or(SpawnError::NoUser)?;
            Some(
                resolve(user, site.group.as_deref(), self.config.min_uid)
                    .map_err(SpawnError::Owner)?,
            )
        } else {
            None
        };
        let uid = identity
            .as_ref()
            .map_or_else(|| nix::unistd::geteuid().as_raw(), |i| i.uid);
        let paths = site.code_paths();
        let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        check_code_files(&paths, uid).map_err(SpawnError::UnsafeCode)?;
        Ok(identity)
    }

    /// `<tmp_root>/<site>`, owned by the site user, mode 0700.
    fn private_tmp(&self, site: &str, identity: Option<&Identity>) -> Result<PathBuf, SpawnError> {
        let path = self.config.tmp_root.join(site);
        let fail = |source| SpawnError::TmpDir {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.config.tmp_root).map_err(fail)?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() || !meta.is_dir() => {
                return Err(fail(std::io::Error::other(
                    "exists and is not a plain folder",
                )));
            }
            Ok(_) => {}
            Err(_) => std::fs::create_dir(&path).map_err(fail)?,
        }
        if let Some(id) = identity {
            let meta = std::fs::symlink_metadata(&path).map_err(fail)?;
            if meta.uid() != id.uid || meta.gid() != id.gid {
                std::os::unix::fs::chown(&path, Some(id.uid), Some(id.gid)).map_err(fail)?;
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        Ok(path)
    }
}

impl Spawn for PlainSpawner {
    fn spawn(&self, request: SpawnRequest<'_>) -> Result<SpawnedWorker, SpawnError> {
        let site = request.site;
        let identity = self.identity(&request)?;
        let tmp = self.private_tmp(&site.name, identity.as_ref())?;
        if let Some(id) = &identity {
            request.logs.grant(id.gid);
        }
        let exec_err = |source| SpawnError::Exec {
            python: site.python.clone(),
            source,
        };

        let mut node_ends = Vec::new();
        let mut worker_ends = Vec::new();
        for _ in 0..request.slots {
            // std creates both ends close-on-exec: no other child inherits them.
            let (node, worker) =
                std::os::unix::net::UnixStream::pair().map_err(SpawnError::SocketPair)?;
            node.set_nonblocking(true).map_err(SpawnError::SocketPair)?;
            node_ends.push(node);
            worker_ends.push(worker);
        }
        let (kind, target) = match &site.entry {
            Entry::File(path) => ("file", path.display().to_string()),
            Entry::Module { .. } => ("module", site.entry.to_text()),
        };

        let mut cmd = std::process::Command::new(&site.python);
        cmd.arg(&self.config.loader)
            .arg("worker")
            .arg(request.slots.to_string())
            .arg(kind)
            .arg(target)
            .arg(&site.directory)
            .env_clear()
            .envs(self.config.base_env.iter().map(|(k, v)| (k, v)))
            .env("TMPDIR", &tmp);
        match &identity {
            Some(id) => {
                cmd.env("HOME", &id.home)
                    .env("USER", &id.name)
                    .env("LOGNAME", &id.name);
            }
            None => {
                for key in ["HOME", "USER", "LOGNAME"] {
                    if let Some(value) = std::env::var_os(key) {
                        cmd.env(key, value);
                    }
                }
            }
        }
        if site.interpreter.is_dir() {
            cmd.env("VIRTUAL_ENV", &site.interpreter);
        }
        cmd.envs(&site.env)
            .stdin(Stdio::null())
            .stdout(request.error_log.try_clone().map_err(exec_err)?)
            .stderr(request.error_log);

        let plan = ChildPlan {
            cgroup_procs: request.cgroup.open_procs()?,
            slots: raw_fds(&worker_ends),
            parent: nix::unistd::getpid(),
            drop_to: identity
                .as_ref()
                .map(|id| (Uid::from_raw(id.uid), Gid::from_raw(id.gid))),
            workdir: CString::new(site.directory.as_os_str().as_bytes())
                .map_err(|e| exec_err(std::io::Error::other(e)))?,
        };
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on descriptors and memory prepared by the
        // parent, which keeps them alive until `spawn` returns; see `child.rs`.
        unsafe {
            cmd.pre_exec(move || plan.run());
        }
        // PR_SET_PDEATHSIG fires when the forking *thread* exits: the pool spawns from
        // runtime worker threads, which live as long as the node, never from
        // spawn_blocking threads, which retire when idle.
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(exec_err)?;
        drop(worker_ends);
        let pid = child.id().unwrap_or_default();
        let slots = node_ends
            .into_iter()
            .map(tokio::net::UnixStream::from_std)
            .collect::<Result<Vec<_>, _>>()
            .map_err(SpawnError::SocketPair)?;
        Ok(SpawnedWorker { child, pid, slots })
    }
}
