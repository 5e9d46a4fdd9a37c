//! Helpers the pipelines share: their worker pool, and reading a snapshot's segment trees.

use rayon::prelude::*;
use sbk_store::{Extent, Manifest, Repository, StoreError};

use crate::error::{EngineError, Result};

/// A rayon pool of `threads` workers (at least one) named `sbk-<what>-<n>` in thread listings.
pub fn worker_pool(threads: usize, what: &'static str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("sbk-{what}-{i}"))
        .build()
        .map_err(EngineError::from)
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
