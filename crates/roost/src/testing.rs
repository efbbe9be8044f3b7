//! What the crate's unit tests share.

use roost_registry::{Entry, HostPattern, PoolSettings, Site};

/// A site of `hosts` with default settings and an entry that is never run.
pub fn site(name: &str, hosts: &[&str]) -> Site {
    Site {
        name: name.into(),
        hosts: hosts
            .iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect(),
        entry: Entry::File("/srv/app.py".into()),
        interpreter: "/usr/bin/python3".into(),
        directory: "/srv".into(),
        env: Default::default(),
        user: None,
        group: None,
        runtime: None,
        pool: PoolSettings::default(),
    }
}
