//! `SiteSpec`: a site as written by someone (CLI flags, a file, a database row), not yet
//! trusted. [`SiteSpec::validate`] is the only way to a [`Site`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    check_code_files, resolve, Entry, HostPattern, OwnerError, PoolSettings, Site, DEFAULT_MIN_UID,
};

/// A site description whose every field may be missing; unset fields take defaults.
///
/// `site set` merges a partial spec over the stored one with [`SiteSpec::merged`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    pub entry: Option<String>,
    pub interpreter: Option<String>,
    pub directory: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// A runtime's name.
    pub runtime: Option<String>,
    pub processes_max: Option<u32>,
    pub processes_min: Option<u32>,
    pub threads: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub queue_max: Option<u32>,
    pub queue_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub max_requests: Option<u64>,
    pub body_max: Option<u64>,
    pub memory_max: Option<u64>,
    /// `Some(0)` turns the soft limit off.
    pub memory_worker_soft: Option<u64>,
    pub pids_max: Option<u32>,
    pub cpu_weight: Option<u32>,
    /// Fork workers from a per-site template that imported the app once.
    pub preload: Option<bool>,
}

/// How much of the file system validation may look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsChecks {
    /// On every write: the entry file, directory and interpreter must exist now.
    Full,
    /// When loading the registry: files may have changed since they were written; a
    /// missing one is reported when a worker starts, not by refusing the whole registry.
    Skip,
}

/// A field of a site that cannot be accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("site {site:?}: {field}: {problem}")]
pub struct ValidationError {
    pub site: String,
    pub field: &'static str,
    pub problem: String,
}

impl SiteSpec {
    /// The spec that [`validate`](Self::validate) turns back into `site`.
    pub fn from_site(site: &Site) -> SiteSpec {
        let p = &site.pool;
        SiteSpec {
            name: site.name.clone(),
            hosts: site.hosts.iter().map(|h| h.to_string()).collect(),
            entry: Some(site.entry.to_text()),
            interpreter: Some(site.interpreter.display().to_string()),
            directory: Some(site.directory.display().to_string()),
            env: site.env.clone(),
            user: site.user.clone(),
            group: site.group.clone(),
            runtime: site.runtime.as_ref().map(|r| r.name.clone()),
            processes_max: Some(p.processes_max),
            processes_min: Some(p.processes_min),
            threads: Some(p.threads),
            idle_timeout: Some(p.idle_timeout),
            queue_max: Some(p.queue_max),
            queue_timeout: Some(p.queue_timeout),
            request_timeout: Some(p.request_timeout),
            max_requests: Some(p.max_requests),
            body_max: Some(p.body_max),
            memory_max: Some(p.memory_max),
            memory_worker_soft: Some(p.memory_worker_soft.unwrap_or(0)),
            pids_max: Some(p.pids_max),
            cpu_weight: Some(p.cpu_weight),
            preload: Some(p.preload),
        }
    }

    /// `self` with every field that `patch` sets replaced; `patch.env` entries are added
    /// (an empty value removes the variable), and non-empty `patch.hosts` replace all.
    pub fn merged(mut self, patch: SiteSpec) -> SiteSpec {
        macro_rules! take {
            ($($field:ident),*) => { $( if patch.$field.is_some() { self.$field = patch.$field; } )* };
        }
        take!(
            entry,
            interpreter,
            directory,
            user,
            group,
            runtime,
            processes_max,
            processes_min,
            threads,
            idle_timeout,
            queue_max,
            queue_timeout,
            request_timeout,
            max_requests,
            body_max,
            memory_max,
            memory_worker_soft,
            pids_max,
            cpu_weight,
            preload
        );
        if !patch.hosts.is_empty() {
            self.hosts = patch.hosts;
        }
        for (k, v) in patch.env {
            if v.is_empty() {
                self.env.remove(&k);
            } else {
                self.env.insert(k, v);
            }
        }
        self
    }

    /// Checks every field and builds the typed [`Site`], with the default `min_uid`.
    pub fn validate(&self, fs: FsChecks) -> Result<Site, ValidationError> {
        self.validate_for(fs, DEFAULT_MIN_UID)
    }

    /// As [`validate`](Self::validate), with the node's lowest allowed uid.
    pub fn validate_for(&self, fs: FsChecks, min_uid: u32) -> Result<Site, ValidationError> {
        let err = |field: &'static str, problem: String| ValidationError {
            site: self.name.clone(),
            field,
            problem,
        };
        check_name(&self.name).map_err(|p| err("name", p))?;

        if self.hosts.is_empty() {
            return Err(err("hosts", "a site needs at least one host name".into()));
        }
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for text in &self.hosts {
            let host = HostPattern::parse(text).map_err(|e| err("hosts", e.to_string()))?;
            if hosts.contains(&host) {
                return Err(err("hosts", format!("{host} is listed twice")));
            }
            hosts.push(host);
        }

        let entry_text = self.entry.as_deref().ok_or_else(|| {
            err(
                "entry",
                "missing: give a WSGI file or module:callable".into(),
            )
        })?;
        let entry = parse_entry(entry_text).map_err(|p| err("entry", p))?;

        let directory = match (&self.directory, &entry) {
            (Some(d), _) => PathBuf::from(d),
            (None, Entry::File(f)) => f.parent().map(Path::to_path_buf).unwrap_or_default(),
            (None, Entry::Module { .. }) => {
                return Err(err(
                    "directory",
                    "required with a module:callable entry".into(),
                ))
            }
        };
        if !directory.is_absolute() {
            return Err(err(
                "directory",
                format!("{} is not an absolute path", directory.display()),
            ));
        }

        let interpreter = PathBuf::from(self.interpreter.as_deref().unwrap_or("/usr/bin/python3"));
        if !interpreter.is_absolute() {
            return Err(err(
                "interpreter",
                format!("{} is not an absolute path", interpreter.display()),
            ));
        }
        let mut env = BTreeMap::new();
        for (k, v) in &self.env {
            check_env(k, v).map_err(|p| err("env", p))?;
            env.insert(k.clone(), v.clone());
        }

        let pool = self.pool_settings().map_err(|(f, p)| err(f, p))?;
        for (field, value) in [("user", &self.user), ("group", &self.group)] {
            if let Some(v) = value {
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return Err(err(
                        field,
                        format!("{v:?} is not a user or group name or number"),
                    ));
                }
            }
        }
        if let Some(runtime) = &self.runtime {
            check_name(runtime).map_err(|p| err("runtime", p))?;
        }
        if self.group.is_some() && self.user.is_none() {
            return Err(err("group", "a group needs a user".into()));
        }

        let site = Site {
            name: self.name.clone(),
            hosts,
            entry,
            interpreter,
            directory,
            env,
            user: self.user.clone(),
            group: self.group.clone(),
            runtime: None,
            pool,
        };
        if fs == FsChecks::Full {
            check_files(
                &site.entry,
                &site.directory,
                &site.interpreter,
                &site.python(),
            )
            .map_err(|(f, p)| err(f, p))?;
            let uid = match &site.user {
                Some(user) => {
                    resolve(user, site.group.as_deref(), min_uid)
                        .map_err(|e| {
                            err(
                                if matches!(e, OwnerError::NoSuchGroup(_)) {
                                    "group"
                                } else {
                                    "user"
                                },
                                e.to_string(),
                            )
                        })?
                        .uid
                }
                None => nix::unistd::geteuid().as_raw(),
            };
            let paths = site.code_paths();
            let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            check_code_files(&paths, uid).map_err(|e| err("entry", e.to_string()))?;
        }
        Ok(site)
    }

    fn pool_settings(&self) -> Result<PoolSettings, (&'static str, String)> {
        let d = PoolSettings::default();
        let p = PoolSettings {
            processes_max: self.processes_max.unwrap_or(d.processes_max),
            processes_min: self.processes_min.unwrap_or(d.processes_min),
            threads: self.threads.unwrap_or(d.threads),
            idle_timeout: self.idle_timeout.unwrap_or(d.idle_timeout),
            queue_max: self.queue_max.unwrap_or(d.queue_max),
            queue_timeout: self.queue_timeout.unwrap_or(d.queue_timeout),
            request_timeout: self.request_timeout.unwrap_or(d.request_timeout),
            max_requests: self.max_requests.unwrap_or(d.max_requests),
            body_max: self.body_max.unwrap_or(d.body_max),
            memory_max: self.memory_max.unwrap_or(d.memory_max),
            memory_worker_soft: match self.memory_worker_soft {
                Some(0) => None,
                Some(n) => Some(n),
                None => d.memory_worker_soft,
            },
            pids_max: self.pids_max.unwrap_or(d.pids_max),
            cpu_weight: self.cpu_weight.unwrap_or(d.cpu_weight),
            preload: self.preload.unwrap_or(d.preload),
        };
        let range = |field, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err((field, format!("{v} is out of range {lo} to {hi}")))
            }
        };
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        range("processes.max", p.processes_max.into(), 1, 4096)?;
        range(
            "processes.min",
            p.processes_min.into(),
            0,
            p.processes_max.into(),
        )
        .map_err(|(f, m)| (f, format!("{m} (it may not exceed processes.max)")))?;
        range("threads", p.threads.into(), 1, 256)?;
        range("idle_timeout (ms)", ms(p.idle_timeout), 100, 7 * 86_400_000)?;
        range("queue.max", p.queue_max.into(), 0, 1_000_000)?;
        range("queue.timeout (ms)", ms(p.queue_timeout), 1, 3_600_000)?;
        range(
            "request_timeout (ms)",
            ms(p.request_timeout),
            100,
            86_400_000,
        )?;
        range("body.max (bytes)", p.body_max, 0, 1 << 50)?;
        range("memory.max (bytes)", p.memory_max, 16 << 20, 1 << 50)?;
        if let Some(soft) = p.memory_worker_soft {
            range("memory.worker_soft (bytes)", soft, 1 << 20, p.memory_max)?;
        }
        range("pids.max", p.pids_max.into(), 1, 1 << 22)?;
        range("cpu.weight", p.cpu_weight.into(), 1, 10_000)?;
        Ok(p)
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a site name: use 1 to 63 lower-case letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

fn parse_entry(text: &str) -> Result<Entry, String> {
    let text = text.trim();
    if text.contains('/') || text.ends_with(".py") || text.ends_with(".wsgi") {
        let path = PathBuf::from(text);
        if !path.is_absolute() {
            return Err(format!("{text} is not an absolute path"));
        }
        return Ok(Entry::File(path));
    }
    let (module, callable) = text.split_once(':').unwrap_or((text, "application"));
    let ident = |s: &str| {
        !s.is_empty()
            && !s.as_bytes()[0].is_ascii_digit()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if !module.split('.').all(ident) || !ident(callable) {
        return Err(format!(
            "{text:?} is neither an absolute WSGI file path nor module:callable (e.g. myproject.wsgi:application)"
        ));
    }
    Ok(Entry::Module {
        module: module.to_owned(),
        callable: callable.to_owned(),
    })
}

fn check_env(key: &str, value: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && !key.as_bytes()[0].is_ascii_digit()
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(format!(
            "{key:?} is not a variable name (letters, digits and '_')"
        ));
    }
    if value.contains('\0') {
        return Err(format!("the value of {key} contains a NUL byte"));
    }
    Ok(())
}

fn check_files(
    entry: &Entry,
    directory: &Path,
    interpreter: &Path,
    python: &Path,
) -> Result<(), (&'static str, String)> {
    use std::os::unix::fs::PermissionsExt;
    match entry {
        Entry::File(f) if !f.is_file() => {
            return Err((
                "entry",
                format!("{} does not exist or is not a file", f.display()),
            ))
        }
        Entry::File(_) => {}
        Entry::Module { .. } if !directory.is_dir() => {
            return Err((
                "directory",
                format!("{} is not a directory", directory.display()),
            ))
        }
        Entry::Module { module, .. } => {
            let rel: PathBuf = module.split('.').collect();
            let as_file = directory.join(&rel).with_extension("py");
            let as_package = directory.join(&rel).join("__init__.py");
            if !as_file.is_file() && !as_package.is_file() {
                return Err((
                    "entry",
                    format!(
                        "module {module} is not in {} (looked for {} and {})",
                        directory.display(),
                        as_file.display(),
                        as_package.display()
                    ),
                ));
            }
        }
    }
    if !directory.is_dir() {
        return Err((
            "directory",
            format!("{} is not a directory", directory.display()),
        ));
    }
    let meta = std::fs::metadata(python).map_err(|e| {
        let what = if python == interpreter {
            format!("{} cannot be used: {e}", python.display())
        } else {
            format!(
                "{} is a folder but not a virtualenv: {} cannot be used: {e}",
                interpreter.display(),
                python.display()
            )
        };
        ("interpreter", what)
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err((
            "interpreter",
            format!("{} is not an executable file", python.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> SiteSpec {
        let entry = dir.join("app.py");
        std::fs::write(&entry, "def application(e, s): pass\n").unwrap();
        SiteSpec {
            name: "blog".into(),
            hosts: vec!["blog.example".into()],
            entry: Some(entry.display().to_string()),
            interpreter: Some(std::env::current_exe().unwrap().display().to_string()),
            ..SiteSpec::default()
        }
    }

    #[test]
    fn a_good_spec_validates_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let site = spec(dir.path()).validate(FsChecks::Full).unwrap();
        assert_eq!(site.directory, dir.path());
        assert_eq!(site.pool, PoolSettings::default());
        let again = SiteSpec::from_site(&site).validate(FsChecks::Full).unwrap();
        assert_eq!(again, site);
    }

    #[test]
    fn bad_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = spec(dir.path());
        let cases: Vec<(&str, SiteSpec)> = vec![
            (
                "name",
                SiteSpec {
                    name: "Bad Name".into(),
                    ..good.clone()
                },
            ),
            (
                "hosts",
                SiteSpec {
                    hosts: vec![],
                    ..good.clone()
                },
            ),
            (
                "hosts",
                SiteSpec {
                    hosts: vec!["a.b".into(), "A.B".into()],
                    ..good.clone()
                },
            ),
            (
                "entry",
                SiteSpec {
                    entry: Some("/nope/app.py".into()),
                    ..good.clone()
                },
            ),
            (
                "entry",
                SiteSpec {
                    entry: Some("not a module".into()),
                    ..good.clone()
                },
            ),
            (
                "interpreter",
                SiteSpec {
                    interpreter: Some("/nope/python3".into()),
                    ..good.clone()
                },
            ),
            (
                "interpreter",
                SiteSpec {
                    interpreter: Some(dir.path().display().to_string()),
                    ..good.clone()
                },
            ),
            (
                "processes.min",
                SiteSpec {
                    processes_min: Some(9),
                    ..good.clone()
                },
            ),
            (
                "threads",
                SiteSpec {
                    threads: Some(0),
                    ..good.clone()
                },
            ),
            (
                "env",
                SiteSpec {
                    env: [("1X".into(), "v".into())].into(),
                    ..good.clone()
                },
            ),
            (
                "cpu.weight",
                SiteSpec {
                    cpu_weight: Some(0),
                    ..good.clone()
                },
            ),
        ];
        for (field, spec) in cases {
            let e = spec.validate(FsChecks::Full).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn merge_overrides_only_what_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut base = spec(dir.path());
        base.env.insert("KEEP".into(), "1".into());
        base.env.insert("DROP".into(), "1".into());
        let patch = SiteSpec {
            threads: Some(4),
            env: [("DROP".into(), String::new()), ("NEW".into(), "2".into())].into(),
            ..SiteSpec::default()
        };
        let merged = base.clone().merged(patch);
        assert_eq!(merged.threads, Some(4));
        assert_eq!(merged.hosts, base.hosts);
        assert_eq!(merged.env.keys().collect::<Vec<_>>(), ["KEEP", "NEW"]);
    }

    #[test]
    fn module_entries() {
        assert_eq!(
            parse_entry("proj.wsgi:app"),
            Ok(Entry::Module {
                module: "proj.wsgi".into(),
                callable: "app".into()
            })
        );
        assert_eq!(
            parse_entry("proj"),
            Ok(Entry::Module {
                module: "proj".into(),
                callable: "application".into()
            })
        );
        assert!(parse_entry("relative/app.py").is_err());
        assert!(parse_entry("a..b:c").is_err());
    }
}
