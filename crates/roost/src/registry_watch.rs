//! The registry watcher: a background thread that notices committed changes to the
//! SQLite registry (by any process) and sends fresh snapshots to the node.
//!
//! `PRAGMA data_version` is a cheap per-connection counter, so checking it costs next
//! to nothing; a read happens only when it moves, and reads again only the sites whose
//! revision moved (`SqliteStore::load_since`). It is checked as soon as a file of the
//! registry is written (inotify on its folder: `Wakeup`), and every `interval`
//! besides, for what inotify does not see. The file's identity is checked as often: a
//! registry replaced by another file (a backup restored, a configuration tool that
//! writes a copy and renames it over) is opened anew and loaded, where the open
//! connection would go on reading the old file.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use roost_registry::{LastRead, Loaded, SqliteStore};
use tokio::sync::mpsc;

/// Starts the watcher; its first message is the whole registry, then one per change.
/// It stops when the receiver is dropped.
pub fn spawn(path: PathBuf, interval: Duration) -> std::io::Result<mpsc::Receiver<Loaded>> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("registry-watch".into())
        .spawn(move || {
            // Before the first read: a write after it wakes the watcher.
            let wakeup = Wakeup::new(&path);
            // The checks still to make soon after a wake-up. The start counts as one: a
            // commit whose log was written before the watch began, and marked after the
            // first read, would otherwise wait for the poll.
            let mut rechecks = RECHECKS.iter();
            let mut file = identity(&path);
            let mut store = match SqliteStore::open(&path) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "registry watcher cannot open the registry; live changes stop");
                    return;
                }
            };
            // Never equal to a real data_version: the first pass always loads.
            let mut version = i64::MIN;
            // What was read last: the next read reads the sites that changed since.
            let mut last = LastRead::default();
            while !tx.is_closed() {
                let now = identity(&path);
                if now != file {
                    file = now;
                    if file.is_none() {
                        tracing::warn!(path = %path.display(), "the registry file is gone; serving the sites loaded last until it is back");
                    } else {
                        // Closed first, its write-ahead log emptied into the old file:
                        // SQLite pairs a database with its WAL by name, and read the new
                        // file through the old one's frames (one run in ten under load).
                        if let Some(old) = store.take() {
                            if let Err(e) = old.close() {
                                tracing::warn!(error = %crate::error_chain(&e), "cannot close the replaced registry file cleanly");
                            }
                        }
                        match SqliteStore::open(&path) {
                            Ok(reopened) => {
                                tracing::info!(path = %path.display(), "the registry file was replaced; loading the new one");
                                (store, version) = (Some(reopened), i64::MIN);
                                last.forget_revisions();
                            }
                            // Said once per file: tried again when it is replaced again.
                            Err(e) => tracing::error!(error = %crate::error_chain(&e), "the registry file was replaced by one that cannot be opened; serving the sites loaded last"),
                        }
                    }
                }
                if let Some(store) = &store {
                    if !reload_if_changed(store, &mut version, &mut last, &tx) {
                        return;
                    }
                }
                let wait = rechecks.next().map_or(interval, |r| interval.min(*r));
                if wakeup.wait(wait) {
                    rechecks = RECHECKS.iter();
                }
            }
        })?;
    Ok(rx)
}

/// After a write wakes the watcher, checks again this long after each check (each at
/// most the poll's interval), whatever the checks find: SQLite writes a commit's pages
/// to the log (the write inotify sees), syncs the log, which a busy disk can take a
/// while to do, and only then marks the commit in its shared index, memory inotify
/// does not see; and the writes of a burst of commits wake the watcher once.
const RECHECKS: [Duration; 5] = [
    Duration::from_millis(2),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_millis(1000),
];

/// Sends a fresh snapshot when the registry's data_version moved past `version`;
/// false when nobody listens any more.
fn reload_if_changed(
    store: &SqliteStore,
    version: &mut i64,
    last: &mut LastRead,
    tx: &mpsc::Sender<Loaded>,
) -> bool {
    let now = match store.data_version() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot poll the registry");
            return true;
        }
    };
    if now == *version {
        return true;
    }
    match store.load_since(last) {
        Ok(loaded) => {
            *version = now;
            tx.blocking_send(loaded).is_ok()
        }
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot reload the registry");
            true
        }
    }
}

/// Wakes the watcher when a file of the registry is written or renamed in place: the
/// events of its folder whose names begin with the registry's (`registry.db`, its
/// `-wal` and `-journal`). A change is then read within milliseconds of its commit,
/// not at the next poll (`bench/live_change.py`). A registry reached through a
/// symbolic link is watched where the link points: SQLite keeps its log beside the
/// file itself.
struct Wakeup {
    /// None where inotify cannot watch the folder: the poll alone, then.
    inotify: Option<Inotify>,
    name: OsString,
}

impl Wakeup {
    fn new(path: &Path) -> Wakeup {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        let path = real.as_path();
        let name = path.file_name().unwrap_or_default().to_owned();
        let folder = (path.parent())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let watched = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).and_then(|i| {
            let events =
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE;
            i.add_watch(folder, events).map(|_| i)
        });
        let inotify = match watched {
            Ok(inotify) => Some(inotify),
            Err(e) => {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot watch the registry's folder; changes are seen at the next poll");
                None
            }
        };
        Wakeup { inotify, name }
    }

    /// Waits until a file of the registry is written, or `limit` passes; true when
    /// written (or when events were lost: the queue overflowed).
    fn wait(&self, limit: Duration) -> bool {
        let Some(inotify) = &self.inotify else {
            std::thread::sleep(limit);
            return false;
        };
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => return false,
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => {
                    std::thread::sleep(left);
                    return false;
                }
            }
            let events = inotify.read_events().unwrap_or_default();
            let ours = |name: &Option<OsString>| {
                (name.as_deref()).is_some_and(|n| n.as_bytes().starts_with(self.name.as_bytes()))
            };
            if (events.iter())
                .any(|e| ours(&e.name) || e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW))
            {
                return true;
            }
        }
    }
}

/// The file's device and inode, or None when it is not there.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
