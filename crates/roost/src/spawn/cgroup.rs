//! Per-site cgroups: memory, process count and CPU share, on cgroup v2 or v1.
//!
//! At start the node finds, for each controller it wants, where it is mounted and which
//! cgroup the node itself is in (a v2 controller is used when the v2 hierarchy has it,
//! else the v1 mount). Each site gets `<node's cgroup>/roost/<site>` in every usable
//! hierarchy, made with its first process (a site nobody visits costs the kernel
//! nothing) and removed with its pool; the limits are written there, and a new worker
//! joins before it runs any Python (the child writes "0" to `cgroup.procs` descriptors
//! opened by the node).
//!
//! On v2 the "no internal processes" rule forbids enabling controllers for children
//! of a cgroup that holds processes, so the node first moves itself into a leaf
//! `<its cgroup>/node` (unless it already is at the root).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use roost_registry::PoolSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where one controller's site cgroups live.
#[derive(Debug, Clone)]
struct Placement {
    controller: Controller,
    version: Version,
    /// `<mount>/<node's cgroup>/roost`; site cgroups are its children.
    base: PathBuf,
}

/// The cgroup controllers this node can use, found once at start.
#[derive(Debug, Clone, Default)]
pub struct Cgroups {
    placements: Vec<Placement>,
    /// Why a wanted controller is not usable, for the start line.
    missing: Vec<(Controller, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}")]
pub struct CgroupError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl CgroupError {
    /// cgroup v1 refuses a memory limit below what the group holds and cannot reclaim
    /// (v2 reclaims, then kills): the limit can be written once the group holds less.
    pub fn is_below_usage(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::ResourceBusy
            && self.path.ends_with("memory.limit_in_bytes")
    }

    /// Whether the file that failed is `controller`'s (`memory.max`, `pids.max`, ...).
    pub fn is_of(&self, controller: Controller) -> bool {
        let prefix = format!("{}.", controller.name());
        (self.path.file_name()).is_some_and(|name| name.to_string_lossy().starts_with(&prefix))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError {
        path: path.to_owned(),
        source,
    }
}

/// A mounted cgroup hierarchy, from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    /// The cgroup path that is the mount's root (not "/" inside some containers).
    root: String,
    version: Version,
    controllers: Vec<String>,
}

impl Cgroups {
    /// Looks at this host's hierarchies and prepares `roost` cgroups where possible.
    /// Never fails: what cannot be used is recorded and reported by [`Cgroups::describe`].
    ///
    /// `name` is this node's folder in each hierarchy (`roost` by default); nodes that
    /// share a machine need different names, since each sweeps its own.
    pub fn detect(name: &str) -> Cgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Cgroups::detect_from(&mountinfo, &own, name)
    }

    /// [`detect`](Self::detect) from given `/proc/self/mountinfo` and
    /// `/proc/self/cgroup` texts.
    fn detect_from(mountinfo: &str, own: &str, name: &str) -> Cgroups {
        let own = own.to_owned();
        let mounts = parse_mountinfo(mountinfo);
        let mut cgroups = Cgroups::default();
        let v2 = mounts.iter().find(|m| m.version == Version::V2);
        let v2_own = own_path(&own, None);
        let mut v2_base = None;
        for controller in Controller::ALL {
            let ctl = controller.name();
            let on_v2 = v2.filter(|m| m.controllers.iter().any(|c| c == ctl));
            let placed = if let (Some(m), Some(path)) = (on_v2, &v2_own) {
                let base = match &v2_base {
                    Some(b) => Ok(b),
                    None => prepare_v2(m, path, name).map(|b| &*v2_base.insert(b)),
                };
                base.map(|b| (Version::V2, b.clone()))
            } else if let Some(m) = mounts
                .iter()
                .find(|m| m.version == Version::V1 && m.controllers.iter().any(|c| c == ctl))
            {
                let path = own_path(&own, Some(ctl)).unwrap_or_else(|| "/".into());
                prepare_v1(m, &path, name).map(|b| (Version::V1, b))
            } else {
                Err(format!("no {ctl} controller is mounted"))
            };
            match placed {
                Ok((version, base)) => cgroups.placements.push(Placement {
                    controller,
                    version,
                    base,
                }),
                Err(why) => cgroups.missing.push((controller, why)),
            }
        }
        cgroups
    }

    /// No controller at all (tests of other modules, or a host without cgroups).
    pub fn none() -> Cgroups {
        Cgroups::default()
    }

    /// Whether any controller is in use.
    pub fn any(&self) -> bool {
        !self.placements.is_empty()
    }

    pub fn has(&self, controller: Controller) -> bool {
        self.placements.iter().any(|p| p.controller == controller)
    }

    /// One line for the node's start message: what is enforced, and how.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .placements
            .iter()
            .map(|p| {
                let v = match p.version {
                    Version::V1 => "v1",
                    Version::V2 => "v2",
                };
                let what = match (p.controller, p.version) {
                    (Controller::Memory, _) => "memory.max",
                    (Controller::Pids, _) => "pids.max",
                    (Controller::Cpu, Version::V1) => "cpu.weight as cpu.shares",
                    (Controller::Cpu, Version::V2) => "cpu.weight",
                };
                format!("{what} (cgroup {v}, {})", p.base.display())
            })
            .collect();
        for (controller, why) in &self.missing {
            let fallback = match controller {
                Controller::Memory => "memory.max enforced by polling worker RSS",
                Controller::Pids => "pids.max not enforced",
                Controller::Cpu => "cpu.weight not enforced",
            };
            parts.push(format!("{fallback} ({why})"));
        }
        parts.join("; ")
    }

    /// The cgroup of one site in every usable hierarchy, to be made with `limits` by
    /// its first process ([`SiteCgroup::make`]).
    pub fn site(&self, site: &str, limits: PoolSettings) -> SiteCgroup {
        SiteCgroup {
            dirs: (self.placements.iter())
                .map(|p| (p.controller, p.version, p.base.join(site)))
                .collect(),
            state: Mutex::new(Made {
                made: false,
                limits,
            }),
        }
    }

    /// Removes this node's folders at shutdown (their site cgroups are gone by then).
    pub fn remove_bases(&self) {
        for p in &self.placements {
            let _ = std::fs::remove_dir(&p.base);
        }
    }

    /// Kills what a previous node left in roost's cgroups (workers whose children
    /// outlived them) and removes those cgroups.
    pub fn sweep(&self) {
        for p in &self.placements {
            let Ok(entries) = std::fs::read_dir(&p.base) else {
                continue;
            };
            for entry in entries.flatten().filter(|e| e.path().is_dir()) {
                let dir = entry.path();
                if dir.file_name().is_some_and(|n| n == "node") {
                    continue;
                }
                let killed = kill_all(&dir);
                if killed > 0 {
                    tracing::warn!(cgroup = %dir.display(), killed, "killed processes left by a previous node");
                }
                let _ = remove_when_empty(&dir);
            }
        }
    }
}

/// One site's cgroup directories, one per usable controller hierarchy.
#[derive(Debug)]
pub struct SiteCgroup {
    dirs: Vec<(Controller, Version, PathBuf)>,
    /// Held while the folders are made or their limits written: the limits written
    /// last are the newest, whichever comes first.
    state: Mutex<Made>,
}

#[derive(Debug)]
struct Made {
    /// The folders are there (made by this pool, which removes them).
    made: bool,
    /// The limits to make them with, or last written.
    limits: PoolSettings,
}

impl SiteCgroup {
    /// Makes the site's folders, with its limits, unless they are made: before each
    /// process of the site joins them. A site whose limits cannot be written is not
    /// started (the first error).
    pub fn make(&self) -> Result<(), CgroupError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.made {
            return Ok(());
        }
        for (_, _, dir) in &self.dirs {
            match std::fs::create_dir(dir) {
                // Left by a pool of the same name that could not remove it.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                made => made.map_err(io_err(dir))?,
            }
        }
        if let Some(e) = self.write_limits(&state.limits).into_iter().next() {
            return Err(e);
        }
        state.made = true;
        Ok(())
    }

    /// Writes the site's limits, which changed, each controller's though another's
    /// were refused (cgroup v1 refuses a memory limit below usage): every error. Into
    /// folders not made yet, nothing: they will be made with these.
    pub fn apply_each(&self, limits: &PoolSettings) -> Vec<CgroupError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.limits = limits.clone();
        if !state.made {
            return Vec::new();
        }
        self.write_limits(limits)
    }

    fn write_limits(&self, limits: &PoolSettings) -> Vec<CgroupError> {
        (self.dirs.iter())
            .filter_map(|(controller, version, dir)| {
                apply_one(*controller, *version, dir, limits).err()
            })
            .collect()
    }

    /// `cgroup.procs` of every directory, opened for the child to write "0" into.
    pub fn open_procs(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        let mut seen: Vec<&Path> = Vec::new();
        let mut fds = Vec::new();
        for (_, _, dir) in &self.dirs {
            if seen.contains(&dir.as_path()) {
                continue; // v2: one directory for all controllers
            }
            seen.push(dir);
            let path = dir.join("cgroup.procs");
            let file: File = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            fds.push(OwnedFd::from(file));
        }
        Ok(fds)
    }

    /// The anonymous memory the site's processes hold, as the memory controller
    /// counts it (`anon` of v2's `memory.stat`, `rss` of v1's): the pages each process
    /// made or copied for itself once in the cgroup, not those it still shares with
    /// the zygote it was forked from, which RSS counts again in every worker. `None`
    /// without a memory controller, or before the site's first process.
    pub fn anon_memory(&self) -> Option<u64> {
        let (_, version, dir) = (self.dirs.iter()).find(|(c, _, _)| *c == Controller::Memory)?;
        let key = match version {
            Version::V2 => "anon",
            Version::V1 => "rss",
        };
        let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
        stat_value(&stat, key)
    }

    /// Whether pids.max is enforced (the host has that controller).
    pub fn limits_pids(&self) -> bool {
        self.dirs.iter().any(|(c, _, _)| *c == Controller::Pids)
    }

    /// SIGKILL to every process in the site's cgroup; how many there were.
    pub fn kill_all(&self) -> usize {
        (self.dirs.iter())
            .map(|(_, _, dir)| kill_all(dir))
            .max()
            .unwrap_or(0)
    }

    /// Kills anything left and removes the directories (the site was removed).
    pub fn remove(&self) {
        // Made or not: a make that failed halfway leaves folders.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.made = false;
        self.kill_all();
        for (_, _, dir) in &self.dirs {
            if let Err(e) = remove_when_empty(dir) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a site's cgroup");
            }
        }
    }
}

/// One controller's limits in its folder.
fn apply_one(
    controller: Controller,
    version: Version,
    dir: &Path,
    limits: &PoolSettings,
) -> Result<(), CgroupError> {
    match (controller, version) {
        (Controller::Memory, Version::V2) => {
            write(dir, "memory.max", &limits.memory_max.to_string())?;
            // Swap would let a site run past its cap, only slower.
            let _ = write(dir, "memory.swap.max", "0");
            Ok(())
        }
        (Controller::Memory, Version::V1) => {
            let memsw = "memory.memsw.limit_in_bytes";
            let Some(before) = read(dir, memsw)? else {
                return write(dir, "memory.limit_in_bytes", &limits.memory_max.to_string());
            };
            // memsw must stay >= the limit at every step: lift it first, and put it
            // back if the limit is refused (the old limit stays).
            write(dir, memsw, "-1")?;
            let limit = write(dir, "memory.limit_in_bytes", &limits.memory_max.to_string());
            let memsw_value = match &limit {
                Ok(()) => limits.memory_max.to_string(),
                Err(_) => before,
            };
            write(dir, memsw, &memsw_value)?;
            limit
        }
        (Controller::Pids, _) => write(dir, "pids.max", &limits.pids_max.to_string()),
        (Controller::Cpu, Version::V2) => write(dir, "cpu.weight", &limits.cpu_weight.to_string()),
        (Controller::Cpu, Version::V1) => {
            // cpu.weight 100 is the default share, as cpu.shares 1024 is.
            let shares = (u64::from(limits.cpu_weight) * 1024 / 100).max(2);
            write(dir, "cpu.shares", &shares.to_string())
        }
    }
}

/// The value of `key` in a flat-keyed file such as `memory.stat` ("key value" lines).
fn stat_value(stat: &str, key: &str) -> Option<u64> {
    (stat.lines())
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A control file's value, `None` where the kernel has no such file.
fn read(dir: &Path, file: &str) -> Result<Option<String>, CgroupError> {
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(value) => Ok(Some(value.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io_err(&path))
}

/// SIGKILL to every process in a cgroup; returns how many there were.
fn kill_all(dir: &Path) -> usize {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let mut n = 0;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            n += 1;
        }
    }
    n
}

/// rmdir, retrying briefly while killed processes finish dying.
fn remove_when_empty(dir: &Path) -> std::io::Result<()> {
    let mut last = Ok(());
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Err(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    last
}

fn prepare_v1(mount: &Mount, own: &str, name: &str) -> Result<PathBuf, String> {
    let dir = cgroup_dir(mount, own);
    let base = dir.join(name);
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    unlisted(&base)?;
    Ok(base)
}

/// The folder of the sites' cgroups is named by site: 0711, so that no tenant lists
/// every site's name there (as the log folder, docs/security.md). Each worker still
/// reaches its own cgroup by its path (`/proc/self/cgroup`).
fn unlisted(base: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| format!("cannot chmod {}: {e}", base.display()))
}

fn prepare_v2(mount: &Mount, own: &str, name: &str) -> Result<PathBuf, String> {
    let dir = cgroup_dir(mount, own);
    let fail = |what: &str, path: &Path, e: std::io::Error| {
        format!("cannot {what} {}: {e}", path.display())
    };
    let wanted = ["memory", "pids", "cpu"];
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enable: String = wanted
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c} "))
        .collect();
    if own != "/" {
        // Leave the node's cgroup free of processes so it may have controllers.
        let leaf = dir.join("node");
        std::fs::create_dir_all(&leaf).map_err(|e| fail("create", &leaf, e))?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| fail("move the node into", &leaf, e))?;
    }
    std::fs::write(dir.join("cgroup.subtree_control"), enable.trim())
        .map_err(|e| fail("enable controllers in", &dir, e))?;
    let base = dir.join(name);
    std::fs::create_dir_all(&base).map_err(|e| fail("create", &base, e))?;
    unlisted(&base)?;
    std::fs::write(base.join("cgroup.subtree_control"), enable.trim())
        .map_err(|e| fail("enable controllers in", &base, e))?;
    Ok(base)
}

/// The directory of cgroup `own` inside `mount`.
fn cgroup_dir(mount: &Mount, own: &str) -> PathBuf {
    let relative = own
        .strip_prefix(mount.root.as_str())
        .unwrap_or(own)
        .trim_start_matches('/');
    let dir = mount.point.join(relative);
    if dir.is_dir() {
        dir
    } else {
        mount.point.clone()
    }
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, point) = (*left.get(3)?, *left.get(4)?);
            let fstype = *right.first()?;
            let options = right.get(2).copied().unwrap_or("");
            let (version, controllers) = match fstype {
                "cgroup2" => {
                    let ctl = std::fs::read_to_string(Path::new(point).join("cgroup.controllers"))
                        .unwrap_or_default();
                    (
                        Version::V2,
                        ctl.split_whitespace().map(str::to_owned).collect(),
                    )
                }
                "cgroup" => (Version::V1, options.split(',').map(str::to_owned).collect()),
                _ => return None,
            };
            Some(Mount {
                point: PathBuf::from(point),
                root: root.to_owned(),
                version,
                controllers,
            })
        })
        .collect()
}

/// The node's cgroup path for a v1 controller, or (None) in the v2 hierarchy.
fn own_path(proc_self_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => id == "0" && controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then(|| path.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site's anonymous memory is the exact key's line of `memory.stat`, not a
    /// longer key it begins (`anon_thp`, `rss_huge`), nor v1's `total_rss`.
    #[test]
    fn anon_memory_reads_the_exact_key_of_memory_stat() {
        let v2 = "anon_thp 2097152\nanon 9904128\nfile 0\n";
        let v1 = "cache 0\nrss_huge 0\nrss 9904128\ntotal_rss 19808256\n";
        assert_eq!(stat_value(v2, "anon"), Some(9_904_128));
        assert_eq!(stat_value(v1, "rss"), Some(9_904_128));
        assert_eq!(stat_value(v1, "anon"), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.stat"), v2).unwrap();
        let site = SiteCgroup {
            dirs: vec![(Controller::Memory, Version::V2, dir.path().to_owned())],
            state: Mutex::new(Made {
                made: true,
                limits: PoolSettings::default(),
            }),
        };
        assert_eq!(site.anon_memory(), Some(9_904_128));
    }

    /// The v2 path against a folder laid out like a cgroup2 mount (this project's CI
    /// host has no v2 controllers, so the kernel's side is not exercised here): the
    /// node moves into a leaf, controllers are delegated, limits land in v2 files.
    #[test]
    fn v2_placement_and_limits_on_a_cgroup2_layout() {
        let root = tempfile::tempdir().unwrap();
        let mount = root.path();
        let own = mount.join("system.slice/app.service");
        std::fs::create_dir_all(own.join("node")).unwrap();
        for file in ["cgroup.controllers", "cgroup.subtree_control"] {
            std::fs::write(mount.join(file), "memory pids cpu").unwrap();
            std::fs::write(own.join(file), "memory pids cpu").unwrap();
        }
        std::fs::write(own.join("node/cgroup.procs"), "").unwrap();
        let mountinfo = format!(
            "30 20 0:26 / {} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
            mount.display()
        );
        // The base folder is created by detect; seed the files cgroupfs would show.
        let base = own.join("roost-test");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("cgroup.subtree_control"), "").unwrap();
        let cgroups =
            Cgroups::detect_from(&mountinfo, "0::/system.slice/app.service\n", "roost-test");
        assert!(cgroups.missing.is_empty(), "{:?}", cgroups.missing);
        assert!(cgroups
            .placements
            .iter()
            .all(|p| p.version == Version::V2 && p.base == base));
        assert_eq!(
            std::fs::read_to_string(own.join("node/cgroup.procs")).unwrap(),
            std::process::id().to_string(),
            "the node did not leave its cgroup for a leaf"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        let site_dir = base.join("blog");
        std::fs::create_dir_all(&site_dir).unwrap();
        for file in [
            "memory.max",
            "memory.swap.max",
            "pids.max",
            "cpu.weight",
            "cgroup.procs",
        ] {
            std::fs::write(site_dir.join(file), "").unwrap();
        }
        let site = cgroups.site("blog", PoolSettings::default());
        let limits = PoolSettings {
            memory_max: 64 << 20,
            pids_max: 16,
            cpu_weight: 250,
            ..PoolSettings::default()
        };
        let read = |f: &str| std::fs::read_to_string(site_dir.join(f)).unwrap();
        // The site changed before its first process: nothing is written yet, and the
        // cgroup is made with the new limits.
        assert!(site.apply_each(&limits).is_empty());
        assert_eq!(read("pids.max"), "");
        site.make().unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "16");
        assert_eq!(read("cpu.weight"), "250");
        assert_eq!(
            site.open_procs().unwrap().len(),
            1,
            "v2 has one folder for all"
        );

        // A limit that cannot be written keeps none of the others from being written,
        // and is the one error.
        std::fs::remove_file(site_dir.join("pids.max")).unwrap();
        std::fs::create_dir(site_dir.join("pids.max")).unwrap();
        let errors = site.apply_each(&PoolSettings {
            // As long as before: a plain file, unlike a control file, keeps what follows.
            cpu_weight: 300,
            ..limits
        });
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].path.ends_with("pids.max"), "{errors:?}");
        assert!(errors[0].is_of(Controller::Pids) && !errors[0].is_of(Controller::Cpu));
        assert_eq!(read("cpu.weight"), "300");
    }

    #[test]
    fn mountinfo_and_own_cgroup_are_parsed() {
        let info = "34 25 0:29 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                    35 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                    22 1 0:21 / /proc rw - proc proc rw\n";
        let mounts = parse_mountinfo(info);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].point, Path::new("/sys/fs/cgroup/memory"));
        assert!(mounts[1].controllers.contains(&"cpu".to_owned()));
        let own = "9:name=systemd:/\n4:memory:/box/7\n1:cpu,cpuacct:/\n0::/user.slice\n";
        assert_eq!(own_path(own, Some("memory")).as_deref(), Some("/box/7"));
        assert_eq!(own_path(own, Some("cpu")).as_deref(), Some("/"));
        assert_eq!(own_path(own, None).as_deref(), Some("/user.slice"));
        assert_eq!(own_path(own, Some("pids")), None);
    }
}
