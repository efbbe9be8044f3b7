//! Host → site: the routing table the front reads on every request.
//!
//! A [`RouteTable`] is immutable; the node builds a new one on every registry change and
//! swaps it in atomically ([`Routes`]), so the request path takes no lock.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use roost_registry::{HostPattern, Site};

use crate::front::SiteHold;
use crate::logs::SiteLogs;
use crate::pool::PoolHandle;

/// Everything the front needs to serve one site.
pub struct Route {
    pub site: Arc<Site>,
    pub pool: PoolHandle,
    pub logs: Arc<SiteLogs>,
    /// What the site's responses hold for slow clients.
    pub hold: Arc<SiteHold>,
}

impl Route {
    /// The same pool, logs and holds for the site's new settings.
    pub fn serving(&self, site: Arc<Site>) -> Arc<Route> {
        Arc::new(Route {
            site,
            pool: self.pool.clone(),
            logs: self.logs.clone(),
            hold: self.hold.clone(),
        })
    }
}

#[derive(Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<Route>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<Route>>,
}

/// The current table, swapped whole on change.
pub type Routes = Arc<ArcSwap<RouteTable>>;

impl RouteTable {
    pub fn new(routes: impl IntoIterator<Item = Arc<Route>>) -> RouteTable {
        let routes = routes.into_iter();
        // A site has a host or more: sized for one each, the table is not rebuilt
        // over and over as it grows (thousands of sites at every registry change).
        let mut table = RouteTable {
            exact: HashMap::with_capacity(routes.size_hint().0),
            wildcard: HashMap::new(),
        };
        for route in routes {
            for host in &route.site.hosts {
                let map = match host {
                    HostPattern::Exact(h) => table.exact.entry(h.clone()),
                    HostPattern::Wildcard(s) => table.wildcard.entry(s.clone()),
                };
                // The registry keeps hosts unique; first come wins if it ever did not.
                map.or_insert_with(|| route.clone());
            }
        }
        table
    }

    /// The site for a normalised host: an exact name first, then the most specific
    /// wildcard (`*.a.example.com` before `*.example.com`).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        if let Some(route) = self.exact.get(host) {
            return Some(route);
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(route) = self.wildcard.get(parent) {
                return Some(route);
            }
            rest = parent;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(name: &str, hosts: &[&str]) -> Arc<Route> {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Route {
            site: Arc::new(crate::testing::site(name, hosts)),
            pool: PoolHandle::detached(tx).0,
            logs: SiteLogs::detached(),
            hold: Default::default(),
        })
    }

    fn table() -> RouteTable {
        RouteTable::new([
            route("exact", &["example.com", "www.example.com"]),
            route("wild", &["*.example.com"]),
            route("deeper", &["*.api.example.com"]),
        ])
    }

    fn site_of(t: &RouteTable, host: &str) -> Option<String> {
        t.lookup(host).map(|r| r.site.name.clone())
    }

    #[test]
    fn exact_alias_wildcard_unknown() {
        let t = table();
        assert_eq!(site_of(&t, "example.com").as_deref(), Some("exact"));
        assert_eq!(site_of(&t, "www.example.com").as_deref(), Some("exact"));
        assert_eq!(site_of(&t, "shop.example.com").as_deref(), Some("wild"));
        assert_eq!(site_of(&t, "a.b.example.com").as_deref(), Some("wild"));
        assert_eq!(site_of(&t, "v1.api.example.com").as_deref(), Some("deeper"));
        assert_eq!(site_of(&t, "api.example.com").as_deref(), Some("wild"));
        assert_eq!(site_of(&t, "example.org"), None);
        assert_eq!(site_of(&t, "com"), None);
    }

    proptest! {
        /// Any label put in front of a wildcard's suffix routes to that wildcard's site
        /// unless an exact name or a deeper wildcard claims it.
        #[test]
        fn wildcards_match_every_subdomain(labels in proptest::collection::vec("[a-z0-9]{1,8}", 1..4)) {
            let t = table();
            let host = format!("{}.example.com", labels.join("."));
            let expected = if host == "www.example.com" {
                "exact"
            } else if host.ends_with(".api.example.com") {
                "deeper"
            } else {
                "wild"
            };
            let found = site_of(&t, &host);
            prop_assert_eq!(found.as_deref(), Some(expected));
        }
    }
}
