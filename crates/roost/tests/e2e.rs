//! The end-to-end suite: one test binary, real node, real Python, real sockets.
//! `docs/testing.md` lists the categories.

#[path = "harness/mod.rs"]
mod harness;

mod e2e {
    pub mod budget;
    pub mod cli;
    pub mod faults;
    pub mod follow;
    pub mod hostile;
    pub mod http;
    pub mod interpreters;
    pub mod ksm;
    pub mod limits;
    pub mod live;
    pub mod pep3333;
    pub mod pool;
    pub mod routing;
    pub mod spawn;
    pub mod stalled_files;
    pub mod streams;
    pub mod templates;
    pub mod tenants;
    pub mod unread;
}
