//! The worker pool the pipelines share.

use crate::error::{EngineError, Result};

/// A rayon pool of `threads` workers (at least one) named `sbk-<what>-<n>` in thread listings.
pub fn worker_pool(threads: usize, what: &'static str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(move |i| format!("sbk-{what}-{i}"))
        .build()
        .map_err(EngineError::from)
}
