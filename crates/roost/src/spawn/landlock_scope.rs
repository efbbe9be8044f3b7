//! A Landlock domain of each worker's own, scoped: what it holds cannot reach a
//! process outside it.
//!
//! Unix users keep tenants' files apart and stop one tenant signalling another's
//! processes, but not everything goes through them. Abstract Unix sockets (`@name`)
//! have no file and so no permissions: any process of the host can connect to one,
//! whoever listens (containerd's shim API was reached from containers so, CVE-2020-15257);
//! a tenant's app listening on one is reachable by every other tenant, and a host
//! service listening on one by every tenant. And two sites of one owner run as one
//! Unix user: a worker of one could signal or trace the other's workers.
//!
//! So, as root, each new worker (or template, with the workers it forks) enters a
//! Landlock domain of its own before it drops its privileges, with no rule on files or
//! ports but two scopes (Landlock ABI 6, Linux 6.12): it cannot connect or send to an
//! abstract socket made by a process outside its domain, nor signal one. Landlock adds
//! a third to every domain: it cannot ptrace (nor read the memory or the
//! `/proc/<pid>/environ` of) a process outside it. Its own children are inside
//! (multiprocessing's managers and pools work as before), and the node, outside, still
//! signals and watches it. Kernels without scopes keep what Unix users give.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::errno::Errno;

/// `LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL`.
const SCOPED: u64 = 0b11;
/// The first Landlock ABI with scopes.
const SCOPES_SINCE_ABI: i64 = 6;
/// `LANDLOCK_CREATE_RULESET_VERSION`: asks for the ABI instead of a ruleset.
const CREATE_RULESET_VERSION: u32 = 1;

/// `struct landlock_ruleset_attr` as of ABI 6.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// The ruleset every worker's domain is made from, made once when the node starts.
#[derive(Debug, Clone)]
pub struct LandlockScope {
    ruleset: Arc<OwnedFd>,
}

impl LandlockScope {
    /// The ruleset, or why this kernel cannot give one: no Landlock (not built, or not
    /// enabled at boot), or one older than its scopes.
    pub fn detect() -> Result<LandlockScope, String> {
        let abi = abi().map_err(|errno| format!("no Landlock in this kernel ({errno})"))?;
        if abi < SCOPES_SINCE_ABI {
            return Err(format!(
                "Landlock ABI {abi}; scopes need {SCOPES_SINCE_ABI} (Linux 6.12)"
            ));
        }
        let attr = RulesetAttr {
            handled_access_fs: 0,
            handled_access_net: 0,
            scoped: SCOPED,
        };
        // SAFETY: the kernel reads `size_of::<RulesetAttr>()` bytes from `attr`, which
        // outlives the call.
        let fd = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        let fd = Errno::result(fd)
            .map_err(|errno| format!("cannot create a Landlock ruleset ({errno})"))?;
        // SAFETY: a new descriptor (close-on-exec) the kernel gave this process alone.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(LandlockScope {
            ruleset: Arc::new(ruleset),
        })
    }

    /// What a zygote is told (its LANDLOCK argument, docs/protocol.md): each of its
    /// children makes a domain with these scopes, as `ChildScope::enter` does (its
    /// spares ahead of their orders, as it is the same for every site).
    pub fn zygote_argument(&self) -> String {
        SCOPED.to_string()
    }

    /// For a child between fork and exec; the parent keeps the ruleset open.
    pub fn for_child(&self) -> ChildScope {
        ChildScope(self.ruleset.as_raw_fd())
    }
}

/// The Landlock ABI the running kernel has.
fn abi() -> Result<i64, Errno> {
    // SAFETY: with the version flag, the kernel reads nothing.
    let abi = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    Errno::result(abi)
}

/// [`LandlockScope`] for a forked child: the ruleset's descriptor, inherited.
#[derive(Debug, Clone, Copy)]
pub struct ChildScope(RawFd);

impl ChildScope {
    /// In the child, still root (CAP_SYS_ADMIN spares it `no_new_privs`, which would
    /// break the setuid and setgid programs an app may run, such as sendmail): a
    /// domain of its own. One system call (async-signal-safe).
    pub fn enter(&self) -> nix::Result<()> {
        // SAFETY: landlock_restrict_self takes a descriptor and flags, no memory.
        let rc = unsafe { nix::libc::syscall(nix::libc::SYS_landlock_restrict_self, self.0, 0u32) };
        Errno::result(rc).map(drop)
    }
}
