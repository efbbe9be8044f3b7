//! The validated site model. Every value here has passed [`crate::SiteSpec::validate`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::HostPattern;

/// One application of one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Unique name: lower-case letters, digits, '-', '_' and '.'; also the log folder name.
    pub name: String,
    /// Host names this site answers for; no two sites share one.
    pub hosts: Vec<HostPattern>,
    pub entry: Entry,
    /// What the operator named: a python3 path, or a virtualenv folder (which of the
    /// two is known only by looking: [`Site::python`]).
    pub interpreter: PathBuf,
    /// The worker's working directory; also put first on `sys.path`.
    pub directory: PathBuf,
    /// Extra environment variables for the site's workers.
    pub env: BTreeMap<String, String>,
    /// The Unix user (name or uid) the workers run as; required when the node is root.
    pub user: Option<String>,
    /// The group (name or gid); default: the user's primary group.
    pub group: Option<String>,
    /// The runtime whose zygote forks this site's workers, resolved from its name by
    /// the store; `None`: the site's own interpreter with the standard preloads.
    pub runtime: Option<std::sync::Arc<crate::Runtime>>,
    pub pool: PoolSettings,
}

/// How the loader finds the WSGI callable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A file that defines `application`, as mod_wsgi's WSGIScriptAlias.
    File(PathBuf),
    /// `package.module:callable`, as gunicorn, imported from the site's directory.
    Module { module: String, callable: String },
}

impl Entry {
    /// The stored text form: an absolute path, or `module:callable`.
    pub fn to_text(&self) -> String {
        match self {
            Entry::File(p) => p.display().to_string(),
            Entry::Module { module, callable } => format!("{module}:{callable}"),
        }
    }

    /// The file whose modification reloads the site (mod_wsgi style), if known.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Entry::File(p) => Some(p),
            Entry::Module { .. } => None,
        }
    }
}

/// The per-site pool settings of the design brief; all live-configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Most workers at once.
    pub processes_max: u32,
    /// Workers kept warm even when idle.
    pub processes_min: u32,
    /// Slots (threads) per worker.
    pub threads: u32,
    /// A worker idle this long exits.
    pub idle_timeout: Duration,
    /// Requests waiting for a slot; beyond: 503.
    pub queue_max: u32,
    /// Longest wait for a slot; beyond: 503.
    pub queue_timeout: Duration,
    /// Longest request; beyond: 504 and the worker is killed.
    pub request_timeout: Duration,
    /// Recycle a worker after this many requests; 0 is off.
    pub max_requests: u64,
    /// Largest request body; beyond: 413.
    pub body_max: u64,
    /// Hard memory cap for the whole site (enforced with cgroups by the tenant work).
    pub memory_max: u64,
    /// A worker above this RSS is recycled after its request; `None` is off.
    pub memory_worker_soft: Option<u64>,
    /// Most processes of the site (cgroup pids.max).
    pub pids_max: u32,
    /// CPU share (cgroup cpu.weight, 1 to 10000).
    pub cpu_weight: u32,
    /// Import the app once in a per-site template and fork the workers from it.
    pub preload: bool,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            processes_max: 4,
            processes_min: 0,
            threads: 1,
            idle_timeout: Duration::from_secs(60),
            queue_max: 100,
            queue_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_requests: 0,
            body_max: 10 << 20,
            memory_max: 512 << 20,
            memory_worker_soft: None,
            pids_max: 64,
            cpu_weight: 100,
            preload: false,
        }
    }
}

impl Site {
    /// The python3 executable: the interpreter named, or a virtualenv's `bin/python`.
    /// Looks at the file system, as [`Site::code_file`] does: the node asks only
    /// from one of the site's looks, never when it loads the registry (a venv on a
    /// file system that stopped answering would hold up every site's change).
    pub fn python(&self) -> PathBuf {
        if self.interpreter.is_dir() {
            self.interpreter.join("bin").join("python")
        } else {
            self.interpreter.clone()
        }
    }

    /// The virtualenv the interpreter belongs to: the folder named, or the one whose
    /// `bin/` holds the python named (a `pyvenv.cfg` beside that `bin/`, as Python
    /// itself finds it). Looks at files, as [`Site::python`] does.
    pub fn venv(&self) -> Option<PathBuf> {
        if self.interpreter.is_dir() {
            return Some(self.interpreter.clone());
        }
        let root = self.interpreter.parent()?.parent()?;
        root.join("pyvenv.cfg")
            .is_file()
            .then(|| root.to_path_buf())
    }

    /// The file that holds the app's code: the WSGI file, or the module's file.
    pub fn code_file(&self) -> PathBuf {
        match &self.entry {
            Entry::File(p) => p.clone(),
            Entry::Module { module, .. } => {
                let rel: PathBuf = module.split('.').collect();
                let file = self.directory.join(&rel).with_extension("py");
                if file.exists() {
                    file
                } else {
                    self.directory.join(rel).join("__init__.py")
                }
            }
        }
    }

    /// What the suEXEC checks look at: the code file and its folder.
    pub fn code_paths(&self) -> Vec<PathBuf> {
        let file = self.code_file();
        let folder = file.parent().map(Path::to_path_buf).unwrap_or_default();
        vec![file, folder]
    }
}
