//! `roost site add|set|rm|list|show`: registry writes, validated before they happen.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use roost_registry::{
    format_bytes, format_duration, parse_bytes, parse_duration, FsChecks, Site, SiteSpec,
    SqliteStore,
};
use serde_json::json;

use super::absolute;

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Register a new site; it is served within a second by running nodes.
    Add {
        name: String,
        #[command(flatten)]
        flags: SiteFlags,
    },
    /// Change some settings of a site; its workers are recycled gracefully.
    Set {
        name: String,
        #[command(flatten)]
        flags: SiteFlags,
        /// Remove an environment variable; repeat for several.
        #[arg(long, value_name = "KEY")]
        unset_env: Vec<String>,
    },
    /// Remove a site: running nodes finish its requests in flight, then answer 404.
    Rm { name: String },
    /// List every site.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one site's settings.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// Site settings as flags; unset ones keep their default (add) or value (set).
#[derive(Debug, Default, Args)]
pub struct SiteFlags {
    /// Host name the site answers for: example.com, or *.example.com for all names
    /// below it. Repeat for aliases. With `set`, the list replaces the old one.
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// A WSGI file defining `application` (mod_wsgi style) or module:callable
    /// (gunicorn style, imported from --directory).
    #[arg(long)]
    entry: Option<String>,
    /// The site's python3 (a path or a name on PATH), or a virtualenv folder.
    /// Default: python3 on PATH.
    #[arg(long)]
    interpreter: Option<String>,
    /// Working directory, first on sys.path. Default: the entry file's folder, or the
    /// current folder for a module entry.
    #[arg(long)]
    directory: Option<PathBuf>,
    /// An environment variable for the workers; repeat for several.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The Unix user (name or uid) the site's workers run as; required as root.
    #[arg(long)]
    user: Option<String>,
    /// The group (name or gid) [default: the user's primary group].
    #[arg(long)]
    group: Option<String>,
    /// A runtime (see `roost runtime`) whose zygote forks the workers; the site's own
    /// virtualenv, if any, is layered above its packages.
    #[arg(long)]
    runtime: Option<String>,
    /// Most workers at once [default: 4].
    #[arg(long)]
    processes_max: Option<u32>,
    /// Workers kept running even when idle [default: 0].
    #[arg(long)]
    processes_min: Option<u32>,
    /// Slots (threads) per worker [default: 1].
    #[arg(long)]
    threads: Option<u32>,
    /// A worker idle this long exits [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Requests that may wait for a slot; beyond: 503 [default: 100].
    #[arg(long)]
    queue_max: Option<u32>,
    /// Longest wait for a slot; beyond: 503 [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    queue_timeout: Option<Duration>,
    /// Longest request; beyond: 504 and the worker is killed [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    request_timeout: Option<Duration>,
    /// Recycle a worker after this many requests; 0 is off [default: 0].
    #[arg(long)]
    max_requests: Option<u64>,
    /// Largest request body; beyond: 413 [default: 10MiB].
    #[arg(long, value_parser = parse_bytes)]
    body_max: Option<u64>,
    /// Memory cap of the whole site [default: 512MiB].
    #[arg(long, value_parser = parse_bytes)]
    memory_max: Option<u64>,
    /// Recycle a worker whose memory is above this after a request; 0 is off.
    #[arg(long, value_parser = parse_bytes)]
    memory_worker_soft: Option<u64>,
    /// Most processes of the site [default: 64].
    #[arg(long)]
    pids_max: Option<u32>,
    /// CPU share, 1 to 10000 [default: 100].
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// Import the app once in a per-site template (running as the site user) and fork
    /// the workers from it, sharing its memory (python >= 3.9) [default: false].
    #[arg(long, value_name = "true|false")]
    preload: Option<bool>,
}

impl SiteFlags {
    /// The flags as a spec, with paths made absolute from the current folder and
    /// names looked up on PATH.
    fn to_spec(&self, name: &str) -> anyhow::Result<SiteSpec> {
        let mut env = std::collections::BTreeMap::new();
        for pair in &self.env {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("--env {pair:?} is not KEY=VALUE"))?;
            if v.is_empty() {
                bail!("--env {k}= has an empty value; use --unset-env {k} to remove a variable");
            }
            env.insert(k.to_owned(), v.to_owned());
        }
        let mut spec = SiteSpec {
            name: name.to_owned(),
            hosts: self.hosts.clone(),
            entry: self.entry.clone(),
            interpreter: self.interpreter.clone(),
            directory: self.directory.as_ref().map(|d| d.display().to_string()),
            env,
            user: self.user.clone(),
            group: self.group.clone(),
            runtime: self.runtime.clone(),
            processes_max: self.processes_max,
            processes_min: self.processes_min,
            threads: self.threads,
            idle_timeout: self.idle_timeout,
            queue_max: self.queue_max,
            queue_timeout: self.queue_timeout,
            request_timeout: self.request_timeout,
            max_requests: self.max_requests,
            body_max: self.body_max,
            memory_max: self.memory_max,
            memory_worker_soft: self.memory_worker_soft,
            pids_max: self.pids_max,
            cpu_weight: self.cpu_weight,
            preload: self.preload,
        };
        resolve_paths(&mut spec, &super::current_dir()?)?;
        Ok(spec)
    }
}

/// Makes a spec's paths absolute from `base` (the current folder for `site add|set`,
/// the site file's folder for `apply`), without `.` components; an interpreter named
/// without a '/' is looked up on PATH, as a shell would.
pub(super) fn resolve_paths(spec: &mut SiteSpec, base: &Path) -> anyhow::Result<()> {
    let under_base = |p: &str| super::under(base, Path::new(p)).display().to_string();
    if let Some(entry) = spec.entry.as_mut() {
        if looks_like_path(entry) {
            *entry = under_base(entry);
        }
    }
    if let Some(dir) = spec.directory.as_mut() {
        *dir = under_base(dir);
    }
    if let Some(python) = spec.interpreter.as_mut() {
        *python = if python.contains('/') {
            under_base(python)
        } else {
            find_interpreter(python)
                .with_context(|| format!("site {:?}: interpreter", spec.name))?
        };
    }
    Ok(())
}

/// What a new site gets when it does not say: the default interpreter, and for a
/// module entry the folder `base` (the current one for `site add`, the site file's for
/// `apply`). As root a user is required.
pub(super) fn fill_defaults(spec: &mut SiteSpec, base: &Path) -> anyhow::Result<()> {
    if spec.interpreter.is_none() {
        spec.interpreter = Some(default_interpreter()?);
    }
    if spec.directory.is_none() && spec.entry.as_deref().is_some_and(|e| !looks_like_path(e)) {
        spec.directory = Some(base.display().to_string());
    }
    if spec.user.is_none() && super::is_root() {
        bail!(
            "site {:?}: user: required when adding sites as root (--user NAME, or user = in a site file); roost never runs sites as root",
            spec.name
        );
    }
    Ok(())
}

pub(super) fn looks_like_path(entry: &str) -> bool {
    entry.contains('/') || entry.ends_with(".py") || entry.ends_with(".wsgi")
}

/// python3 for a new site: as root the system's /usr/bin/python3 (site users must be
/// able to run it; root's PATH may point into /root), else python3 on PATH.
pub(super) fn default_interpreter() -> anyhow::Result<String> {
    let system = Path::new("/usr/bin/python3");
    if super::is_root() && system.exists() {
        return Ok(system.display().to_string());
    }
    find_interpreter("python3")
}

/// A name without '/' is looked up on PATH, as a shell would.
pub(super) fn find_interpreter(given: &str) -> anyhow::Result<String> {
    if given.contains('/') {
        return Ok(absolute(PathBuf::from(given))?.display().to_string());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(given))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .with_context(|| format!("interpreter {given:?} is not on PATH"))
}

pub fn run(registry: &Path, min_uid: u32, command: SiteCommand) -> anyhow::Result<ExitCode> {
    let mut store = SqliteStore::open(registry)?;
    match command {
        SiteCommand::Add { name, flags } => {
            let mut spec = flags.to_spec(&name)?;
            fill_defaults(&mut spec, &super::current_dir()?)?;
            let mut site = spec.validate_for(FsChecks::Full, min_uid)?;
            store.attach_runtime(&spec, &mut site)?;
            warn_about(&site);
            store.add(&site)?;
            println!("added site {} ({})", site.name, hosts_text(&site));
        }
        SiteCommand::Set {
            name,
            flags,
            unset_env,
        } => {
            let stored = store
                .get(&name)?
                .with_context(|| format!("no site named {name:?}"))?;
            let mut patch = flags.to_spec(&name)?;
            for key in unset_env {
                patch.env.insert(key, String::new());
            }
            let merged = stored.merged(patch);
            let mut site = merged.validate_for(FsChecks::Full, min_uid)?;
            store.attach_runtime(&merged, &mut site)?;
            warn_about(&site);
            store.replace(&site)?;
            println!(
                "changed site {}; running nodes recycle its workers",
                site.name
            );
        }
        SiteCommand::Rm { name } => {
            store.remove(&name)?;
            println!("removed site {name}; running nodes drain it");
        }
        SiteCommand::List { json } => {
            let loaded = store.load()?;
            if json {
                let sites: Vec<_> = loaded
                    .registry
                    .sites
                    .values()
                    .map(|s| site_json(s))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&sites)?);
            } else if loaded.registry.sites.is_empty() {
                println!("no sites in {}", store.path().display());
            } else {
                let width = loaded
                    .registry
                    .sites
                    .keys()
                    .map(String::len)
                    .max()
                    .unwrap_or(4)
                    .max(4);
                println!("{:width$}  {:40}  ENTRY", "NAME", "HOSTS");
                for site in loaded.registry.sites.values() {
                    println!(
                        "{:width$}  {:40}  {}",
                        site.name,
                        hosts_text(site),
                        site.entry.to_text()
                    );
                }
            }
            for rejected in loaded.rejected {
                eprintln!("warning: {rejected}");
            }
        }
        SiteCommand::Show { name, json } => {
            let spec = store
                .get(&name)?
                .with_context(|| format!("no site named {name:?}"))?;
            let mut site = spec.validate(FsChecks::Skip)?;
            store.attach_runtime(&spec, &mut site)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&site_json(&site))?);
            } else {
                print!("{}", site_text(&site));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Says what is accepted but worth changing: the site's virtualenv and its runtime
/// disagree on a preloaded package; a tenant's code any user of the host can read.
pub(super) fn warn_about(site: &Site) {
    if let (Some(runtime), Some(venv)) = (&site.runtime, site.venv()) {
        for conflict in roost_registry::version_conflicts(runtime, &venv) {
            eprintln!("warning: site {}: {conflict}", site.name);
        }
    }
    let code = site.code_file();
    if site.user.is_some() && roost_registry::readable_by_anyone(&code) {
        let folder = code.parent().unwrap_or(&code);
        eprintln!(
            "warning: site {}: any user of this host can read {} (and the settings and secrets beside it); its workers run as its user, so `chmod o-rwx {}`",
            site.name,
            code.display(),
            folder.display()
        );
    }
}

fn hosts_text(site: &Site) -> String {
    site.hosts
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn site_json(site: &Site) -> serde_json::Value {
    let p = &site.pool;
    json!({
        "name": site.name,
        "hosts": site.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "entry": site.entry.to_text(),
        "interpreter": site.interpreter,
        "python": site.python(),
        "directory": site.directory,
        "env": site.env,
        "user": site.user,
        "group": site.group,
        "runtime": site.runtime.as_ref().map(|r| r.name.clone()),
        "processes_max": p.processes_max,
        "processes_min": p.processes_min,
        "threads": p.threads,
        "idle_timeout_ms": p.idle_timeout.as_millis() as u64,
        "queue_max": p.queue_max,
        "queue_timeout_ms": p.queue_timeout.as_millis() as u64,
        "request_timeout_ms": p.request_timeout.as_millis() as u64,
        "max_requests": p.max_requests,
        "body_max": p.body_max,
        "memory_max": p.memory_max,
        "memory_worker_soft": p.memory_worker_soft,
        "pids_max": p.pids_max,
        "cpu_weight": p.cpu_weight,
        "preload": p.preload,
    })
}

fn site_text(site: &Site) -> String {
    let p = &site.pool;
    let env = if site.env.is_empty() {
        "-".to_owned()
    } else {
        site.env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rows = [
        ("name", site.name.clone()),
        ("hosts", hosts_text(site)),
        ("entry", site.entry.to_text()),
        ("interpreter", site.interpreter.display().to_string()),
        ("directory", site.directory.display().to_string()),
        ("env", env),
        (
            "user",
            site.user
                .clone()
                .unwrap_or_else(|| "- (the node's user)".into()),
        ),
        (
            "group",
            site.group
                .clone()
                .unwrap_or_else(|| "- (the user's primary group)".into()),
        ),
        (
            "runtime",
            site.runtime
                .as_ref()
                .map_or_else(|| "- (its own interpreter)".into(), |r| r.name.clone()),
        ),
        ("processes.max", p.processes_max.to_string()),
        ("processes.min", p.processes_min.to_string()),
        ("threads", p.threads.to_string()),
        ("idle_timeout", format_duration(p.idle_timeout)),
        ("queue.max", p.queue_max.to_string()),
        ("queue.timeout", format_duration(p.queue_timeout)),
        ("request_timeout", format_duration(p.request_timeout)),
        (
            "max_requests",
            if p.max_requests == 0 {
                "off".into()
            } else {
                p.max_requests.to_string()
            },
        ),
        ("body.max", format_bytes(p.body_max)),
        ("memory.max", format_bytes(p.memory_max)),
        (
            "memory.worker_soft",
            p.memory_worker_soft.map_or("off".into(), format_bytes),
        ),
        ("pids.max", p.pids_max.to_string()),
        ("cpu.weight", p.cpu_weight.to_string()),
        (
            "preload",
            if p.preload {
                "on (per-site template)"
            } else {
                "off"
            }
            .into(),
        ),
    ];
    rows.iter().map(|(k, v)| format!("{k:20} {v}\n")).collect()
}
