//! One module per command: an `Args` struct (clap derive) and a `run` function.

pub mod backup;
pub mod forget;
pub mod init;
pub mod prune;
pub mod repair;
pub mod restore;
pub mod snapshots;
pub mod stats;
pub mod unlock;
pub mod verify;

use std::path::PathBuf;

use anyhow::Result;
use sbk_store::Repository;

use crate::exit::{Exit, ExitWith};
use crate::output::Output;

/// What every command gets from the global options.
pub struct Context {
    /// `--repo` / `SBK_REPO`.
    pub repo: Option<PathBuf>,
    /// `--threads`, or the number of CPUs.
    pub threads: usize,
    /// Where results go.
    pub out: Output,
}

impl Context {
    /// The repository path, or an error that says how to give one.
    pub fn repo_path(&self) -> Result<&PathBuf> {
        self.repo.as_ref().ok_or_else(|| {
            ExitWith(
                Exit::NoRepository,
                "no repository given: use --repo DIR or set SBK_REPO".into(),
            )
            .into()
        })
    }

    /// Opens the repository, saying so when its index had to be rebuilt.
    pub fn open_repo(&self) -> Result<Repository> {
        let repo = Repository::open(self.repo_path()?)?;
        if let Some(r) = repo.rebuilt() {
            self.out.notice(&format!(
                "the index was missing and has been rebuilt from {} packs ({} blobs)",
                r.packs, r.blobs
            ));
            for (path, why) in &r.damaged {
                self.out.notice(&format!(
                    "{}: skipped while rebuilding the index: {why}",
                    path.display()
                ));
            }
        }
        Ok(repo)
    }
}
