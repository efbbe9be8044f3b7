//! A preloading site's template (`preload`): made with the pool and anew after a
//! change, retired when the site goes quiet (see the actor's module comment).

use std::sync::Arc;

use roost_registry::Site;
use tokio::time::Instant;

use super::{startup_timeout, Pool, PoolContext};
use crate::spawn::SiteTemplate;

impl Pool {
    /// The template stops forking; it exits once the workers it forked have.
    pub(super) fn retire_template(&self) {
        if let Some(template) = &self.template {
            let grace = self.site.pool.request_timeout + self.ctx.stop_grace;
            template.retire(Instant::now() + grace);
        }
    }

    /// After a change: the old template retires, a new one imports the new code.
    pub(super) fn renew_template(&mut self) {
        self.retire_template();
        self.template = new_template(&self.site, &self.ctx);
    }
}

pub(super) fn new_template(site: &Arc<Site>, ctx: &PoolContext) -> Option<Arc<SiteTemplate>> {
    site.pool.preload.then(|| {
        Arc::new(SiteTemplate::new(
            ctx.spawner.clone(),
            site.clone(),
            ctx.logs.clone(),
            ctx.cgroup.clone(),
            ctx.files.clone(),
            startup_timeout(site),
        ))
    })
}
