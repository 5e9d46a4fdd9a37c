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
use sbk_store::{Lock, LockKind, Repository};

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

    /// Opens the repository, saying what bringing its index up to date found.
    pub fn open_repo(&self) -> Result<Repository> {
        let repo = Repository::open(self.repo_path()?)?;
        let r = repo.index_report();
        if r.was_missing {
            self.out.notice(&format!(
                "the index was missing and has been rebuilt from {} packs ({} blobs)",
                r.packs, r.blobs
            ));
        }
        for (path, why) in &r.damaged {
            self.out
                .notice(&format!("{}: cannot be indexed: {why}", path.display()));
        }
        for (pack, ids) in &r.vanished {
            self.out.notice(&format!("pack {pack} is missing: the index knew {} blobs in it; run `sbk verify` to see which snapshots are affected", ids.len()));
        }
        Ok(repo)
    }

    /// Opens the repository and takes a lock on it. The index is brought up to date once more
    /// after the lock is held: another process may have sealed packs since the open.
    pub fn open_locked(&self, kind: LockKind, purpose: &str) -> Result<(Repository, Lock)> {
        let repo = self.open_repo()?;
        let lock = Lock::acquire(repo.path(), kind, purpose)?;
        repo.catch_up_index()?;
        Ok((repo, lock))
    }
}
