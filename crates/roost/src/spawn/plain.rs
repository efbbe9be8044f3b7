//! Plain spawn: fork and exec the site's python running the loader.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::signal::Signal;
use nix::unistd::{dup2, getppid, Pid};
use roost_registry::Entry;

use super::{Spawn, SpawnError, SpawnRequest, SpawnedWorker};

/// The first descriptor of slot sockets in the worker; the loader expects 3, 4, …
const FIRST_SLOT_FD: RawFd = 3;

/// Starts the loader as `python loader.py worker …` with a clean environment.
pub struct PlainSpawner {
    /// The loader, written by the node at start-up where every site user can read it.
    loader: PathBuf,
    /// Variables every worker gets before the site's own (HOME, USER, PATH, LANG).
    base_env: Vec<(String, String)>,
}

impl PlainSpawner {
    pub fn new(loader: PathBuf, base_env: Vec<(String, String)>) -> PlainSpawner {
        PlainSpawner { loader, base_env }
    }
}

impl Spawn for PlainSpawner {
    fn spawn(&self, request: SpawnRequest<'_>) -> Result<SpawnedWorker, SpawnError> {
        let site = request.site;
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
        cmd.arg(&self.loader)
            .arg("worker")
            .arg(request.slots.to_string())
            .arg(kind)
            .arg(target)
            .arg(&site.directory)
            .env_clear()
            .envs(self.base_env.iter().map(|(k, v)| (k, v)))
            .envs(&site.env)
            .stdin(Stdio::null())
            .stdout(
                request
                    .error_log
                    .try_clone()
                    .map_err(|source| SpawnError::Exec {
                        python: site.python.clone(),
                        source,
                    })?,
            )
            .stderr(request.error_log)
            .process_group(0);
        if let Ok(venv) = site.interpreter.canonicalize() {
            if venv.is_dir() {
                cmd.env("VIRTUAL_ENV", &venv);
            }
        }
        let fds: Vec<RawFd> = worker_ends.iter().map(|s| s.as_raw_fd()).collect();
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, getppid, fcntl, dup2) on descriptors
        // the parent keeps open until `spawn` returns; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || place_slots_and_tie_to_parent(&fds, parent));
        }
        // PR_SET_PDEATHSIG fires when the forking *thread* exits: the pool spawns from
        // runtime worker threads, which live as long as the node, never from
        // spawn_blocking threads, which retire when idle.
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SpawnError::Exec {
                python: site.python.clone(),
                source,
            })?;
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

/// In the child: die with the node, and put slot sockets on fds 3, 4, … in order.
fn place_slots_and_tie_to_parent(fds: &[RawFd], parent: Pid) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if getppid() != parent {
        // The node died between fork and prctl: nobody would reap or stop us.
        return Err(std::io::Error::other("the node exited during spawn"));
    }
    // Move every socket above the target range first, so that placing slot i on
    // fd 3+i never overwrites a socket still to be placed.
    let above = FIRST_SLOT_FD + fds.len() as RawFd;
    let mut high = [0 as RawFd; 256];
    for (i, fd) in fds.iter().enumerate() {
        high[i] = fcntl(*fd, FcntlArg::F_DUPFD_CLOEXEC(above))?;
    }
    for (i, fd) in high[..fds.len()].iter().enumerate() {
        // dup2 clears close-on-exec on the new descriptor: exactly these survive exec.
        dup2(*fd, FIRST_SLOT_FD + i as RawFd)?;
    }
    Ok(())
}
