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
/// Memory: one batch of trailers and one index file's worth of entries at a time.
pub fn repair_index(
    repo: &Repository,
    threads: usize,
    progress: &dyn Progress,
) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let old = repo.index_files()?;
    let packs = repo.list_packs()?;
    progress.start(0, "packs", packs.len() as u64);
    let pool = worker_pool(threads, "repair")?;
    let mut writer = IndexWriter::new(repo);
    for batch in packs.chunks(TRAILERS_AT_ONCE) {
        let trailers: Vec<(PackId, sbk_store::Result<Vec<PackEntry>>)> = pool.install(|| {
            batch
                .par_iter()
                .map(|(id, _)| {
                    let t = repo.read_trailer(*id);
                    progress.advance(0, 1);
                    (*id, t)
                })
                .collect()
        });
        for (id, t) in trailers {
            match t {
                Ok(entries) => {
                    report.packs += 1;
                    report.blobs += entries.len();
                    writer.add(id, entries)?;
                }
                Err(e) => report.damaged.push((id, e.to_string())),
            }
        }
    }
    progress.finish(0);
    (report.index_files_written, report.index_files_removed) = writer.replace(&old)?;
    Ok(report)
}

/// Trailers `repair index` reads at once (in parallel) before it hands them to the writer.
const TRAILERS_AT_ONCE: usize = 256;

/// Entries one index file that prune and repair write holds at most: a new host reads a few
/// large index files rather than many small ones (2^17 entries, about 500 packs of 256
/// blobs, 7 MiB: 800 files at 10^8 blobs), and none is so large that writing or reading it
/// takes much memory (about five times its size while it is decoded and merged).
const ENTRIES_PER_INDEX_FILE: usize = 1 << 17;

/// Writes index files as packs are handed to it, each file holding up to
/// [`ENTRIES_PER_INDEX_FILE`] entries, then replaces the old index files with them.
pub(crate) struct IndexWriter<'a> {
    repo: &'a Repository,
    pending: Vec<(PackId, Vec<PackEntry>)>,
    entries: usize,
    written: HashSet<IndexId>,
}

impl<'a> IndexWriter<'a> {
    /// A writer of new index files into `repo`.
    pub(crate) fn new(repo: &'a Repository) -> Self {
        IndexWriter {
            repo,
            pending: Vec::new(),
            entries: 0,
            written: HashSet::new(),
        }
    }

    /// Names `pack` with `entries` in the next index file, writing the current one first when
    /// it is full.
    pub(crate) fn add(&mut self, pack: PackId, entries: Vec<PackEntry>) -> Result<()> {
        if self.entries + entries.len() > ENTRIES_PER_INDEX_FILE {
            self.flush()?;
        }
        self.entries += entries.len();
        self.pending.push((pack, entries));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            let packs = std::mem::take(&mut self.pending);
            self.written
                .insert(self.repo.write_replacement_index_file(packs)?);
            self.entries = 0;
        }
        Ok(())
    }

    /// Writes what is pending, then removes every file of `old` that is not among those
    /// written (one with the same contents has the same name and stays). In that order, so
    /// that a crash in between leaves blobs named twice, never unnamed. Returns (written,
    /// removed).
    pub(crate) fn replace(mut self, old: &BTreeSet<IndexId>) -> Result<(usize, usize)> {
        self.flush()?;
        let mut removed = 0;
        for f in old.iter().filter(|f| !self.written.contains(f)) {
            self.repo.remove_index_file(f)?;
            removed += 1;
        }
        Ok((self.written.len(), removed))
    }
}
