//! sbk's web console: one screen for the operator of a data mover. Every morning: did last
//! night's backups of every source succeed, how old is the newest good copy of each, how fast is
//! each repository growing, did verify find anything; and, when a machine is lost, its files
//! and its whole disk (an NBD export) from the browser.
//!
//! It reads repositories and never writes one (its only writes there are the pin lock it holds,
//! which conflicts with nothing, and the pins of snapshots being exported or browsed). Pages are drawn
//! on the server, charts as SVG; no script, nothing fetched from elsewhere. See [`auth`] for
//! who may use it.

pub mod auth;
mod charts;
mod exports;
mod pages;
mod repos;
mod routes;
mod server;

use std::time::Duration;

pub use repos::{JobSpec, Opener, RepoSpec};
pub use server::{read_token, Config, Console, ConsoleError, Listen, Stopper, TlsFiles};

/// What every request of a console shares.
pub struct App {
    repos: Vec<repos::Repo>,
    jobs: Vec<JobSpec>,
    auth: auth::Auth,
    exports: exports::Exports,
    /// The exports' sockets' folder, removed when the console stops.
    _sockets: tempfile::TempDir,
    allow_exports: bool,
    stale_after: Duration,
}
