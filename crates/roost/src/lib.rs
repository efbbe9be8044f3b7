//! roost hosts many Python WSGI sites on one machine, each in its own worker processes,
//! started on a site's first request and stopped when idle.
//!
//! Layout, in request order:
//! - [`front`]: hyper accept loop, limits, Host routing, the exchange with a worker;
//! - [`route`]: host → site table, swapped whole on change;
//! - [`pool`]: one actor per site: workers, slots, the bounded queue;
//! - [`worker`]: one task per worker process: handshake, life, stop;
//! - [`spawn`]: starting processes (the only `unsafe` code);
//! - [`sites`] and [`registry_watch`]: registry changes → pools and routes;
//! - [`server`]: the composition root; [`cli`]: the `roost` command.
//!
//! The wire format is in the `roost-wire` crate, the site model in `roost-registry`.

#![deny(unsafe_code)]

pub mod cli;
pub mod front;
pub mod logs;
pub mod pool;
pub mod registry_watch;
pub mod route;
pub mod server;
pub mod sites;
pub mod spawn;
pub mod worker;

#[cfg(test)]
mod testing;

/// An error and its causes on one line: "what failed: because: because".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Resolves once the shutdown flag is true (or its sender is gone).
pub async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}
