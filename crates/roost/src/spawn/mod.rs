//! Starting worker processes: the only place in roost with `unsafe` code.
//!
//! The pool asks a [`Spawn`] implementation for a worker with N slots and gets back the
//! process and the node's ends of its slot sockets. Today [`PlainSpawner`] starts the
//! loader with the site's interpreter; the zygote will implement the same trait.
//! [`cgroup`] places each site's workers in its own cgroup; [`child`] is what runs
//! between fork and exec.

#![allow(unsafe_code)]

pub mod cgroup;
mod child;
mod plain;

use std::path::PathBuf;

use roost_registry::{OwnerError, Site};
use tokio::net::UnixStream;

pub use cgroup::{Cgroups, SiteCgroup};
pub use plain::{PlainSpawner, SpawnConfig};

use crate::logs::SiteLogs;

/// What a new worker needs that the site does not say.
pub struct SpawnRequest<'a> {
    pub site: &'a Site,
    pub slots: u32,
    /// The site's error log, opened for append: the worker's stdout and stderr.
    pub error_log: std::fs::File,
    pub logs: &'a SiteLogs,
    pub cgroup: &'a SiteCgroup,
}

/// A started worker: not yet ready (the loader still imports the app).
pub struct SpawnedWorker {
    pub child: tokio::process::Child,
    pub pid: u32,
    /// The node's end of each slot, in slot order.
    pub slots: Vec<UnixStream>,
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
    #[error("cannot prepare the site's private temporary folder {path}")]
    TmpDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the slot sockets")]
    SocketPair(#[source] std::io::Error),
    #[error("cannot start {python}")]
    Exec {
        python: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Starts workers. Implementations must make every child die with the node.
pub trait Spawn: Send + Sync + 'static {
    fn spawn(&self, request: SpawnRequest<'_>) -> Result<SpawnedWorker, SpawnError>;
}
