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
/// when it exits, and the zygote (which reaps it) reports how it ended.
pub struct Forked {
    pub pid: u32,
    pub pidfd: AsyncFd<OwnedFd>,
    pub status: Option<oneshot::Receiver<Ended>>,
}

/// The longest wait for a zygote's report of how its child ended, once the child is
/// gone. A zygote that never reports (stopped, stuck) costs each of its children's
/// deaths this long before the pool hears of them.
const EXIT_REPORT_WITHIN: Duration = Duration::from_secs(5);

impl Forked {
    async fn gone(&self) {
        if let Ok(mut guard) = self.pidfd.readable().await {
            guard.retain_ready();
        }
    }
}

/// How a process the node watches ended, as far as the node can know.
#[derive(Clone, Copy, Debug)]
pub enum Ended {
    Status(ExitStatus),
    /// The fork server (`"zygote"` or `"template"`) that forked it died before it said
    /// how this process ended: the process died with it (its parent-death signal).
    WithItsForkServer(&'static str),
    /// Nothing said how.
    Unknown,
}

impl Ended {
    pub fn success(self) -> bool {
        matches!(self, Ended::Status(s) if s.success())
    }

    /// Whether it was stopped from outside, by a signal a process sends to end another
    /// (SIGKILL, SIGTERM) or with the fork server it came from, rather than ending by
    /// its own doing (an exit, an exception, a crash).
    pub fn killed(self) -> bool {
        match self {
            Ended::Status(s) => (s.signal())
                .is_some_and(|s| s == Signal::SIGKILL as i32 || s == Signal::SIGTERM as i32),
            Ended::WithItsForkServer(_) => true,
            Ended::Unknown => false,
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Status(s) => write!(f, "{s}"),
            Ended::WithItsForkServer(server) => {
                write!(f, "killed with the {server} that forked it")
            }
            Ended::Unknown => f.write_str("an unknown status"),
        }
    }
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        match self {
            WorkerProcess::Child(c) => c.id().unwrap_or_default(),
            WorkerProcess::Forked(f) => f.pid,
        }
    }

    /// Waits for the process to end; how, as far as it is known.
    pub async fn wait(&mut self) -> Ended {
        match self {
            WorkerProcess::Child(c) => c.wait().await.map_or(Ended::Unknown, Ended::Status),
            WorkerProcess::Forked(f) => {
                f.gone().await;
                // The zygote reaps at once, so its report is usually a moment behind;
                // on a host short of CPU, a second was seen not to be enough, and how
                // a start ended decides whether it is tried again at once (killed) or
                // after a backoff (the app failed). Awaited in place: a wait given up
                // meanwhile (a select's other branch won, as when the pool stops a
                // worker that was killed) loses no report.
                let Some(status) = f.status.as_mut() else {
                    return Ended::Unknown;
                };
                let report = tokio::time::timeout(EXIT_REPORT_WITHIN, status).await;
                f.status = None;
                match report {
                    Ok(Ok(ended)) => ended,
                    _ => Ended::Unknown,
                }
            }
        }
    }

    /// Waits for the process to end, not for how it ended (a zygote's child: until its
    /// pidfd says so, before the zygote's report).
    pub async fn gone(&mut self) {
        match self {
            WorkerProcess::Child(c) => drop(c.wait().await),
            WorkerProcess::Forked(f) => f.gone().await,
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
