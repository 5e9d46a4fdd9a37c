//! A snapshot's segment trees, read in windows of segments: what restore, copy, prune, stats,
//! diff and the NBD server walk a snapshot with, in memory bounded by the window whatever the
//! snapshot's size.

use rayon::prelude::*;
use sbk_store::{ChunkId, Extent, IndexEntry, Lookups, Manifest, Repository, Rows, StoreError};

use crate::error::{EngineError, Result};

/// Segments restored at once: their extent lists and chunk map are all a restore holds in
/// memory, whatever the snapshot's size: 16 GiB of image at 16 MiB segments, about 64 Ki
/// extents, a few MiB. A chunk used in two windows is read twice. (Windows of 64 segments
/// measured 10-15% slower restores: the workers idle at every window's end.)
const WINDOW_SEGMENTS: usize = 1024;

/// Loads the extent list of segments `segments` of a snapshot, with the offset of each extent.
pub fn load_extents(
    repo: &Repository,
    manifest: &Manifest,
    segments: std::ops::Range<usize>,
) -> Result<Vec<(u64, Extent)>> {
    let trees = snapshot_trees(repo, manifest, segments.clone())?;
    let mut out = Vec::with_capacity(trees.iter().map(Vec::len).sum());
    let mut offset = segments.start as u64 * manifest.segment_size;
    for x in trees.into_iter().flatten() {
        out.push((offset, x));
        offset += u64::from(x.len());
    }
    Ok(out)
}

/// The snapshot's segments in windows of [`WINDOW_SEGMENTS`].
pub fn windows(manifest: &Manifest) -> impl Iterator<Item = std::ops::Range<usize>> {
    let n = manifest.trees.len();
    (0..n)
        .step_by(WINDOW_SEGMENTS)
        .map(move |s| s..(s + WINDOW_SEGMENTS).min(n))
}

/// Reads and decodes segment trees `segments` of a snapshot, in parallel on the current pool,
/// in segment order. Fails on the first tree that cannot be read.
pub fn snapshot_trees(
    repo: &Repository,
    manifest: &Manifest,
    segments: std::ops::Range<usize>,
) -> Result<Vec<Vec<Extent>>, StoreError> {
    trees_with(manifest, segments, |tree, len| repo.load_tree(tree, len))
}

fn trees_with(
    manifest: &Manifest,
    segments: std::ops::Range<usize>,
    load: impl Fn(&ChunkId, u64) -> Result<Vec<Extent>, StoreError> + Sync,
) -> Result<Vec<Vec<Extent>>, StoreError> {
    manifest.trees[segments.clone()]
        .par_iter()
        .zip(segments)
        .map(|(tree, i)| load(tree, manifest.segment_len(i)))
        .collect()
}

/// Where the segment trees of a set of snapshots are, found all at once in one pass over the
/// index ([`Lookups`]) before any is read: a binary search of the cache table per tree costs a
/// page fault at nearly every step once the table is larger than memory (a third of prune's
/// mark at 10^7 chunks in 256 MiB). Commands that read every tree of many snapshots (prune,
/// verify, stats) read them through this. Memory: about 100 bytes per distinct tree (one per
/// 16 MiB segment that changed).
pub struct TreePlaces(Vec<IndexEntry>);

impl TreePlaces {
    /// Locates the trees of `manifests` among `rows` (those the index does not know are left
    /// to [`TreePlaces::load`], which reports them as a lookup would).
    pub fn locate<'m>(
        repo: &Repository,
        rows: &Rows,
        manifests: impl IntoIterator<Item = &'m Manifest>,
    ) -> Result<TreePlaces> {
        let mut lookups = Lookups::new(rows, repo.index()?.cache_dir(), true);
        for manifest in manifests {
            for tree in &manifest.trees {
                lookups.push(*tree, 0)?;
            }
        }
        // In id order: found by binary search below.
        let mut found = Vec::new();
        lookups.resolve::<EngineError>(|row, _| {
            found.extend(row.and_then(|r| rows.entry(r)));
            Ok(())
        })?;
        Ok(TreePlaces(found))
    }

    /// Reads and decodes segment tree `tree`, which covers `segment_len` bytes.
    pub fn load(
        &self,
        repo: &Repository,
        tree: &ChunkId,
        segment_len: u64,
    ) -> Result<Vec<Extent>, StoreError> {
        match self.0.binary_search_by_key(tree, |e| e.entry.id) {
            Ok(i) => repo.load_tree_at(self.0[i], segment_len),
            Err(_) => repo.load_tree(tree, segment_len),
        }
    }

    /// [`snapshot_trees`], through these places.
    pub fn trees(
        &self,
        repo: &Repository,
        manifest: &Manifest,
        segments: std::ops::Range<usize>,
    ) -> Result<Vec<Vec<Extent>>, StoreError> {
        trees_with(manifest, segments, |tree, len| self.load(repo, tree, len))
    }
}
