//! What the front holds for clients slower than their workers, so the workers need not
//! wait for them: the first bytes of request bodies (read before a slot is taken) and
//! the parts of responses not yet taken (in memory, then spooled to disk). Each has a
//! node-wide budget, of which one site may hold a quarter: one site's slow clients
//! leave room for the others'.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::FrontConfig;

/// The share of each budget one site may hold.
const SITE_SHARE: u64 = 4;

/// How the front serves slow clients; one for the node, shared by every request.
#[derive(Debug)]
pub struct SlowClients {
    /// Longest time a client may take nothing of a response that is ready for it
    /// (the front's `send_timeout`).
    pub send_timeout: Duration,
    /// Request bodies read ahead, all requests together.
    pub(super) read_ahead: Budget,
    /// Responses held in memory, all together.
    pub(super) memory: Budget,
    /// Responses spooled to disk, in temporary files in `spool_dir`.
    pub(super) disk: Budget,
    pub(super) spool_dir: PathBuf,
}

impl SlowClients {
    pub fn new(config: &FrontConfig) -> Self {
        SlowClients {
            send_timeout: config.send_timeout,
            read_ahead: Budget::new(config.request_buffer),
            memory: Budget::new(config.response_buffer),
            disk: Budget::new(config.response_spool),
            spool_dir: config.spool_dir.clone(),
        }
    }
}

/// What one site holds for its slow clients now, against each budget.
#[derive(Debug, Default)]
pub struct SiteHold {
    pub(super) read_ahead: AtomicU64,
    pub(super) memory: AtomicU64,
    pub(super) disk: AtomicU64,
}

/// Bytes of one kind held for slow clients, all sites together, and the most allowed.
#[derive(Debug)]
pub(super) struct Budget {
    used: AtomicU64,
    max: u64,
}

impl Budget {
    fn new(max: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            max,
        }
    }

    /// Whether a site holding `site` bytes of this kind may hold more.
    pub(super) fn has_room(&self, site: &AtomicU64) -> bool {
        self.used.load(Ordering::Relaxed) < self.max
            && site.load(Ordering::Relaxed) < self.max / SITE_SHARE
    }

    pub(super) fn add(&self, site: &AtomicU64, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
        site.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn sub(&self, site: &AtomicU64, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        site.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Bytes one request holds against a budget; given back when it is dropped.
pub(super) struct Claim<'a> {
    budget: &'a Budget,
    site: &'a AtomicU64,
    bytes: u64,
}

impl<'a> Claim<'a> {
    pub(super) fn new(budget: &'a Budget, site: &'a AtomicU64) -> Claim<'a> {
        Claim {
            budget,
            site,
            bytes: 0,
        }
    }

    /// Whether the site may read more ahead: its share and the node's budget have
    /// room. The piece read next is counted whole, so each claim may pass the limit by
    /// the one piece it read last: what is held is always what is counted.
    pub(super) fn has_room(&self) -> bool {
        self.budget.has_room(self.site)
    }

    pub(super) fn add(&mut self, n: u64) {
        self.budget.add(self.site, n);
        self.bytes += n;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.budget.sub(self.site, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_stay_within_the_site_share_and_the_node_budget_and_give_back() {
        let budget = Budget::new(100);
        let sites: Vec<AtomicU64> = (0..5).map(|_| AtomicU64::new(0)).collect();
        let mut claims: Vec<Claim> = sites.iter().map(|s| Claim::new(&budget, s)).collect();
        assert!(claims[0].has_room());
        claims[0].add(20);
        assert!(claims[0].has_room());
        // The piece that passes the share is counted.
        claims[0].add(10);
        assert_eq!(sites[0].load(Ordering::Relaxed), 30);
        assert!(!claims[0].has_room(), "past the site's quarter");
        for claim in &mut claims[1..4] {
            assert!(claim.has_room());
            claim.add(25);
        }
        assert_eq!(budget.used.load(Ordering::Relaxed), 105);
        assert!(!claims[4].has_room(), "past the node's budget");
        drop(claims);
        assert_eq!(budget.used.load(Ordering::Relaxed), 0);
        assert!(sites.iter().all(|s| s.load(Ordering::Relaxed) == 0));
    }
}
