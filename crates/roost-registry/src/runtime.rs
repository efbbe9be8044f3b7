//! Runtimes: an interpreter, an optional shared root-owned virtualenv, and the modules
//! its zygote preloads. Sites that name a runtime fork from its zygote; a site's own
//! virtualenv is layered above the runtime's packages in the worker.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{check_code_files, FsChecks, ValidationError};

/// A validated runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Runtime {
    /// Unique name, as site names.
    pub name: String,
    /// The base python3 (absolute path).
    pub python: PathBuf,
    /// A virtualenv of shared packages; owned by the node's user (root) and writable by
    /// nobody else, since the zygote imports from it with the node's rights.
    pub venv: Option<PathBuf>,
    /// Modules the zygote imports once for every worker (e.g. flask, django).
    pub preload: Vec<String>,
}

impl Runtime {
    pub fn validate(
        name: &str,
        python: &str,
        venv: Option<&str>,
        preload: &[String],
        fs: FsChecks,
    ) -> Result<Runtime, ValidationError> {
        let err = |field: &'static str, problem: String| ValidationError {
            site: format!("runtime {name}"),
            field,
            problem,
        };
        crate::spec::check_name(name).map_err(|p| err("name", p))?;
        let python = PathBuf::from(python);
        if !python.is_absolute() {
            return Err(err(
                "python",
                format!("{} is not an absolute path", python.display()),
            ));
        }
        let venv = venv.map(PathBuf::from);
        if venv.as_ref().is_some_and(|v| !v.is_absolute()) {
            return Err(err("venv", "the virtualenv path is not absolute".into()));
        }
        for module in preload {
            let ok = !module.is_empty()
                && module.split('.').all(|part| {
                    !part.is_empty()
                        && !part.as_bytes()[0].is_ascii_digit()
                        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                });
            if !ok {
                return Err(err("preload", format!("{module:?} is not a module name")));
            }
        }
        let runtime = Runtime {
            name: name.to_owned(),
            python,
            venv,
            preload: preload.to_vec(),
        };
        if fs == FsChecks::Full {
            let exe = runtime.executable();
            if !exe.is_file() {
                return Err(err("python", format!("{} does not exist", exe.display())));
            }
            if let Some(venv) = &runtime.venv {
                let me = nix::unistd::geteuid().as_raw();
                let mut paths = vec![venv.clone()];
                paths.extend(site_packages(venv));
                let paths: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
                check_code_files(&paths, me).map_err(|e| err("venv", e.to_string()))?;
            }
        }
        Ok(runtime)
    }

    /// The interpreter its zygote runs: the virtualenv's python, or the base python.
    pub fn executable(&self) -> PathBuf {
        match &self.venv {
            Some(v) => v.join("bin").join("python"),
            None => self.python.clone(),
        }
    }
}

/// Folders of `lib/` a virtualenv may hold `python3.X/site-packages` in: one, in
/// practice. The venv is its owner's, and the node reads it: a million of them would
/// be a million paths in the node's memory (and on a worker's PYTHONPATH).
const MOST_PYTHON_FOLDERS: usize = 8;

/// `lib/python3.X/site-packages` folders of a virtualenv (at most
/// eight of them).
pub fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
        .take(MOST_PYTHON_FOLDERS)
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    found.sort();
    found
}

/// Packages that a site's virtualenv and its runtime both carry in different versions,
/// among the modules the runtime preloads: the worker will see the runtime's copy
/// already imported, whatever the site's venv says.
pub fn version_conflicts(runtime: &Runtime, site_venv: &Path) -> Vec<String> {
    let Some(runtime_venv) = &runtime.venv else {
        return Vec::new();
    };
    let mut conflicts = Vec::new();
    for module in &runtime.preload {
        let top = module.split('.').next().unwrap_or(module);
        let (Some(ours), Some(theirs)) = (
            dist_version(runtime_venv, top),
            dist_version(site_venv, top),
        ) else {
            continue;
        };
        if ours != theirs {
            conflicts.push(format!(
                "{top}: the runtime {} preloads {ours}, the site's virtualenv has {theirs}; the worker uses {ours}",
                runtime.name
            ));
        }
    }
    conflicts
}

/// The version of distribution `name` installed in a virtualenv (from `*.dist-info`).
fn dist_version(venv: &Path, name: &str) -> Option<String> {
    let wanted = normalize(name);
    for dir in site_packages(venv) {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix(".dist-info") else {
                continue;
            };
            let Some((dist, version)) = stem.rsplit_once('-') else {
                continue;
            };
            if normalize(dist) == wanted {
                return Some(version.to_owned());
            }
        }
    }
    None
}

fn normalize(name: &str) -> String {
    name.to_ascii_lowercase().replace(['-', '.'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_venv(root: &Path, dists: &[&str]) -> PathBuf {
        let sp = root.join("lib/python3.11/site-packages");
        std::fs::create_dir_all(&sp).unwrap();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/python"), "").unwrap();
        for d in dists {
            std::fs::create_dir_all(sp.join(format!("{d}.dist-info"))).unwrap();
        }
        root.to_owned()
    }

    #[test]
    fn a_venv_stuffed_with_python_folders_gives_a_few() {
        let dir = tempfile::tempdir().unwrap();
        let venv = fake_venv(dir.path(), &[]);
        for n in 0..100 {
            std::fs::create_dir_all(venv.join(format!("lib/python3.{n}x/site-packages"))).unwrap();
        }
        let found = site_packages(&venv);
        assert_eq!(found.len(), MOST_PYTHON_FOLDERS, "{found:?}");
    }

    #[test]
    fn validation_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let runtime_venv = fake_venv(&dir.path().join("rt"), &["Flask-2.2.2", "Jinja2-3.1.2"]);
        let site_venv = fake_venv(&dir.path().join("site"), &["flask-3.0.0", "jinja2-3.1.2"]);
        let rt = Runtime::validate(
            "web",
            "/usr/bin/python3",
            Some(runtime_venv.to_str().unwrap()),
            &["flask".into(), "jinja2".into()],
            FsChecks::Full,
        )
        .unwrap();
        assert_eq!(rt.executable(), runtime_venv.join("bin/python"));
        let conflicts = version_conflicts(&rt, &site_venv);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].starts_with("flask: the runtime web preloads 2.2.2"));

        assert_eq!(
            Runtime::validate("web", "python3", None, &[], FsChecks::Skip)
                .unwrap_err()
                .field,
            "python"
        );
        assert_eq!(
            Runtime::validate(
                "web",
                "/usr/bin/python3",
                None,
                &["bad name".into()],
                FsChecks::Skip
            )
            .unwrap_err()
            .field,
            "preload"
        );
        assert_eq!(
            Runtime::validate("Bad", "/usr/bin/python3", None, &[], FsChecks::Skip)
                .unwrap_err()
                .field,
            "name"
        );
    }
}
