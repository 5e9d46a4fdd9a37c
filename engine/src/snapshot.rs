//! A snapshot's segment trees, read in windows of segments: what restore, copy, prune, stats,
//! diff and the NBD server walk a snapshot with, in memory bounded by the window whatever the
//! snapshot's size.

use rayon::prelude::*;
use sbk_store::{Extent, Manifest, Repository, StoreError};

use crate::error::Result;

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
    manifest.trees[segments.clone()]
        .par_iter()
        .zip(segments)
        .map(|(tree, i)| repo.load_tree(tree, manifest.segment_len(i)))
        .collect()
}
