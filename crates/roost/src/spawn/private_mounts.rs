//! A worker's own /tmp, /var/tmp, /dev/shm and /proc, and its own System V IPC.
//!
//! Those are the places a process can leave something that outlives it, shared by
//! every user of the host: a world-readable file in /tmp is read by any other
//! tenant (the classic session-file leak of shared hosting), and what is written to
//! /dev/shm (a tmpfs) or kept in a System V segment stays in RAM after the site's
//! last process is gone, for good: a site idle for days would still cost its parked
//! memory, up to its whole `memory.max`, and a thousand such sites the host.
//!
//! So, as root, each new worker (or template) enters mount and IPC namespaces of its
//! own before it drops its privileges: /tmp and /var/tmp become its site's TMPDIR
//! (bind mounts: the files are the TMPDIR's, on the node's disk, removed with the
//! site; the worker's TMPDIR variable says /tmp), /dev/shm a fresh tmpfs capped at
//! the site's `memory.max`. Both namespaces end with the last process in them: the
//! tmpfs and every System V object go with the worker (or, for a preloaded site, with
//! the template and the workers it forked, which share them). As systemd's `PrivateTmp=` and `PrivateIPC=`, and uWSGI's
//! `unshare`. The mounts are private: nothing the host mounts later reaches a worker,
//! and nothing a worker's namespace holds reaches the host.
//!
//! In the same namespace the worker gets a /proc of its own, mounted with
//! `hidepid=invisible`: it sees its own user's processes only, not other tenants' (nor
//! their command lines, memory and open-file counts), nor the host's (an operator's
//! `mysql -p…` command line), as `hidepid` on a shared host's /proc would, without
//! hiding anything from the host's own users. Linux 5.8 made each /proc mount an
//! instance of its own; before, the option would change the host's /proc too, so
//! older kernels keep the host's.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// What a host has of /tmp, /var/tmp and /dev/shm, and whether its kernel can give a
/// worker a /proc of its own, looked at once when the node starts (the host's folders,
/// not a tenant's): a worker gets its own of each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateTargets {
    /// Folders that show the site's TMPDIR.
    binds: Vec<&'static str>,
    /// /dev/shm is there: a tmpfs of the worker's own goes on it.
    shm: bool,
    /// A /proc of the worker's own, showing its user's processes only.
    proc: bool,
}

const BINDS: [&str; 2] = ["/tmp", "/var/tmp"];
const SHM: &str = "/dev/shm";
/// The first kernel whose /proc mounts are instances of their own (options and all).
const PROC_INSTANCES_SINCE: (u32, u32) = (5, 8);
/// Every process but those of the worker's own user is out of its sight.
const PROC_OPTIONS: &str = "hidepid=invisible";

impl PrivateTargets {
    /// The folders this host has.
    pub fn detect() -> PrivateTargets {
        PrivateTargets {
            binds: BINDS
                .into_iter()
                .filter(|f| Path::new(f).is_dir())
                .collect(),
            shm: Path::new(SHM).is_dir(),
            proc: super::kernel::at_least(PROC_INSTANCES_SINCE),
        }
    }

    /// Whether workers get a /proc of their own.
    pub fn own_proc(&self) -> bool {
        self.proc
    }

    /// What a zygote is told (its TMP argument, docs/protocol.md): each of its children
    /// makes the namespaces, and mounts the /proc with these options (its spares ahead
    /// of their orders, as those are the same for every site): `private`, or
    /// `private:<the /proc's options>`.
    pub fn zygote_argument(&self) -> String {
        match self.proc {
            true => format!("private:{PROC_OPTIONS}"),
            false => "private".into(),
        }
    }

    /// The worker's TMPDIR: /tmp where that shows the site's TMPDIR, which may itself
    /// be out of sight below /tmp or /var/tmp once they are bound over.
    pub fn tmpdir_seen(&self, tmpdir: &Path) -> PathBuf {
        match self.binds.first() {
            Some(first) => PathBuf::from(first),
            None => tmpdir.to_path_buf(),
        }
    }

    /// The folder bound over `path` in a worker (so that it sees its TMPDIR there, not
    /// `path`), by the path as given and as resolved. A name without a folder (an
    /// interpreter looked up on PATH) is none of them.
    pub fn hiding(&self, path: &Path) -> Option<&'static str> {
        if !path.is_absolute() {
            return None;
        }
        let resolved = std::fs::canonicalize(path).ok();
        self.binds.iter().copied().find(|target| {
            path.starts_with(target) || resolved.as_ref().is_some_and(|r| r.starts_with(target))
        })
    }

    /// What one worker of a site gets: `tmpdir` shown as /tmp and /var/tmp, and a
    /// /dev/shm of at most `shm_bytes`.
    pub fn for_site(&self, tmpdir: &Path, shm_bytes: u64) -> PrivateMounts {
        PrivateMounts {
            tmpdir: tmpdir.to_path_buf(),
            binds: self.binds.clone(),
            shm_options: self.shm.then(|| format!("mode=1777,size={shm_bytes}")),
            proc: self.proc,
        }
    }
}

/// The private mounts of one new worker, as its SPAWN order or its pre-exec plan
/// carries them.
#[derive(Debug, Clone)]
pub struct PrivateMounts {
    tmpdir: PathBuf,
    binds: Vec<&'static str>,
    /// tmpfs options for /dev/shm; None when the host has none.
    shm_options: Option<String>,
    proc: bool,
}

impl PrivateMounts {
    /// The fields of a zygote's SPAWN order (docs/protocol.md): with the /proc of the
    /// zygote's argument, the loader makes the same mounts, in the same order, as
    /// [`ChildMounts::enter`].
    pub fn order_fields(&self) -> Vec<(String, String)> {
        let mut fields = vec![
            ("private.tmp".into(), self.tmpdir.display().to_string()),
            ("private.binds".into(), self.binds.join(":")),
        ];
        if let Some(options) = &self.shm_options {
            fields.push(("private.shm".into(), options.clone()));
        }
        fields
    }

    /// The same, made ready (allocated) for a child between fork and exec.
    pub fn for_child(&self) -> Result<ChildMounts, std::ffi::NulError> {
        Ok(ChildMounts {
            tmpdir: CString::new(self.tmpdir.as_os_str().as_encoded_bytes())?,
            binds: self
                .binds
                .iter()
                .map(|b| CString::new(*b))
                .collect::<Result<_, _>>()?,
            shm_options: self.shm_options.as_deref().map(CString::new).transpose()?,
            proc: self.proc,
        })
    }
}

/// [`PrivateMounts`] for a forked child: everything allocated before the fork.
#[derive(Debug)]
pub struct ChildMounts {
    tmpdir: CString,
    binds: Vec<CString>,
    shm_options: Option<CString>,
    proc: bool,
}

impl ChildMounts {
    /// In the child, still root: new mount and IPC namespaces, every mount in them made
    /// private, then its TMPDIR on /tmp and /var/tmp, its own /dev/shm and /proc. The
    /// first bind is the source of the others: the TMPDIR may lie below /tmp (a node
    /// whose `--tmp-dir` is there), out of reach by its path once /tmp is covered.
    /// Only system calls (async-signal-safe), on memory prepared by the parent.
    pub fn enter(&self) -> nix::Result<()> {
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC)?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )?;
        let mut source = self.tmpdir.as_c_str();
        for target in &self.binds {
            mount(
                Some(source),
                target.as_c_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            source = target.as_c_str();
        }
        if let Some(options) = &self.shm_options {
            mount(
                Some("tmpfs"),
                SHM,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(options.as_c_str()),
            )?;
        }
        if self.proc {
            mount(
                Some("proc"),
                "/proc",
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(PROC_OPTIONS),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_dev_shm_gets_no_tmpfs_field() {
        let targets = PrivateTargets {
            binds: vec!["/tmp"],
            shm: false,
            proc: false,
        };
        let fields = targets
            .for_site(Path::new("/var/lib/roost/tmp/blog"), 1 << 20)
            .order_fields();
        assert_eq!(
            fields,
            [
                (
                    "private.tmp".to_string(),
                    "/var/lib/roost/tmp/blog".to_string()
                ),
                ("private.binds".to_string(), "/tmp".to_string()),
            ]
        );
    }

    #[test]
    fn the_tmpfs_is_capped_at_the_given_size() {
        let targets = PrivateTargets {
            binds: BINDS.to_vec(),
            shm: true,
            proc: true,
        };
        let mounts = targets.for_site(Path::new("/t"), 512 << 20);
        let fields = mounts.order_fields();
        assert!(fields.contains(&("private.shm".into(), "mode=1777,size=536870912".into())));
        // The /proc's options are the zygote's argument, not the order's.
        assert!(!fields.iter().any(|(k, _)| k.contains("proc")));
        assert_eq!(targets.zygote_argument(), "private:hidepid=invisible");
        assert_eq!(mounts.for_child().unwrap().binds.len(), 2);
    }

    #[test]
    fn what_lies_below_a_bound_folder_is_hidden() {
        let targets = PrivateTargets {
            binds: BINDS.to_vec(),
            shm: true,
            proc: true,
        };
        assert_eq!(targets.hiding(Path::new("/tmp/site/app.py")), Some("/tmp"));
        assert_eq!(targets.hiding(Path::new("/var/tmp")), Some("/var/tmp"));
        assert_eq!(targets.hiding(Path::new("/tmpx/app.py")), None);
        assert_eq!(targets.hiding(Path::new("/srv/site/app.py")), None);
        assert_eq!(targets.hiding(Path::new("python3")), None);
        assert_eq!(
            targets.tmpdir_seen(Path::new("/var/lib/roost/tmp/s")),
            Path::new("/tmp")
        );
    }
}
