//! `stats`: sizes and ratios of the repository and of each snapshot.

use sbk_store::{
    ChangedBlocks, Extent, Lookups, Manifest, Repository, SnapshotId, StoreError, BLOB_HEADER_LEN,
};

use crate::error::{EngineError, Result};
use crate::snapshot::{windows, TreePlaces};

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

impl SnapshotStats {
    /// The figures of a snapshot that need neither its trees nor the index.
    fn new(id: SnapshotId, manifest: &Manifest) -> SnapshotStats {
        SnapshotStats {
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
        }
    }
}

/// Computes the figures for `selected` snapshots (all when empty). "Unique" is always relative
/// to every snapshot in the repository.
///
/// One pass over every snapshot's trees gathers (chunk, snapshot) pairs; they are looked up in
/// id order, partition by partition ([`Lookups`]: the table can be far larger than memory),
/// so that all the snapshots using a chunk come together and say at once whether it is unique.
/// Memory: one run of lookups (spilled to scratch files beyond it), the figures per snapshot.
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
    let mut figures: Vec<SnapshotStats> = snapshots
        .iter()
        .map(|(id, m)| SnapshotStats::new(*id, m))
        .collect();
    let wanted: Vec<bool> = snapshots
        .iter()
        .map(|(id, _)| selected.is_empty() || selected.contains(id))
        .collect();
    let mut places = TreePlaces::new(&snapshots, |(_, m)| Some(m));
    let mut lookups = Lookups::new(&rows, index.cache_dir(), false);
    for (n, (_, manifest)) in snapshots.iter().enumerate() {
        places.enter(repo, &rows, n)?;
        for segments in windows(manifest) {
            for x in places
                .trees(repo, manifest, segments)?
                .into_iter()
                .flatten()
            {
                if let Extent::Data { id, len } = x {
                    figures[n].data_bytes += u64::from(len);
                    lookups.push(id, n as u64)?;
                }
            }
        }
    }
    let mut repo_stats = RepoStats::default();
    lookups.resolve::<EngineError>(|row, users| {
        let row = row.ok_or(StoreError::BlobMissing(users[0].0))?;
        // A damaged block of the cache table: its entries are not counted.
        let Some(entry) = rows.entry(row).map(|e| e.entry) else {
            return Ok(());
        };
        let raw = u64::from(entry.raw_len);
        let stored = BLOB_HEADER_LEN as u64 + u64::from(entry.stored_len);
        // One record per snapshot using the chunk.
        let unique = users.len() == 1;
        let mut counted = false;
        for &(_, n) in users.iter().filter(|(_, n)| wanted[*n as usize]) {
            let s = &mut figures[n as usize];
            s.chunks += 1;
            s.chunk_bytes += raw;
            if unique {
                s.unique_bytes += raw;
                s.unique_stored += stored;
            }
            counted = true;
        }
        if counted {
            repo_stats.chunks += 1;
            repo_stats.chunk_bytes += raw;
            repo_stats.stored_bytes += stored;
        }
        Ok(())
    })?;
    let out: Vec<SnapshotStats> = figures
        .into_iter()
        .zip(wanted)
        .filter_map(|(s, w)| w.then_some(s))
        .collect();
    for s in &out {
        repo_stats.snapshots += 1;
        repo_stats.logical += s.size;
        repo_stats.data_bytes += s.data_bytes;
    }
    repo_stats.pack_bytes = repo.list_packs()?.iter().map(|(_, size)| size).sum();
    Ok((repo_stats, out))
}
