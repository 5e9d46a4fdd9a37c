//! `repair index`: rebuilds the repository's index files from the pack trailers.
//!
//! Every pack lists its own blobs in its trailer, so the index files can always be recreated
//! from the packs alone (no cache, no other index file needed). New index files are written
//! first, then every other index file is removed: a crash in between leaves index files that
//! name some blobs twice, never a blob that no index file names.

use std::collections::{BTreeSet, HashSet};

use rayon::prelude::*;
use sbk_store::{IndexId, PackEntry, PackId, Repository};

use crate::error::Result;
use crate::pool::worker_pool;
use crate::progress::Progress;

/// What `repair index` did.
#[derive(Debug, Clone, Default)]
pub struct RepairReport {
    /// Packs indexed from their trailers.
    pub packs: usize,
    /// Blobs indexed.
    pub blobs: usize,
    /// Packs whose trailer could not be read, with the reason (left out of the index).
    pub damaged: Vec<(PackId, String)>,
    /// Index files written.
    pub index_files_written: usize,
    /// Index files removed (replaced).
    pub index_files_removed: usize,
}

/// Rebuilds the index files from the pack trailers. The caller holds an exclusive lock.
pub fn repair_index(
    repo: &Repository,
    threads: usize,
    progress: &dyn Progress,
) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let old = repo.index_files()?;
    let packs = repo.list_packs()?;
    progress.start(0, "packs", packs.len() as u64);
    let trailers: Vec<(PackId, sbk_store::Result<Vec<PackEntry>>)> =
        worker_pool(threads, "repair")?.install(|| {
            packs
                .par_iter()
                .map(|(id, _)| {
                    let t = repo.read_trailer(*id);
                    progress.advance(0, 1);
                    (*id, t)
                })
                .collect()
        });
    progress.finish(0);
    let mut good = Vec::new();
    for (id, t) in trailers {
        match t {
            Ok(entries) => {
                report.packs += 1;
                report.blobs += entries.len();
                good.push((id, entries));
            }
            Err(e) => report.damaged.push((id, e.to_string())),
        }
    }
    (report.index_files_written, report.index_files_removed) =
        replace_index_files(repo, &good, &old)?;
    Ok(report)
}

/// Packs named by one index file that prune and repair write: a new host reads a few large
/// index files rather than many small ones.
const PACKS_PER_INDEX_FILE: usize = 4096;

/// Writes index files naming `packs`, then removes every file of `old` that is not among them
/// (one with the same contents has the same name and stays). In that order, so that a crash in
/// between leaves blobs named twice, never unnamed. Returns (written, removed).
pub(crate) fn replace_index_files(
    repo: &Repository,
    packs: &[(PackId, Vec<PackEntry>)],
    old: &BTreeSet<IndexId>,
) -> Result<(usize, usize)> {
    let mut written = HashSet::new();
    for group in packs.chunks(PACKS_PER_INDEX_FILE) {
        written.insert(repo.write_index_file(group.to_vec())?);
    }
    let mut removed = 0;
    for f in old.iter().filter(|f| !written.contains(f)) {
        repo.remove_index_file(f)?;
        removed += 1;
    }
    Ok((written.len(), removed))
}
