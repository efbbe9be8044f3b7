//! The registry watcher: a background thread that notices committed changes to the
//! SQLite registry (by any process) and sends fresh snapshots to the node.
//!
//! `PRAGMA data_version` is a cheap per-connection counter, so polling it every
//! `interval` costs next to nothing; a read happens only when it moves, and reads
//! again only the sites whose revision moved (`SqliteStore::load_since`). The
//! file's identity is checked as often: a registry replaced by another file (a backup
//! restored, a configuration tool that writes a copy and renames it over) is opened
//! anew and loaded, where the open connection would go on reading the old file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_registry::{LastRead, Loaded, SqliteStore};
use tokio::sync::mpsc;

/// Starts the watcher; its first message is the whole registry, then one per change.
/// It stops when the receiver is dropped.
pub fn spawn(path: PathBuf, interval: Duration) -> std::io::Result<mpsc::Receiver<Loaded>> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("registry-watch".into())
        .spawn(move || {
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
                std::thread::sleep(interval);
            }
        })?;
    Ok(rx)
}

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

/// The file's device and inode, or None when it is not there.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
