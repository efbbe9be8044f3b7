//! The registry watcher: a background thread that notices committed changes to the
//! SQLite registry (by any process) and sends fresh snapshots to the node.
//!
//! `PRAGMA data_version` is a cheap per-connection counter, so polling it every
//! `interval` costs next to nothing; a full reload happens only when it moves.

use std::path::PathBuf;
use std::time::Duration;

use roost_registry::{Loaded, SqliteStore};
use tokio::sync::mpsc;

/// Starts the watcher; its first message is the whole registry, then one per change.
/// It stops when the receiver is dropped.
pub fn spawn(path: PathBuf, interval: Duration) -> std::io::Result<mpsc::Receiver<Loaded>> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("registry-watch".into())
        .spawn(move || {
            let store = match SqliteStore::open(&path) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "registry watcher cannot open the registry; live changes stop");
                    return;
                }
            };
            // Never equal to a real data_version: the first pass always loads.
            let mut version = i64::MIN;
            loop {
                if tx.is_closed() {
                    return;
                }
                let now = match store.data_version() {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot poll the registry");
                        std::thread::sleep(interval);
                        continue;
                    }
                };
                if now == version {
                    std::thread::sleep(interval);
                    continue;
                }
                match store.load() {
                    Ok(loaded) => {
                        version = now;
                        if tx.blocking_send(loaded).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %crate::error_chain(&e), "cannot reload the registry"),
                }
                std::thread::sleep(interval);
            }
        })?;
    Ok(rx)
}
