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

/// Trees located at once: about 100 bytes each, 25 MiB.
const PLACES_AT_ONCE: usize = 1 << 18;

/// Where the segment trees of a list of snapshots are, found a group of snapshots at a time in
/// one pass over the index ([`Lookups`]) before any is read: a binary search of the cache
/// table per tree costs a page fault at nearly every step once the table is larger than memory
/// (a third of prune's mark at 10^7 chunks in 256 MiB). Commands that read every tree of many
/// snapshots (prune, verify, stats) read them through this, calling [`TreePlaces::enter`]
/// before each snapshot, in list order. Memory: about 100 bytes per tree of a group of
/// snapshots holding at most [`PLACES_AT_ONCE`] trees (more only for one larger snapshot).
pub struct TreePlaces<'a, T> {
    items: &'a [T],
    manifest_of: fn(&T) -> Option<&Manifest>,
    /// Trees located at once (at most; a larger snapshot is located alone).
    at_once: usize,
    /// The snapshots located now.
    group: std::ops::Range<usize>,
    /// Their trees' places, in id order.
    found: Vec<IndexEntry>,
}

impl<'a, T> TreePlaces<'a, T> {
    /// Places for the trees of the snapshots `items` (`manifest_of` gives each one's manifest;
    /// `None`: it has none to read).
    pub fn new(items: &'a [T], manifest_of: fn(&T) -> Option<&Manifest>) -> Self {
        TreePlaces {
            items,
            manifest_of,
            at_once: PLACES_AT_ONCE,
            group: 0..0,
            found: Vec::new(),
        }
    }

    /// Makes sure the trees of snapshot `n` are located: when `n` is past the current group,
    /// locates the next group, from `n` on, among `rows` (trees the index does not know are
    /// left to [`TreePlaces::load`], which reports them as a lookup would).
    pub fn enter(&mut self, repo: &Repository, rows: &Rows, n: usize) -> Result<()> {
        if self.group.contains(&n) {
            return Ok(());
        }
        let trees = |i: usize| (self.manifest_of)(&self.items[i]).map_or(0, |m| m.trees.len());
        let mut end = n + 1;
        let mut count = trees(n);
        while end < self.items.len() && count + trees(end) <= self.at_once {
            count += trees(end);
            end += 1;
        }
        let mut lookups = Lookups::new(rows, repo.index()?.cache_dir(), true);
        for item in &self.items[n..end] {
            for tree in (self.manifest_of)(item).map_or(&[][..], |m| &m.trees) {
                lookups.push(*tree, 0)?;
            }
        }
        self.found.clear();
        lookups.resolve::<EngineError>(|row, _| {
            self.found.extend(row.and_then(|r| rows.entry(r)));
            Ok(())
        })?;
        self.group = n..end;
        Ok(())
    }

    /// Reads and decodes segment tree `tree`, which covers `segment_len` bytes.
    pub fn load(
        &self,
        repo: &Repository,
        tree: &ChunkId,
        segment_len: u64,
    ) -> Result<Vec<Extent>, StoreError> {
        load_placed(&self.found, repo, tree, segment_len)
    }

    /// [`snapshot_trees`], through these places.
    pub fn trees(
        &self,
        repo: &Repository,
        manifest: &Manifest,
        segments: std::ops::Range<usize>,
    ) -> Result<Vec<Vec<Extent>>, StoreError> {
        // The places alone are shared with the pool's threads.
        let found = &self.found[..];
        trees_with(manifest, segments, |tree, len| {
            load_placed(found, repo, tree, len)
        })
    }
}

/// Loads `tree` from its place in `found` (sorted by id), or through the index.
fn load_placed(
    found: &[IndexEntry],
    repo: &Repository,
    tree: &ChunkId,
    segment_len: u64,
) -> Result<Vec<Extent>, StoreError> {
    match found.binary_search_by_key(tree, |e| e.entry.id) {
        Ok(i) => repo.load_tree_at(found[i], segment_len),
        Err(_) => repo.load_tree(tree, segment_len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{backup_one, mem_repository, open, source};
    use std::sync::Arc;

    /// Snapshots are located a group at a time, never more trees than allowed together (one
    /// larger snapshot alone), and every tree read through the places is the tree itself.
    #[test]
    fn tree_places_locate_groups_of_snapshots_and_read_the_same_trees() {
        let repo = open(Arc::new(mem_repository())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Two segments each: 16 MiB segments.
        let ids: Vec<_> = (0..3u64)
            .map(|seed| {
                let (path, _) = source(dir.path(), &format!("s{seed}"), seed, 20 << 20);
                backup_one(&repo, &path).unwrap()
            })
            .collect();
        let snapshots: Vec<Manifest> = ids
            .iter()
            .map(|id| repo.load_manifest(id).unwrap())
            .collect();
        assert!(snapshots.iter().all(|m| m.trees.len() == 2));
        let rows = repo.index_rows().unwrap();
        for (at_once, groups) in [
            (4, vec![0..2, 0..2, 2..3]),
            (3, vec![0..1, 1..2, 2..3]),
            (1, vec![0..1, 1..2, 2..3]),
        ] {
            let mut places = TreePlaces::new(&snapshots, |m| Some(m));
            places.at_once = at_once;
            for (n, manifest) in snapshots.iter().enumerate() {
                places.enter(&repo, &rows, n).unwrap();
                assert_eq!(places.group, groups[n], "at_once {at_once}, snapshot {n}");
                for segments in windows(manifest) {
                    assert_eq!(
                        places.trees(&repo, manifest, segments.clone()).unwrap(),
                        snapshot_trees(&repo, manifest, segments).unwrap()
                    );
                }
            }
        }
    }
}
