//! The registry of roost: what sites exist and how each is served.
//!
//! - [`Site`] is the validated model, built only through [`SiteSpec::validate`] (raw
//!   strings from the CLI, a file or the database → typed, checked values).
//! - [`Registry`] is an immutable snapshot of all sites; the node swaps a new one in on
//!   every change and computes a [`diff`] to tell the affected pools.
//! - [`SqliteStore`] keeps sites in one SQLite file with versioned migrations.
//! - [`parse_site_file`] reads a site file (TOML), the input of `roost apply`.
//!
//! This crate knows nothing of processes or HTTP; it must never panic on what it reads
//! from the database, which another program may have written.

mod host;
mod owner;
mod runtime;
mod site;
mod sitefile;
mod snapshot;
mod spec;
mod sqlite;
mod units;

pub use host::{normalize_request_host, HostError, HostPattern};
pub use owner::{
    check_code_files, open_to_others, others_have, readable_by_anyone, resolve, Identity,
    OwnerError, DEFAULT_MIN_UID,
};
pub use runtime::{site_packages, version_conflicts, Runtime};
pub use site::{Entry, PoolSettings, Site};
pub use sitefile::{parse_site_file, SiteFileError};
pub use snapshot::{diff, Change, Registry};
pub use spec::{FsChecks, SiteSpec, ValidationError};
pub use sqlite::{
    readable_by_others, Applied, LastRead, Loaded, SqliteStore, StoreError, TakenHost,
};
pub use units::{format_bytes, format_duration, parse_bytes, parse_duration};
