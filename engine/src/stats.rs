//! `stats`: sizes and ratios of the repository and of each snapshot.

use sbk_store::{
    ChangedBlocks, Extent, Manifest, Repository, RowBits, Rows, SnapshotId, StoreError,
    BLOB_HEADER_LEN,
};

use crate::error::Result;
use crate::snapshot::{snapshot_trees, windows};

/// Figures of one snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotStats {
    /// The snapshot.
    pub id: SnapshotId,
    /// Logical size (the source's size).
    pub size: u64,
    /// Bytes in data extents (the rest are zero extents).
    pub data_bytes: u64,
    /// Distinct chunks it refers to.
    pub chunks: u64,
    /// Raw bytes of its distinct chunks.
    pub chunk_bytes: u64,
    /// Raw bytes of the chunks no other snapshot refers to: what forgetting it would free.
    pub unique_bytes: u64,
    /// Stored (compressed) bytes of those chunks.
    pub unique_stored: u64,
    /// How it was made, when it was made from a changed-block list.
    pub incremental: Option<ChangedBlocks>,
}

/// Figures of the repository (or of the selected snapshots).
#[derive(Debug, Clone, Default)]
pub struct RepoStats {
    /// Snapshots counted.
    pub snapshots: u64,
    /// Sum of their logical sizes.
    pub logical: u64,
    /// Sum of their data extents.
    pub data_bytes: u64,
    /// Distinct chunks they refer to.
    pub chunks: u64,
    /// Raw bytes of those chunks.
    pub chunk_bytes: u64,
    /// Stored bytes of those chunks, headers included.
    pub stored_bytes: u64,
    /// Bytes of all pack files on disk.
    pub pack_bytes: u64,
}

impl RepoStats {
    /// Data referenced per byte of distinct chunk data.
    pub fn dedup_ratio(&self) -> f64 {
        self.data_bytes as f64 / self.chunk_bytes.max(1) as f64
    }
    /// Raw bytes per stored byte.
    pub fn compression_ratio(&self) -> f64 {
        self.chunk_bytes as f64 / self.stored_bytes.max(1) as f64
    }
}

/// A snapshot's figures that need no index, and the rows of its distinct chunks, sorted.
fn snapshot_rows(
    repo: &Repository,
    rows: &Rows,
    id: SnapshotId,
    manifest: &Manifest,
) -> Result<(SnapshotStats, Vec<u64>)> {
    let mut s = SnapshotStats {
        id,
        size: manifest.size,
        data_bytes: 0,
        chunks: 0,
        chunk_bytes: 0,
        unique_bytes: 0,
        unique_stored: 0,
        incremental: manifest
            .changed_blocks()
            .and_then(|r| r.ok())
            .filter(|c| c.incremental),
    };
    let mut found = Vec::new();
    for segments in windows(manifest) {
        let mut ids = Vec::new();
        for x in snapshot_trees(repo, manifest, segments)?
            .into_iter()
            .flatten()
        {
            if let Extent::Data { id, len } = x {
                s.data_bytes += u64::from(len);
                ids.push(id);
            }
        }
        // Sorted, a window's ids are looked up in one pass over the index table.
        ids.sort_unstable();
        ids.dedup();
        let mut missing = None;
        rows.rows_sorted(&ids, |i, row| match row {
            Some(row) => found.push(row),
            None => missing = missing.or(Some(ids[i])),
        });
        if let Some(id) = missing {
            return Err(StoreError::BlobMissing(id).into());
        }
    }
    found.sort_unstable();
    found.dedup();
    s.chunks = found.len() as u64;
    Ok((s, found))
}

/// Computes the figures for `selected` snapshots (all when empty). "Unique" is always relative
/// to every snapshot in the repository.
///
/// Memory: two bits per chunk of the repository (used by one snapshot, by more than one) and
/// one more for the repository's figures, by row of the index (12.5 MB per bit at 10^8
/// chunks), and the rows of one snapshot at a time (each snapshot's trees are read twice: once
/// to count users, once for its figures).
pub fn stats(
    repo: &Repository,
    selected: &[SnapshotId],
) -> Result<(RepoStats, Vec<SnapshotStats>)> {
    let snapshots: Vec<(SnapshotId, Manifest)> = repo
        .snapshots()?
        .into_iter()
        .map(|(id, m)| m.map(|m| (id, m)))
        .collect::<Result<_, _>>()?;
    // Index files of snapshots written since the index was loaded (their backups finished).
    repo.refresh_index()?;
    let index = repo.index()?;
    let rows = repo.index_rows()?;
    let scratch = index.cache_dir();
    let bits = || RowBits::new(rows.len(), scratch).map_err(|e| StoreError::io(scratch, e));
    // Whether one snapshot uses each chunk, whether more than one does, and whether the
    // repository figures counted it yet.
    let (mut once, mut more, mut counted) = (bits()?, bits()?, bits()?);
    for (id, manifest) in &snapshots {
        for row in snapshot_rows(repo, &rows, *id, manifest)?.1 {
            if once.set(row) {
                more.set(row);
            }
        }
    }
    let mut repo_stats = RepoStats::default();
    let mut out = Vec::new();
    for (id, manifest) in &snapshots {
        if !selected.is_empty() && !selected.contains(id) {
            continue;
        }
        let (mut s, found) = snapshot_rows(repo, &rows, *id, manifest)?;
        for row in found {
            let Some(entry) = rows.entry(row).map(|e| e.entry) else {
                continue;
            };
            let stored = BLOB_HEADER_LEN as u64 + u64::from(entry.stored_len);
            s.chunk_bytes += u64::from(entry.raw_len);
            if !more.get(row) {
                s.unique_bytes += u64::from(entry.raw_len);
                s.unique_stored += stored;
            }
            if !counted.set(row) {
                repo_stats.chunks += 1;
                repo_stats.chunk_bytes += u64::from(entry.raw_len);
                repo_stats.stored_bytes += stored;
            }
        }
        repo_stats.snapshots += 1;
        repo_stats.logical += s.size;
        repo_stats.data_bytes += s.data_bytes;
        out.push(s);
    }
    repo_stats.pack_bytes = repo.list_packs()?.iter().map(|(_, size)| size).sum();
    Ok((repo_stats, out))
}
