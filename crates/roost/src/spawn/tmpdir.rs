//! Each site's private TMPDIR, `<tmp_root>/<site>`: made for the site's owner at a
//! spawn, never handed to another owner with what is in it, and gone with the site, as
//! systemd's PrivateTmp is with its service. What a tenant leaves there may be a
//! million files (file-based sessions pile up), so nothing waits for a removal: the
//! folder is renamed aside, which is instant, and removed on a blocking thread. What a
//! stop or a crash left is removed when the node next starts ([`open_root`]).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use roost_registry::Identity;

use super::SpawnError;

/// The folder of the TMPDIRs: a site's worker reaches its own by its path, and no
/// tenant lists the others' (their sites' names).
const ROOT_MODE: u32 = 0o711;

/// The private TMPDIR of `site`.
pub fn path(tmp_root: &Path, site: &str) -> PathBuf {
    tmp_root.join(site)
}

/// `<tmp_root>/<site>`, owned by the site user, mode 0700. A folder another user owns
/// was left by the site's previous owner (the site changed hands, or its name was
/// reused): it is moved out of the way and removed with what is in it, not handed
/// over. Moved first: the previous owner's workers may still be finishing requests and
/// writing there, which would keep a removal in place from ever ending.
pub fn make(
    tmp_root: &Path,
    site: &str,
    identity: Option<&Identity>,
) -> Result<PathBuf, SpawnError> {
    let path = path(tmp_root, site);
    let fail = |source| SpawnError::TmpDir {
        path: path.clone(),
        source,
    };
    // Made at start (`open_root`); made again, as then, if removed since.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(ROOT_MODE)
        .create(tmp_root)
        .map_err(fail)?;
    // Made by an earlier worker of the site, or by one starting at the same time.
    let make = || match std::fs::create_dir(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        made => made.map_err(fail),
    };
    make()?;
    let meta = std::fs::symlink_metadata(&path).map_err(fail)?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(fail(std::io::Error::other(
            "exists and is not a plain folder",
        )));
    }
    if let Some(id) = identity {
        if meta.uid() != id.uid || meta.gid() != id.gid {
            // Workers of a site start together: one looks again and hands over at a time.
            static HANDOVER: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = HANDOVER.lock().unwrap_or_else(|e| e.into_inner());
            let owner = std::fs::symlink_metadata(&path).map_err(fail)?.uid();
            // Root owns a folder only between its making and this chown.
            if owner != 0 && owner != id.uid {
                remove_aside(&path, &format!("previous-{site}-{owner}")).map_err(fail)?;
                make()?;
            }
            std::os::unix::fs::chown(&path, Some(id.uid), Some(id.gid)).map_err(fail)?;
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    Ok(path)
}

/// The site is gone (removed, or the node stops): its TMPDIR goes, without waiting.
pub fn discard(tmp_root: &Path, site: &str) {
    let folder = path(tmp_root, site);
    match remove_aside(&folder, &format!("removed-{site}")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %folder.display(), error = %e, "cannot remove the site's TMPDIR");
        }
        _ => {}
    }
}

/// The folder of the sites' TMPDIRs, this node's while the value lives: a lock file
/// beside it, `<folder>.lock`, says so to another node started on the same folder,
/// whose start would otherwise empty it under this one's sites.
pub struct TmpRoot {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// At start: takes the folder's lock, sweeps, and makes the folder anew, checked to
/// be the node's own and one only it can write in, in a parent nobody else can rename
/// it out of: the node chowns and chmods what it makes in there as root, which anyone
/// able to put a link in its place could turn on any file of the host.
pub fn open_root(tmp_root: &Path) -> std::io::Result<TmpRoot> {
    let parent = tmp_root.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)?;
    let parent = parent.canonicalize()?;
    if let Some(why) = roost_registry::open_to_others(&parent, nix::unistd::geteuid().as_raw()) {
        return Err(std::io::Error::other(format!(
            "{why}, and so the folder could be swapped for a link"
        )));
    }
    let mut lock_path = tmp_root.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&lock_path)?;
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => std::io::Error::other(
                "another node uses it (each node on a host needs a --tmp-dir of its own)",
            ),
            errno => std::io::Error::from(errno),
        },
    )?;
    sweep(tmp_root);
    std::fs::DirBuilder::new()
        .mode(ROOT_MODE)
        .create(tmp_root)?;
    let made = std::fs::symlink_metadata(tmp_root)?;
    let ours = made.is_dir() && made.uid() == nix::unistd::geteuid().as_raw();
    if !ours || made.mode() & 0o022 != 0 {
        return Err(std::io::Error::other(
            "it is not a folder of the node's user that only it can write in",
        ));
    }
    Ok(TmpRoot { _lock: lock })
}

/// Every TMPDIR of the node's last run, and whatever it had set aside and not removed
/// yet (a stop does not wait; a crash leaves everything), goes: the root is renamed
/// aside whole and removed in the background.
fn sweep(tmp_root: &Path) {
    let (Some(parent), Some(name)) = (tmp_root.parent(), tmp_root.file_name()) else {
        return;
    };
    let label = format!("{}.removed", name.to_string_lossy());
    // What an earlier start set aside and could not finish removing.
    let prefix = format!(".{label}-");
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            remove_in_background(entry.path());
        }
    }
    match remove_aside(tmp_root, &label) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %tmp_root.display(), error = %e, "cannot clear the sites' TMPDIRs of the last run");
        }
        _ => {}
    }
}

/// Renames `folder` to `.<label>-<nanoseconds>` beside it, then removes that on a
/// blocking thread. A new folder can be made in its place at once.
fn remove_aside(folder: &Path, label: &str) -> std::io::Result<()> {
    let since = std::time::UNIX_EPOCH.elapsed().unwrap_or_default();
    let aside = folder.with_file_name(format!(".{label}-{}", since.as_nanos()));
    std::fs::rename(folder, &aside)?;
    remove_in_background(aside);
    Ok(())
}

/// Off the runtime thread: the folder holds whatever a tenant left, a million files if
/// they liked, and every site waits while a runtime thread is busy.
fn remove_in_background(folder: PathBuf) {
    let remove = move || {
        if let Err(e) = remove_tree(&folder) {
            tracing::warn!(path = %folder.display(), error = %e, "cannot remove a TMPDIR set aside");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(remove)),
        Err(_) => remove(),
    }
}

/// Removes a tree a tenant shaped with GNU `rm -rf --one-file-system`, which removes
/// one of any depth with a bounded number of descriptors, never follows a link swapped
/// in during the walk, and leaves alone a mount inside. Not `std::fs::remove_dir_all`:
/// it recurses once per level and overflows a thread's stack at about 50,000 levels,
/// which a tenant makes in a second, and the node would abort (at every start, as the
/// start removes what the last run left). An empty folder, what most sites leave, is
/// removed without `rm`: a node stopping with thousands of sites would otherwise start
/// thousands of processes at once.
fn remove_tree(folder: &Path) -> std::io::Result<()> {
    // Fails on anything but an empty folder (a link swapped in included: ENOTDIR).
    if std::fs::remove_dir(folder).is_ok() {
        return Ok(());
    }
    let out = std::process::Command::new("/bin/rm")
        .args(["-rf", "--one-file-system", "--"])
        .arg(folder)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(std::io::Error::other(format!(
        "rm {}: {}",
        out.status,
        said.trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    #[test]
    fn workers_starting_together_share_the_private_tmp() {
        let root = tempfile::tempdir().unwrap();
        // Two workers of a site start at once (processes.min 2): each prepares the
        // same folder, and neither may fail because the other made it first.
        for round in 0..100 {
            let site = format!("site{round}");
            let barrier = std::sync::Barrier::new(4);
            let results: Vec<_> = std::thread::scope(|s| {
                let starts: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            make(root.path(), &site, None).map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                starts.into_iter().map(|t| t.join().unwrap()).collect()
            });
            for r in results {
                assert_eq!(r, Ok(root.path().join(&site)), "round {round}");
            }
        }
    }

    #[test]
    fn a_symlink_in_place_of_the_private_tmp_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("site")).unwrap();
        let err = make(root.path(), "site", None).unwrap_err();
        assert!(
            err.to_string().contains("private temporary folder"),
            "{err}"
        );
    }

    /// Files in `dir`, at any depth.
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| entries.flatten().map(|e| 1 + count(&e.path())).sum())
            .unwrap_or(0)
    }

    #[test]
    fn a_discarded_tmpdir_goes_and_a_new_one_can_be_made_at_once() {
        let root = tempfile::tempdir().unwrap();
        let made = make(root.path(), "site", None).unwrap();
        std::fs::write(made.join("session"), "x").unwrap();
        discard(root.path(), "site");
        assert_eq!(count(root.path()), 0, "left behind");
        assert_eq!(make(root.path(), "site", None).unwrap(), made);
        discard(root.path(), "site");
        assert_eq!(count(root.path()), 0, "an empty one left behind");
        discard(root.path(), "never-made");
    }

    /// The removal of an empty folder (`rmdir`, before `rm`) does not follow a link
    /// swapped in its place: the link goes, what it points to stays.
    #[test]
    fn a_link_in_place_of_a_folder_set_aside_goes_alone() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("target");
        std::fs::create_dir(&target).unwrap();
        for (name, keep) in [("to-empty", None), ("to-full", Some("kept"))] {
            if let Some(file) = keep {
                std::fs::write(target.join(file), "x").unwrap();
            }
            let link = root.path().join(name);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            remove_tree(&link).unwrap();
            assert!(std::fs::symlink_metadata(&link).is_err(), "{name} stayed");
            assert!(target.is_dir(), "{name}: the folder linked to went");
        }
        assert!(target.join("kept").exists(), "a file behind the link went");
    }

    /// Deeper than `std::fs::remove_dir_all` can go on a thread of tokio's default
    /// stack (2 MiB): it overflowed at 50,000 levels here, aborting the process.
    #[test]
    fn a_tree_sixty_thousand_levels_deep_is_removed_without_overflowing_the_stack() {
        use nix::fcntl::{openat, OFlag};
        use nix::sys::stat::{mkdirat, Mode};
        let root = tempfile::tempdir().unwrap();
        let made = make(root.path(), "deep", None).unwrap();
        let mut dir = std::fs::File::open(&made).unwrap();
        for _ in 0..60_000 {
            mkdirat(Some(dir.as_raw_fd()), "a", Mode::S_IRWXU).unwrap();
            let fd = openat(
                Some(dir.as_raw_fd()),
                "a",
                OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .unwrap();
            // SAFETY: openat just returned this descriptor, owned by nobody else.
            dir = unsafe { std::fs::File::from_raw_fd(fd) };
        }
        drop(dir);
        let tmp_root = root.path().to_path_buf();
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || discard(&tmp_root, "deep"))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(count(root.path()), 0, "left behind");
    }

    #[test]
    fn a_start_makes_the_root_anew_in_place_of_a_link_or_a_folder_anyone_can_write() {
        let run = tempfile::tempdir().unwrap();
        let tmp_root = run.path().join("tmp");
        let elsewhere = run.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &tmp_root).unwrap();
        drop(open_root(&tmp_root).unwrap());
        let made = std::fs::symlink_metadata(&tmp_root).unwrap();
        assert!(made.is_dir(), "the link was kept");
        assert!(elsewhere.is_dir(), "the link's target was touched");

        std::fs::set_permissions(&tmp_root, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(tmp_root.join("planted"), "x").unwrap();
        let _ours = open_root(&tmp_root).unwrap();
        let made = std::fs::symlink_metadata(&tmp_root).unwrap();
        assert_eq!(made.mode() & 0o777, 0o711);
        assert_eq!(count(&tmp_root), 0, "what was planted is still there");
    }

    #[test]
    fn a_folder_in_a_parent_others_can_write_in_is_refused_unless_sticky() {
        let run = tempfile::tempdir().unwrap();
        let open = run.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = open_root(&open.join("tmp")).err().expect("taken");
        assert!(
            refused.to_string().contains("others can write in"),
            "{refused}"
        );
        // Higher up too: whoever renames `mid` away can put another in its place.
        let below = open.join("mid");
        std::fs::create_dir(&below).unwrap();
        std::fs::set_permissions(&below, std::fs::Permissions::from_mode(0o755)).unwrap();
        let refused = open_root(&below.join("tmp")).err().expect("taken");
        assert!(
            refused
                .to_string()
                .contains(&format!("others can write in {}", open.display())),
            "{refused}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let _sticky = open_root(&open.join("tmp")).expect("a sticky parent is refused");
    }

    #[test]
    fn a_second_node_on_the_same_folder_is_refused_and_empties_nothing() {
        let run = tempfile::tempdir().unwrap();
        let tmp_root = run.path().join("tmp");
        let first = open_root(&tmp_root).unwrap();
        make(&tmp_root, "site", None).unwrap();
        let second = open_root(&tmp_root)
            .err()
            .expect("a second node was let in");
        assert!(
            second.to_string().contains("another node uses it"),
            "{second}"
        );
        assert!(
            tmp_root.join("site").is_dir(),
            "the second start emptied the first's"
        );
        drop(first);
        let _next = open_root(&tmp_root).expect("the folder is free once the first stops");
    }

    #[test]
    fn a_start_sweeps_the_last_runs_tmpdirs_and_what_it_left_aside() {
        let run = tempfile::tempdir().unwrap();
        let tmp_root = run.path().join("tmp");
        make(&tmp_root, "site", None).unwrap();
        std::fs::write(tmp_root.join("site/left"), "x").unwrap();
        std::fs::create_dir_all(tmp_root.join(".removed-gone-1/deep")).unwrap();
        std::fs::create_dir_all(run.path().join(".tmp.removed-1/other")).unwrap();
        std::fs::write(run.path().join("loader.py"), "kept").unwrap();
        sweep(&tmp_root);
        let left: Vec<_> = std::fs::read_dir(run.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["loader.py"], "the sweep took more, or less");
        sweep(&tmp_root);
    }
}
