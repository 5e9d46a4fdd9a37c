//! `stats`: sizes and ratios of the repository and of each snapshot.

use std::collections::{HashMap, HashSet};

use sbk_store::{
    ChangedBlocks, ChunkId, Extent, Manifest, Repository, SnapshotId, BLOB_HEADER_LEN,
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

/// A snapshot's figures that need no index, and its distinct chunks.
fn snapshot_chunks(
    repo: &Repository,
    id: SnapshotId,
    manifest: &Manifest,
) -> Result<(SnapshotStats, HashSet<ChunkId>)> {
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
    let mut chunks = HashSet::new();
    for segments in windows(manifest) {
        for x in snapshot_trees(repo, manifest, segments)?
            .into_iter()
            .flatten()
        {
            if let Extent::Data { id, len } = x {
                s.data_bytes += u64::from(len);
                if chunks.insert(id) {
                    s.chunk_bytes += u64::from(len);
                }
            }
        }
    }
    s.chunks = chunks.len() as u64;
    Ok((s, chunks))
}

/// Computes the figures for `selected` snapshots (all when empty). "Unique" is always relative
/// to every snapshot in the repository.
///
/// Memory: one counter per distinct chunk of the repository, and one snapshot's chunk set at a
/// time (each snapshot's trees are read twice: once to count users, once for its figures).
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
    // How many snapshots use each chunk, and whether the repository figures counted it yet.
    let mut users: HashMap<ChunkId, (u32, bool)> = HashMap::new();
    for (id, manifest) in &snapshots {
        for c in snapshot_chunks(repo, *id, manifest)?.1 {
            users.entry(c).or_default().0 += 1;
        }
    }
    let mut repo_stats = RepoStats::default();
    let mut out = Vec::new();
    for (id, manifest) in &snapshots {
        if !selected.is_empty() && !selected.contains(id) {
            continue;
        }
        let (mut s, chunks) = snapshot_chunks(repo, *id, manifest)?;
        for c in &chunks {
            let entry = repo.locate(c)?.entry;
            let stored = BLOB_HEADER_LEN as u64 + u64::from(entry.stored_len);
            let (n, counted) = users.get_mut(c).expect("counted in the first pass");
            if *n == 1 {
                s.unique_bytes += u64::from(entry.raw_len);
                s.unique_stored += stored;
            }
            if !*counted {
                *counted = true;
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
