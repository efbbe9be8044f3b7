//! The entry file's modification time: touching the file reloads the site, as
//! mod_wsgi's script reloading does. The file is the tenant's, on whatever file system
//! it likes, so the pool never looks at it on its runtime thread: it asks through the
//! site's looks ([`SiteFiles`]), once a second at most and one look at a time, and acts
//! when the answer comes back (`PoolControl::EntryLooked`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use roost_registry::Site;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::pool::PoolControl;
use crate::spawn::{FilesStalled, SiteFiles, LOOK_WITHIN};

/// How often a pool with workers (or a failing site) looks at its entry file.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// What the pool last learnt of its entry file.
#[derive(Default)]
pub struct EntryWatch {
    /// The modification time last seen (`None` inside: the file could not be read);
    /// `None` until a look answers after [`EntryWatch::rebase`].
    seen: Option<Option<SystemTime>>,
    /// A look is under way.
    looking: bool,
    next_look: Option<Instant>,
    /// The last look was given up: said once in the node's log, not every 10 s.
    silent: bool,
}

/// The answer to one look.
#[derive(Debug)]
pub struct EntryLooked {
    /// The site as it was when the look began: an answer about an earlier version of
    /// the site (its entry changed meanwhile) is not news about this one.
    site: Arc<Site>,
    modified: Result<Option<SystemTime>, FilesStalled>,
}

impl EntryWatch {
    /// Looks unless a look is under way or the last one is less than a second old.
    pub fn look_if_due(
        &mut self,
        site: &Arc<Site>,
        files: &SiteFiles,
        pool: &UnboundedSender<PoolControl>,
    ) {
        if self.next_look.is_none_or(|at| Instant::now() >= at) {
            self.look(site, files, pool);
        }
    }

    /// Looks now, unless a look is under way (its answer will do).
    pub fn look(
        &mut self,
        site: &Arc<Site>,
        files: &SiteFiles,
        pool: &UnboundedSender<PoolControl>,
    ) {
        if self.looking {
            return;
        }
        self.looking = true;
        self.next_look = Some(Instant::now() + LOOK_EVERY);
        let (site, files, pool) = (site.clone(), files.clone(), pool.clone());
        tokio::spawn(async move {
            let looked = site.clone();
            let modified = files.look(LOOK_WITHIN, move || modified(&looked)).await;
            let _ = pool.send(PoolControl::EntryLooked(EntryLooked { site, modified }));
        });
    }

    /// The next answer is the file as the workers about to start load it, not a
    /// change: the file may have changed while the site had no workers.
    pub fn rebase(&mut self) {
        self.seen = None;
    }

    /// Takes an answer in: true when the entry file of `current` changed since the
    /// answer before.
    pub fn answered(&mut self, answer: EntryLooked, current: &Arc<Site>) -> bool {
        self.looking = false;
        let modified = match answer.modified {
            Ok(modified) => modified,
            Err(stalled) => {
                if !std::mem::replace(&mut self.silent, true) {
                    tracing::warn!(error = %stalled, "cannot tell whether the entry file changed");
                }
                return false;
            }
        };
        if std::mem::take(&mut self.silent) {
            tracing::info!("the site's files answer again");
        }
        if !Arc::ptr_eq(&answer.site, current) {
            self.seen = None;
            return false;
        }
        let before = self.seen.replace(modified);
        before.is_some_and(|before| before != modified)
    }
}

/// When the file holding the app's code last changed (`code_file` itself may look at
/// the file system: a module entry is a file or a package).
fn modified(site: &Site) -> Option<SystemTime> {
    std::fs::metadata(site.code_file())
        .and_then(|m| m.modified())
        .ok()
}
