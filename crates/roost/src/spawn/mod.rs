//! Starting worker processes: the only place in roost with `unsafe` code.
//!
//! The pool asks a [`Spawn`] implementation for a worker with N slots and gets back the
//! process and the node's ends of its slot sockets:
//! - [`ZygoteSpawner`] (the default) asks a warm, preloaded zygote per interpreter to
//!   fork the worker, passing the sockets with SCM_RIGHTS;
//! - [`PlainSpawner`] forks and execs the site's python (the fallback, and for
//!   interpreters older than 3.9).
//!
//! Both run the same checks first (`prepare`) and the same steps in the child (in
//! Rust in `child`, in Python in the loader's `become_worker`); [`cgroup`] places each
//! site's workers in its own cgroup.
//!
//! A site with `preload` on gets a [`SiteTemplate`]: a process started the same way in
//! the template role, which imports the app once and forks the site's workers itself.
//! Zygotes and templates are both fork servers (`forkserver`).

#![allow(unsafe_code)]

pub mod cgroup;
mod child;
pub mod favordynmods;
mod forkserver;
mod inherited;
mod kernel;
pub mod ksm;
mod landlock_scope;
mod plain;
mod prepare;
mod private_mounts;
mod process;
mod site_files;
mod template;
pub mod tmpdir;
mod zygote;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use roost_registry::{OwnerError, Site};

pub use cgroup::{Cgroups, SiteCgroup};
pub use child::WORKER_NOFILE;
pub use forkserver::ForkServerError;
pub use inherited::seal_inherited_fds;
pub use landlock_scope::LandlockScope;
pub use plain::PlainSpawner;
pub use prepare::SpawnConfig;
pub use private_mounts::PrivateTargets;
pub use process::{Ended, WorkerProcess};
pub use site_files::{FilesStalled, SiteFiles, LOOK_WITHIN};
pub use template::SiteTemplate;
pub use zygote::ZygoteSpawner;

use crate::logs::{ProcessLog, SiteLogs};
use crate::worker::Inbox;

/// What the new process is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A worker with this many slots (one stream socket and one inbox each).
    Worker { slots: u32 },
    /// A site's template: it imports the app, then forks the site's workers on orders
    /// that arrive over one SOCK_SEQPACKET control socket.
    Template,
}

impl Role {
    /// The loader's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Worker { .. } => "worker",
            Role::Template => "template",
        }
    }

    /// How many slots the loader is told of (a template's control socket counts as one).
    pub fn slots(self) -> u32 {
        match self {
            Role::Worker { slots } => slots,
            Role::Template => 1,
        }
    }
}

/// What a new worker needs that the site does not say.
pub struct SpawnRequest<'a> {
    pub site: &'a Arc<Site>,
    pub role: Role,
    /// The site's logs; a new process's stdout and stderr are its error log.
    pub logs: &'a Arc<SiteLogs>,
    pub cgroup: &'a Arc<SiteCgroup>,
    /// Every look at the site's files (its owner, code, interpreter) goes through it.
    pub files: &'a SiteFiles,
}

impl SpawnRequest<'_> {
    /// A pipe into the site's error log, for the new process's stdout and stderr, and
    /// that log.
    pub fn output(&self) -> Result<(OwnedFd, ProcessLog), SpawnError> {
        self.logs.output().map_err(SpawnError::Output)
    }
}

/// A started worker (or template): not yet ready (the loader still imports the app).
pub struct SpawnedWorker {
    pub process: WorkerProcess,
    /// The node's end of each slot, in slot order (non-blocking); for a template, of
    /// its control socket.
    pub sockets: Vec<OwnedFd>,
    /// Each slot's inbox, in slot order; none for a template or a worker of several
    /// slots ([`has_inbox`](crate::worker::has_inbox)).
    pub inboxes: Vec<Inbox>,
    /// The error log it prints into.
    pub log: ProcessLog,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the node runs as root and the site names no user; roost never runs sites as root")]
    NoUser,
    #[error("the site's owner is not acceptable")]
    Owner(#[source] OwnerError),
    #[error("the site's code is not safe to run")]
    UnsafeCode(#[source] OwnerError),
    #[error("cannot join the site's cgroup")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("cannot make the site's cgroup with its limits; a site whose limits cannot be set is not started")]
    MakeCgroup(#[source] cgroup::CgroupError),
    #[error("cannot make the pipe to the site's error log")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    FilesStalled(#[from] FilesStalled),
    #[error("cannot prepare the site's private temporary folder {path}")]
    TmpDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is below {target}, which each worker sees as its own (its TMPDIR): move it, or start the node with --shared-tmp")]
    HiddenByPrivateTmp { path: PathBuf, target: &'static str },
    #[error("cannot pass the site's environment to its worker")]
    Environment(#[source] std::io::Error),
    #[error("cannot create the slot sockets")]
    SocketPair(#[source] std::io::Error),
    #[error("cannot start {python}")]
    Exec {
        python: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the zygote for {python} is not available: {reason}")]
    Zygote {
        python: PathBuf,
        reason: ForkServerError,
    },
    #[error("the zygote could not fork the worker: {0}")]
    Fork(String),
    #[error("the site's template is not available: {0}")]
    Template(ForkServerError),
}

impl SpawnError {
    /// Whether the spawn failed because the process forking the worker was stopped from
    /// outside (a kill, or the zygote a template came from dying): not the site's fault.
    pub fn killed_from_outside(&self) -> bool {
        match self {
            SpawnError::Zygote { reason, .. } | SpawnError::Template(reason) => reason.killed(),
            _ => false,
        }
    }
}

pub type SpawnFuture<'a> =
    Pin<Box<dyn Future<Output = Result<SpawnedWorker, SpawnError>> + Send + 'a>>;

/// Starts workers. Implementations must make every worker die with the node.
pub trait Spawn: Send + Sync + 'static {
    fn spawn<'a>(&'a self, request: SpawnRequest<'a>) -> SpawnFuture<'a>;

    /// The registry changed and `sites` are all the sites now served: what none of them
    /// needs any more (a zygote for a runtime no site names) may go.
    fn retain(&self, _sites: &[&Site]) {}
}
