//! What a new worker does between fork and exec, in the order the design requires:
//! join the site's cgroup, set rlimits, setsid, tie its life to the node, drop
//! privileges (irreversibly, checked), chdir, and put its slot sockets on fds 3, 4, …
//!
//! Everything here runs in the forked child of a multi-threaded process: only
//! async-signal-safe system calls, no allocation, no locks. A failing step writes its
//! name to stderr (the site's error log) and fails the spawn with its errno.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;
use nix::unistd::{dup2, getppid, Gid, Pid, Uid};

use super::landlock_scope::ChildScope;
use super::private_mounts::ChildMounts;

/// The first descriptor of slot sockets in the worker; the loader expects 3, 4, …
pub const FIRST_SLOT_FD: RawFd = 3;
/// Open files a worker may have.
pub const WORKER_NOFILE: u64 = 4096;

/// Everything the child needs, prepared (and allocated) by the parent before fork.
pub struct ChildPlan {
    pub cgroup_procs: Vec<OwnedFd>,
    pub slots: Vec<RawFd>,
    pub parent: Pid,
    /// `None` when the node is not root: the worker keeps the node's user.
    pub drop_to: Option<(Uid, Gid)>,
    pub workdir: CString,
    /// Run under SCHED_BATCH ([`super::SpawnConfig::batch_workers`]).
    pub batch: bool,
    /// Mark its memory mergeable ([`super::SpawnConfig::ksm`]); forks inherit it.
    pub ksm: bool,
    /// Its own /tmp, /var/tmp, /dev/shm and /proc
    /// ([`super::SpawnConfig::private_mounts`]).
    pub private: Option<ChildMounts>,
    /// Its own Landlock domain ([`super::SpawnConfig::landlock`]).
    pub landlock: Option<ChildScope>,
}

impl ChildPlan {
    /// Runs in the child. Each step names itself on failure.
    pub fn run(&self) -> std::io::Result<()> {
        // Before the worker's descriptor limit: until exec the child holds every
        // descriptor of the node (close-on-exec), and a node with more than
        // WORKER_NOFILE open (sites' log files, clients) leaves no free number below it.
        let lifted = step(b"copy the slot sockets out of the way\n", || {
            Lifted::copy(&self.slots)
        })?;
        step(b"join the site's cgroup\n", || {
            for fd in &self.cgroup_procs {
                nix::unistd::write(fd.as_fd(), b"0")?;
            }
            Ok(())
        })?;
        step(b"set rlimits\n", || {
            setrlimit(Resource::RLIMIT_NOFILE, WORKER_NOFILE, WORKER_NOFILE)?;
            setrlimit(Resource::RLIMIT_CORE, 0, 0)
        })?;
        if self.batch {
            step(b"set the scheduling policy\n", set_sched_batch)?;
        }
        if self.ksm {
            step(
                b"mark its memory mergeable (KSM)\n",
                super::ksm::mark_mergeable,
            )?;
        }
        if let Some(mounts) = &self.private {
            step(b"make /tmp, /var/tmp, /dev/shm and /proc its own\n", || {
                mounts.enter()
            })?;
        }
        if let Some(scope) = &self.landlock {
            step(
                b"enter a Landlock domain of its own (abstract sockets, signals, traces)\n",
                || scope.enter(),
            )?;
        }
        step(b"setsid\n", || nix::unistd::setsid().map(drop))?;
        step(b"set the parent-death signal\n", || self.tie_to_parent())?;
        if let Some((uid, gid)) = self.drop_to {
            step(b"drop privileges\n", || drop_privileges(uid, gid))?;
            // Changing credentials clears the parent-death signal: set it again.
            step(b"set the parent-death signal after the drop\n", || {
                self.tie_to_parent()
            })?;
        }
        step(b"chdir to the site's directory\n", || {
            nix::unistd::chdir(self.workdir.as_c_str())
        })?;
        step(b"place the slot sockets\n", || lifted.place())?;
        Ok(())
    }

    fn tie_to_parent(&self) -> nix::Result<()> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        if getppid() != self.parent {
            // The node died before the signal was armed: nobody would stop us.
            return Err(nix::Error::ESRCH);
        }
        Ok(())
    }
}

fn step<T>(name: &'static [u8], f: impl FnOnce() -> nix::Result<T>) -> std::io::Result<T> {
    f().map_err(|errno| {
        // SAFETY: fd 2 is the worker's stderr, set up by std before pre_exec runs.
        let stderr = unsafe { BorrowedFd::borrow_raw(2) };
        let _ = nix::unistd::write(stderr, b"roost: worker setup failed: cannot ");
        let _ = nix::unistd::write(stderr, name);
        std::io::Error::from(errno)
    })
}

/// SCHED_BATCH for the calling process: the scheduler treats it as CPU-bound, so its
/// wake-ups do not preempt the running task (the node, usually).
fn set_sched_batch() -> nix::Result<()> {
    let param = nix::libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler is async-signal-safe; `param` outlives the call.
    let rc = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_BATCH, &param) };
    nix::errno::Errno::result(rc).map(drop)
}

/// setgroups([]), setgid, setuid; then proves it cannot be undone.
fn drop_privileges(uid: Uid, gid: Gid) -> nix::Result<()> {
    nix::unistd::setgroups(&[])?;
    nix::unistd::setgid(gid)?;
    nix::unistd::setuid(uid)?;
    let dropped = nix::unistd::getuid() == uid
        && nix::unistd::geteuid() == uid
        && nix::unistd::getgid() == gid
        && nix::unistd::getegid() == gid;
    if !dropped || nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(nix::Error::EPERM);
    }
    Ok(())
}

/// The slot sockets, copied above the descriptors they go to, so that placing slot i
/// on fd 3+i never overwrites a socket still to be placed. On the stack: the child may
/// not allocate.
struct Lifted {
    fds: [RawFd; 512],
    len: usize,
}

impl Lifted {
    fn copy(slots: &[RawFd]) -> nix::Result<Lifted> {
        let mut lifted = Lifted {
            fds: [0; 512],
            len: slots.len(),
        };
        let above = FIRST_SLOT_FD + slots.len() as RawFd;
        let copies = lifted
            .fds
            .get_mut(..slots.len())
            .ok_or(nix::Error::EINVAL)?;
        for (copy, fd) in copies.iter_mut().zip(slots) {
            *copy = fcntl(*fd, FcntlArg::F_DUPFD_CLOEXEC(above))?;
        }
        Ok(lifted)
    }

    fn place(&self) -> nix::Result<()> {
        for (i, fd) in self.fds[..self.len].iter().enumerate() {
            // dup2 clears close-on-exec on the new descriptor: exactly these survive
            // exec.
            dup2(*fd, FIRST_SLOT_FD + i as RawFd)?;
        }
        Ok(())
    }
}

/// Raw descriptors of sockets the parent keeps open until the spawn returns.
pub fn raw_fds<T: AsRawFd>(items: &[T]) -> Vec<RawFd> {
    items.iter().map(AsRawFd::as_raw_fd).collect()
}
