//! The site file: the sites a registry should hold, in TOML, for `roost apply`.
//!
//! ```toml
//! [site.blog]
//! hosts = ["blog.example.com", "*.blog.example.com"]
//! entry = "/srv/blog/app.py"          # a WSGI file, or module:callable
//! user = "alice"
//! processes_max = 4
//! idle_timeout = "2m"                 # durations as in the CLI: 500ms, 30s, 5m
//! memory_max = "256MiB"               # sizes as in the CLI, or a byte count
//! env = { DJANGO_SETTINGS_MODULE = "blog.settings" }
//! ```
//!
//! Every key of `roost site add` (with `_` for `-`) may appear; an unknown key is an
//! error, so a typo cannot silently fall back to a default. Parsing gives raw
//! [`SiteSpec`]s: paths are the caller's to resolve, validation comes after.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{parse_bytes, parse_duration};
use crate::SiteSpec;

/// Why a site file cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteFileError {
    /// Not TOML, or not the shape of a site file; the message names line and key.
    #[error("{0}")]
    Syntax(String),
    #[error("site {site:?}: {field}: {problem}")]
    Value {
        site: String,
        field: &'static str,
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteFile {
    #[serde(default)]
    site: BTreeMap<String, FileSite>,
}

/// One `[site.NAME]` table, before units are parsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSite {
    #[serde(default)]
    hosts: Vec<String>,
    entry: Option<String>,
    interpreter: Option<String>,
    directory: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    user: Option<String>,
    group: Option<String>,
    runtime: Option<String>,
    processes_max: Option<u32>,
    processes_min: Option<u32>,
    threads: Option<u32>,
    idle_timeout: Option<String>,
    queue_max: Option<u32>,
    queue_timeout: Option<String>,
    request_timeout: Option<String>,
    max_requests: Option<u64>,
    body_max: Option<Size>,
    memory_max: Option<Size>,
    memory_worker_soft: Option<Size>,
    pids_max: Option<u32>,
    cpu_weight: Option<u32>,
    preload: Option<bool>,
}

/// A size written as text ("256MiB") or as a byte count.
#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// The sites of a site file, in name order.
pub fn parse_site_file(text: &str) -> Result<Vec<SiteSpec>, SiteFileError> {
    let file: SiteFile =
        toml::from_str(text).map_err(|e| SiteFileError::Syntax(e.to_string().trim().to_owned()))?;
    file.site
        .into_iter()
        .map(|(name, site)| site.into_spec(name))
        .collect()
}

impl FileSite {
    fn into_spec(self, name: String) -> Result<SiteSpec, SiteFileError> {
        let err = |field: &'static str| {
            let site = name.clone();
            move |problem: String| SiteFileError::Value {
                site: site.clone(),
                field,
                problem,
            }
        };
        let duration = |field: &'static str,
                        text: Option<String>|
         -> Result<Option<Duration>, SiteFileError> {
            text.map(|t| parse_duration(&t))
                .transpose()
                .map_err(err(field))
        };
        let size =
            |field: &'static str, size: Option<Size>| -> Result<Option<u64>, SiteFileError> {
                match size {
                    None => Ok(None),
                    Some(Size::Bytes(n)) => Ok(Some(n)),
                    Some(Size::Text(t)) => parse_bytes(&t).map(Some).map_err(err(field)),
                }
            };
        Ok(SiteSpec {
            idle_timeout: duration("idle_timeout", self.idle_timeout)?,
            queue_timeout: duration("queue_timeout", self.queue_timeout)?,
            request_timeout: duration("request_timeout", self.request_timeout)?,
            body_max: size("body_max", self.body_max)?,
            memory_max: size("memory_max", self.memory_max)?,
            memory_worker_soft: size("memory_worker_soft", self.memory_worker_soft)?,
            name,
            hosts: self.hosts,
            entry: self.entry,
            interpreter: self.interpreter,
            directory: self.directory,
            env: self.env,
            user: self.user,
            group: self.group,
            runtime: self.runtime,
            processes_max: self.processes_max,
            processes_min: self.processes_min,
            threads: self.threads,
            queue_max: self.queue_max,
            max_requests: self.max_requests,
            pids_max: self.pids_max,
            cpu_weight: self.cpu_weight,
            preload: self.preload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_kind_of_value() {
        let specs = parse_site_file(
            r#"
            [site.blog]
            hosts = ["blog.example.com", "*.blog.example.com"]
            entry = "/srv/blog/app.py"
            user = "alice"
            processes_max = 4
            idle_timeout = "2m"
            memory_max = "256MiB"
            body_max = 1048576
            preload = true
            env = { SETTINGS = "prod" }

            [site.api]
            hosts = ["api.example.com"]
            entry = "api.wsgi:application"
            "#,
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        let (api, blog) = (&specs[0], &specs[1]);
        assert_eq!(api.name, "api");
        assert_eq!(api.entry.as_deref(), Some("api.wsgi:application"));
        assert_eq!(blog.hosts.len(), 2);
        assert_eq!(blog.idle_timeout, Some(Duration::from_secs(120)));
        assert_eq!(blog.memory_max, Some(256 << 20));
        assert_eq!(blog.body_max, Some(1 << 20));
        assert_eq!(blog.preload, Some(true));
        assert_eq!(blog.env["SETTINGS"], "prod");
        assert_eq!(blog.processes_min, None);
    }

    #[test]
    fn mistakes_are_named() {
        let typo =
            parse_site_file("[site.a]\nhosts = [\"a.test\"]\nproceses_max = 2\n").unwrap_err();
        assert!(
            matches!(&typo, SiteFileError::Syntax(m) if m.contains("proceses_max") && m.contains("line 3")),
            "{typo}"
        );
        let unit = parse_site_file("[site.a]\nidle_timeout = \"soon\"\n").unwrap_err();
        assert_eq!(
            unit,
            SiteFileError::Value {
                site: "a".into(),
                field: "idle_timeout",
                problem: parse_duration("soon").unwrap_err(),
            }
        );
        let top = parse_site_file("[sites.a]\n").unwrap_err();
        assert!(matches!(top, SiteFileError::Syntax(_)), "{top}");
        assert!(parse_site_file("").unwrap().is_empty());
    }
}
