//! A worker process as the node sees it: its own child (plain spawn), or a child of a
//! zygote that the node watches through a pidfd.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

pub enum WorkerProcess {
    Child(tokio::process::Child),
    Forked(Forked),
}

/// A worker forked by a zygote: not our child, so no `wait`; its pidfd turns readable
/// when it exits, and the zygote (which reaps it) reports the status.
pub struct Forked {
    pub pid: u32,
    pub pidfd: AsyncFd<OwnedFd>,
    pub status: Option<oneshot::Receiver<i32>>,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        match self {
            WorkerProcess::Child(c) => c.id().unwrap_or_default(),
            WorkerProcess::Forked(f) => f.pid,
        }
    }

    /// Waits for the process to end; the status when it is known.
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        match self {
            WorkerProcess::Child(c) => c.wait().await.ok(),
            WorkerProcess::Forked(f) => {
                if let Ok(mut guard) = f.pidfd.readable().await {
                    guard.retain_ready();
                }
                // The zygote reaps at once; its report is only a moment behind. Awaited
                // in place: a wait given up meanwhile (a select's other branch won, as
                // when the pool stops a worker that was killed) loses no report.
                let report = tokio::time::timeout(Duration::from_secs(1), f.status.as_mut()?).await;
                f.status = None;
                match report {
                    Ok(Ok(raw)) => Some(ExitStatus::from_raw(raw)),
                    _ => None,
                }
            }
        }
    }

    /// SIGKILL to the worker's process group (it is a session leader), unless it is
    /// known to be gone already, so a recycled pid is never hit.
    pub fn kill_group(&self) {
        let pid = self.pid();
        if pid == 0 {
            return;
        }
        if let WorkerProcess::Forked(f) = self {
            if exited(&f.pidfd) {
                return;
            }
        }
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Registers a descriptor we own with the runtime, for readiness.
pub fn watch(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd stays open, and is the same descriptor, for as long as the
    // AsyncFd that owns it lives.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// A pidfd is readable once its process has exited.
fn exited(pidfd: &AsyncFd<OwnedFd>) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(pidfd.get_ref()),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}
