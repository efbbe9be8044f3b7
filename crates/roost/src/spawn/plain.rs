//! Plain spawn: fork and exec the site's python running the loader.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;

use nix::unistd::{Gid, Uid};
use roost_registry::Entry;

use super::child::{raw_fds, ChildPlan};
use super::forkserver::control_pair;
use super::landlock_scope::LandlockScope;
use super::prepare::{prepare, Prepared, SpawnConfig};
use super::{Role, Spawn, SpawnError, SpawnFuture, SpawnRequest, SpawnedWorker, WorkerProcess};
use crate::worker::{has_inbox, Inbox};

/// What a plainly spawned child execs first: `env PYTHON loader.py …` execs the site's
/// python in turn, from the child's own time.
const TRAMPOLINE: &str = "/usr/bin/env";

/// Starts the loader as `python loader.py worker …` with a clean environment.
pub struct PlainSpawner {
    config: Arc<SpawnConfig>,
}

impl PlainSpawner {
    pub fn new(config: Arc<SpawnConfig>) -> PlainSpawner {
        PlainSpawner { config }
    }

    pub async fn start(&self, request: SpawnRequest<'_>) -> Result<SpawnedWorker, SpawnError> {
        let prepared = prepare(&self.config, &request).await?;
        self.start_prepared(request, prepared)
    }

    /// Forks and execs. The fork's caller waits until the child has exec'd, so the
    /// child execs a trampoline on the node's own disk ([`TRAMPOLINE`], from `/`),
    /// which execs the site's python: an interpreter whose file system stopped
    /// answering then holds the child (until its start timeout kills it), never this
    /// runtime thread. The loader changes to the site's folder itself.
    fn start_prepared(
        &self,
        request: SpawnRequest<'_>,
        prepared: Prepared,
    ) -> Result<SpawnedWorker, SpawnError> {
        let site = request.site;
        let exec_err = |source| SpawnError::Exec {
            python: prepared.python.clone(),
            source,
        };
        let (node, child_ends) = socket_pairs(request.role)?;
        let (kind, target) = entry_args(&site.entry);
        let (output, log) = request.output()?;

        // A named runtime runs its own python; the site's venv goes on PYTHONPATH,
        // ahead of the runtime's packages.
        let python = site
            .runtime
            .as_ref()
            .map_or_else(|| prepared.python.clone(), |r| r.executable());
        let mut cmd = std::process::Command::new(TRAMPOLINE);
        cmd.arg("--")
            .arg(&python)
            .arg(&self.config.loader)
            .arg(request.role.name())
            .arg(request.role.slots().to_string())
            .arg(kind)
            .arg(target)
            .arg(&site.directory)
            .env_clear()
            .envs(prepared.env.iter().map(|(k, v)| (k, v)))
            .envs(prepared.venv_path.map(|path| ("PYTHONPATH", path)))
            .stdin(Stdio::null())
            .stdout(output.try_clone().map_err(exec_err)?)
            .stderr(output);
        let plan = ChildPlan {
            cgroup_procs: request.cgroup.open_procs()?,
            slots: raw_fds(&child_ends),
            parent: nix::unistd::getpid(),
            drop_to: prepared
                .identity
                .as_ref()
                .map(|id| (Uid::from_raw(id.uid), Gid::from_raw(id.gid))),
            workdir: CString::new("/").expect("no NUL in /"),
            batch: self.config.batch_workers,
            ksm: self.config.ksm,
            private: prepared
                .private
                .as_ref()
                .map(|p| p.for_child())
                .transpose()
                .map_err(|e| exec_err(e.into()))?,
            landlock: self.config.landlock.as_ref().map(LandlockScope::for_child),
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
        drop(child_ends);
        Ok(SpawnedWorker {
            process: WorkerProcess::Child(child),
            sockets: node.sockets,
            inboxes: node.inboxes,
            log,
        })
    }
}

impl Spawn for PlainSpawner {
    fn spawn<'a>(&'a self, request: SpawnRequest<'a>) -> SpawnFuture<'a> {
        Box::pin(self.start(request))
    }
}

/// What the node keeps of the channels a new process gets.
pub(super) struct NodeEnds {
    pub sockets: Vec<OwnedFd>,
    pub inboxes: Vec<Inbox>,
}

/// The node's ends and the child's ends of the channels a role needs: one stream pair
/// and one inbox per slot (if [`has_inbox`]; the child gets the sockets, then the
/// inboxes), or one SOCK_SEQPACKET control pair for a template. All are
/// created close-on-exec, so no other child inherits them; the node's ends are
/// non-blocking.
pub(super) fn socket_pairs(role: Role) -> Result<(NodeEnds, Vec<OwnedFd>), SpawnError> {
    match role {
        Role::Template => {
            let (ours, theirs) =
                control_pair().map_err(|e| SpawnError::SocketPair(std::io::Error::other(e)))?;
            let node = NodeEnds {
                sockets: vec![ours],
                inboxes: Vec::new(),
            };
            Ok((node, vec![theirs]))
        }
        Role::Worker { slots } => {
            let mut node = NodeEnds {
                sockets: Vec::new(),
                inboxes: Vec::new(),
            };
            let mut child_ends = Vec::new();
            for _ in 0..slots {
                let (ours, theirs) =
                    std::os::unix::net::UnixStream::pair().map_err(SpawnError::SocketPair)?;
                ours.set_nonblocking(true).map_err(SpawnError::SocketPair)?;
                node.sockets.push(OwnedFd::from(ours));
                child_ends.push(OwnedFd::from(theirs));
            }
            if has_inbox(slots) {
                for _ in 0..slots {
                    let (inbox, theirs) = Inbox::new().map_err(SpawnError::SocketPair)?;
                    node.inboxes.push(inbox);
                    child_ends.push(theirs);
                }
            }
            Ok((node, child_ends))
        }
    }
}

/// The loader's entry arguments: `file PATH` or `module MODULE:CALLABLE`.
pub(super) fn entry_args(entry: &Entry) -> (&'static str, String) {
    match entry {
        Entry::File(path) => ("file", path.display().to_string()),
        Entry::Module { .. } => ("module", entry.to_text()),
    }
}
